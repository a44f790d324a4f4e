"""The ``calibration:`` section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..configuration import StrictConfig, TextSourceFields
from ..errors import RecipeError

DEFAULT_SEQLEN = 2048


@dataclass
class CalibrationConfig(TextSourceFields, StrictConfig):
    """Where calibration text comes from and how much of it.

    Args:
        source: built-in name (``fortunes``, ``wikipedia``, ``wikipedia-tail``), local file/folder, list of strings,
            or an HF dataset id.
        nsamples: number of calibration windows (the field's convention is 128).
        seqlen: tokens per window; default min(2048, the model's max_position_embeddings).
        seed: seeds the document order and window offsets.
        batch_size: samples per block forward; 0 = all of them when they fit in memory (one forward per block).
        text_field, split, dataset_config, data_files: how to read records and datasets.
        image_field: for vision-language models, the image column of an image-text dataset. The source may also
            be a folder of images with captions, or ``skimage`` (scikit-image's photos with Wikipedia text).
        activation_dtype: storage of the activations between blocks: ``auto`` (as computed), ``bfloat16``,
            ``float16`` or ``float32`` (statistics are always accumulated in float32).
        activation_dir: keep the activations between blocks in files under this folder instead of in memory.
    """

    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    batch_size: int = 0
    image_field: str = "image"
    activation_dtype: str = "auto"
    activation_dir: str | None = None

    def validate(self) -> None:
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise RecipeError(f"calibration.nsamples must be a positive integer, got {self.nsamples!r}.")
        if self.seqlen is not None and (not isinstance(self.seqlen, int) or self.seqlen < 2):
            raise RecipeError(f"calibration.seqlen must be an integer >= 2, got {self.seqlen!r}.")
        if self.activation_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RecipeError(
                "calibration.activation_dtype must be auto, float32, bfloat16 or float16, "
                f"got {self.activation_dtype!r}."
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise RecipeError(f"calibration.batch_size must be >= 0 (0 = automatic), got {self.batch_size!r}.")

    def engine_options(self) -> dict[str, Any]:
        import torch

        dtype = None if self.activation_dtype == "auto" else getattr(torch, self.activation_dtype)
        return {"activation_dtype": dtype, "activation_dir": self.activation_dir}
