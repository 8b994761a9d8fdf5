"""The `pie` command line."""
