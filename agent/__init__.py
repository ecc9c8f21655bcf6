"""natmig agent."""
