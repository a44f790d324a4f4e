from .method import ExpertsConfig, ExpertsMethod

__all__ = ["ExpertsConfig", "ExpertsMethod"]
