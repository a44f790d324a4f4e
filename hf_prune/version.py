"""The package version, in one place (the package, its saved configs and model cards read it)."""

__version__ = "0.1.0"
