from .method import ShrinkConfig, ShrinkMethod

__all__ = ["ShrinkConfig", "ShrinkMethod"]
