from .method import SparseGPTConfig, SparseGPTMethod

__all__ = ["SparseGPTConfig", "SparseGPTMethod"]
