"""zkfs benchmark harness (see bench/README.md)."""
