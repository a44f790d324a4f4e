from .method import WandaConfig, WandaMethod

__all__ = ["WandaConfig", "WandaMethod"]
