from .method import VisualTokensConfig, VisualTokensMethod

__all__ = ["VisualTokensConfig", "VisualTokensMethod"]
