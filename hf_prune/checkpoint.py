"""Saving: a normal HF checkpoint written to a temporary folder and renamed, so a crash never leaves half a model."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .errors import HFPruneError, OutputExistsError, PruningCheckError
from .utils import all_finite

# A Hub repo id: "name" or "owner/name", letters, digits, '-', '_', '.' (no path syntax).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelSourceError(HFPruneError, FileNotFoundError):
    """The model to load is neither a model folder nor a plausible Hub id."""


def check_model_source(source: str | os.PathLike) -> None:
    """Refuse, before anything is loaded, a model that is a local path without a config.json, a file, or a string
    that is no folder here and cannot be a Hub id. ``packaged:<name>`` and Hub ids pass (the Hub answers for them)."""
    text = str(source)
    if text.startswith("packaged:"):
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{text} is a folder without config.json, so it is not a Hugging Face model folder. Pass the folder "
                "that save_pretrained wrote (config.json + *.safetensors), or a Hub id such as org/name."
            )
        check_checkpoint_files(path)
        return
    if path.exists():
        raise ModelSourceError(
            f"{text} is a file; pass the model's folder (the one holding config.json) or a Hub id such as org/name."
        )
    if not _HUB_ID.match(text) or text.endswith((".json", ".safetensors", ".bin", ".gguf")):
        raise ModelSourceError(
            f"{text} does not exist here and is not a Hub id (org/name). Check the path, or pass a Hub id."
        )


class CorruptCheckpointError(ModelSourceError):
    """A local checkpoint whose files are damaged: unreadable config, missing or truncated shards."""


INDEX = "model.safetensors.index.json"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON ({exc}); the {what} is damaged. Download or save the model again."
        ) from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} holds no JSON object; the {what} is damaged.")
    return data


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(where the tensor bytes start, the parsed header) of a safetensors file; OSError / ValueError when the header
    cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than its 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"its header claims {n} bytes, the file has {size}")
        return 8 + n, json.loads(f.read(n))


def check_safetensors_file(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file (a truncated download or an
    interrupted copy fails here, from the header alone: nothing is loaded)."""
    try:
        start, header = read_safetensors_header(path)
        size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} is not a valid safetensors file ({exc}). Download or save the model again."
        ) from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged: its tensors need {start + end} bytes, the file has {size}. "
            "Download or save the model again."
        )


def check_checkpoint_files(folder: Path) -> None:
    """The files of a local checkpoint, before anything is loaded: config.json parses, the shard index parses and
    names only shards that exist, and every safetensors file is complete."""
    _read_json(folder / "config.json", "model's config")
    index = folder / INDEX
    if index.exists():
        weight_map = _read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"{index} has no weight_map; the shard index is damaged.")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CorruptCheckpointError(
                f"The checkpoint at {folder} is incomplete: {len(missing)} shard file(s) listed in {INDEX} are "
                f"missing ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}). Download it again."
            )
        shards = sorted({folder / f for f in weight_map.values()})
    else:
        shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        check_safetensors_file(shard)


def check_can_create(out_dir: str | os.PathLike) -> None:
    """The output folder can be made: no file on its path, and its nearest existing parent accepts new entries
    (probed by making and removing a temporary folder there)."""
    out = Path(out_dir).expanduser().absolute()
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"{out} cannot be created: {parent} is a file. Choose an output folder elsewhere.")
    try:
        probe = tempfile.mkdtemp(prefix=".hf_prune-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputExistsError(
            f"{out} cannot be created: {parent} does not accept new folders ({exc.strerror}). Choose a writable place."
        ) from exc


def remove_leftovers(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary folders a killed save left beside ``out_dir`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    out = Path(out_dir).absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for leftover in out.parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


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
    check_can_create(out if not out.exists() else out.parent / f".{out.name}.probe")
    return out


def assert_finite_parameters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.device.type != "meta" and p.is_floating_point() and not all_finite(p):
            raise PruningCheckError(f"{name} holds NaN or inf values; the model is not saved.")


def atomic_write_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder next to ``out_dir``, then move it into place.

    If ``write`` fails, the temporary folder is removed and ``out_dir`` is untouched. With ``overwrite``, an existing
    ``out_dir`` is replaced only after the new folder is complete.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
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
