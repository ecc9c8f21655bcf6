"""natmig testbed."""
