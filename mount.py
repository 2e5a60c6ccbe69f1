#!/usr/bin/env python3
"""Mount the zkfs encrypted store: `python mount.py MOUNTPOINT`; `--unmount` to undo."""
import sys

from zkfs.mount.cli import main

if __name__ == "__main__":
    sys.exit(main())
