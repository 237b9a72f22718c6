"""Tiergate: an edge-plus-cloud tiered inference gateway and its model tooling."""

__version__ = "0.1.0"
