"""natmig: model-driven live migration of a stateful NAT."""

__version__ = "0.1.0"
