from .method import WidthConfig, WidthMethod

__all__ = ["WidthConfig", "WidthMethod"]
