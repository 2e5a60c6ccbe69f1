"""The FUSE frontend: mount.py's filesystem."""
