"""Calibration text, the block-by-block engine, and running statistics."""

from .data import calibration_batch, evaluation_tokens, load_documents, sample_windows
from .engine import BlockStep, BlockwiseEngine
from .stats import CosineStats, HessianStats, InputNormStats

__all__ = [
    "BlockStep",
    "BlockwiseEngine",
    "CosineStats",
    "HessianStats",
    "InputNormStats",
    "calibration_batch",
    "evaluation_tokens",
    "load_documents",
    "sample_windows",
]
