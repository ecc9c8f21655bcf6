"""natmig controller."""
