from .method import MagnitudeConfig, MagnitudeMethod

__all__ = ["MagnitudeConfig", "MagnitudeMethod"]
