"""The package version: written into every export (dvae.json) and read by pyproject.toml."""

__version__ = "0.2.0"
