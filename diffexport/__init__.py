"""diffexport: export EDM-style diffusion models to engines, sample with verified parity, deploy."""

__version__ = "0.1.0"
