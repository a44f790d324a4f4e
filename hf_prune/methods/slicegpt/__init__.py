from .method import SliceGPTConfig, SliceGPTMethod

__all__ = ["SliceGPTConfig", "SliceGPTMethod"]
