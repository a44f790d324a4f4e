"""Saving: a normal HF checkpoint written to a temporary folder and renamed, so a crash never leaves half a model."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import OutputExistsError, PruningCheckError


def _same_path(a: str | os.PathLike, b: str | os.PathLike | None) -> bool:
    if not b or not os.path.exists(b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool, protected: list[str | None]) -> Path:
    """Refuse a folder that holds the source model, or a non-empty one unless ``overwrite``."""
    out = Path(out_dir)
    for source in protected:
        if out.exists() and _same_path(out, source):
            raise OutputExistsError(
                f"{out} is the folder the model was loaded from; hf_prune never overwrites a source model. "
                "Choose another output folder."
            )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder. Choose another output path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out} is not empty. Choose an empty or new folder, or pass overwrite=True (--overwrite) to replace it."
        )
    return out


def assert_finite_parameters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.device.type != "meta" and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise PruningCheckError(f"{name} holds NaN or inf values; the model is not saved.")


def atomic_write_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder next to ``out_dir``, then move it into place.

    If ``write`` fails, the temporary folder is removed and ``out_dir`` is untouched. With ``overwrite``, an existing
    ``out_dir`` is replaced only after the new folder is complete.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            if any(out.iterdir()) and not overwrite:  # checked again: something may have appeared meanwhile
                raise OutputExistsError(f"{out} is not empty and overwrite is off.")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
