#!/usr/bin/env python3
"""zkfs command line: see `python client.py --help`."""
import sys

from zkfs.cli import main

if __name__ == "__main__":
    sys.exit(main())
