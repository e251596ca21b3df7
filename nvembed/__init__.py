"""nvembed: train NV-Embed-style text embedders from decoder-only LLMs."""

__version__ = "0.1.0"
