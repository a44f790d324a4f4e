from .method import DepthConfig, DepthMethod

__all__ = ["DepthConfig", "DepthMethod"]
