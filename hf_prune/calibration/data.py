"""Calibration and evaluation text: from a built-in name, local files, a list of strings, or an HF dataset.

Calibration convention: ``nsamples`` random windows of ``seqlen`` tokens. Documents are visited in a seeded random
order without replacement; consecutive documents (joined by the tokens of "\\n\\n") are gathered until they hold
``seqlen`` tokens, and one window starts at a seeded random offset inside them. Long documents (C4-style) give one
window each, as in the Wanda/SparseGPT loaders; short ones (fortunes) are packed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationDataError
from ..utils import logger
from .builtin_texts import BUILTIN_TEXTS, builtin_documents

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")


def _docs_from_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                docs.append(_text_of(json.loads(line), text_field, f"{path}:{lineno}"))
        return docs
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get("data", list(data.values()))
        if not isinstance(data, list):
            raise CalibrationDataError(f"{path}: expected a JSON list of strings or of objects with '{text_field}'.")
        return [_text_of(item, text_field, str(path)) for item in data]
    # Plain text: paragraphs (blank-line separated) are the documents.
    text = path.read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _text_of(item: Any, text_field: str, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get(text_field), str):
        return item[text_field]
    raise CalibrationDataError(f"{where}: expected a string or an object with a string field '{text_field}'.")


def _docs_from_paths(paths: Sequence[Path], text_field: str) -> list[str]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES))
        else:
            files.append(p)
    if not files:
        raise CalibrationDataError(f"No text files ({', '.join(TEXT_SUFFIXES)}) under {', '.join(map(str, paths))}.")
    docs: list[str] = []
    for f in files:
        docs.extend(_docs_from_file(f, text_field))
    return docs


def _docs_from_dataset(
    name: str, dataset_config: str | None, split: str, text_field: str, data_files: Any = None
) -> list[str] | Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise CalibrationDataError("Loading a Hub dataset needs the `datasets` package.") from exc
    try:
        ds = datasets.load_dataset(name, dataset_config, split=split, data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise CalibrationDataError(
            f"Could not load the dataset '{name}' (config={dataset_config!r}, split={split!r}): "
            f"{type(exc).__name__}: {exc}. Without internet, use a built-in text ({', '.join(BUILTIN_TEXTS)}), "
            "local .txt/.jsonl/.json files, or a list of strings."
        ) from exc
    if text_field not in ds.column_names:
        raise CalibrationDataError(
            f"Dataset '{name}' has no column '{text_field}'; its columns are {ds.column_names}. Set text_field."
        )
    return ds[text_field]


def load_documents(
    source: str | Sequence[str] | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    dataset_config: str | None = None,
    data_files: Any = None,
    allow_fallback: bool = True,
) -> tuple[list[str], str]:
    """Documents of a text source and a short description of what was actually read.

    Args:
        source: a built-in name (``fortunes``, ``wikipedia``, ``wikipedia-tail``), a local file or folder
            (``.txt`` paragraphs, ``.jsonl``/``.json`` records), a list of paths, a list of strings, or an HF
            dataset id.
        text_field: the field holding the text in ``.jsonl``/``.json`` records and datasets.
        split, dataset_config, data_files: passed to ``datasets.load_dataset`` for dataset ids.
        allow_fallback: let ``fortunes`` fall back to ``wikipedia-tail`` when the Debian package is missing.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source in BUILTIN_TEXTS:
            docs, used = builtin_documents(source, allow_fallback=allow_fallback)
            return docs, used
        if os.path.exists(source):
            return _docs_from_paths([Path(source)], text_field), source
        return list(_docs_from_dataset(source, dataset_config, split, text_field, data_files)), f"dataset:{source}"
    items = list(source)
    if not items:
        raise CalibrationDataError("The text source is an empty list.")
    if all(isinstance(s, str) for s in items) and all(os.path.exists(s) for s in items) and len(items) < 1000:
        return _docs_from_paths([Path(s) for s in items], text_field), ", ".join(items)
    if all(isinstance(s, str) for s in items):
        return items, f"list of {len(items)} strings"
    raise CalibrationDataError("A text source list must hold strings (texts or file paths).")


def sample_windows(
    docs: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int, allow_fewer: bool = False
) -> torch.Tensor:
    """``nsamples`` windows of exactly ``seqlen`` token ids, seeded. Raises if the documents hold too little text
    (with ``allow_fewer``: returns the windows there are, if at least one)."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationDataError(f"Need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}.")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    windows: list[list[int]] = []
    buffer: list[int] = []
    seen_tokens = 0
    for idx in order:
        ids = tokenizer(docs[idx], add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        seen_tokens += len(ids)
        buffer = buffer + sep + ids if buffer else list(ids)
        if len(buffer) >= seqlen:
            start = rng.randint(0, len(buffer) - seqlen)
            windows.append(buffer[start : start + seqlen])
            buffer = []
            if len(windows) == nsamples:
                return torch.tensor(windows, dtype=torch.long)
    if allow_fewer and windows:
        return torch.tensor(windows, dtype=torch.long)
    raise CalibrationDataError(
        f"Too little calibration text: {len(docs)} documents hold {seen_tokens} tokens, which make "
        f"{len(windows)} windows of {seqlen} tokens; nsamples={nsamples} x seqlen={seqlen} = {nsamples * seqlen} "
        "tokens were requested. Lower nsamples or seqlen, or add text."
    )


def evaluation_tokens(docs: Sequence[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Documents joined with "\\n\\n" and tokenized once (tokenizer defaults, so BOS where the model expects it).

    With ``max_tokens``, only a prefix of the text long enough to hold them is tokenized; the first ``max_tokens``
    ids are the same as those of the whole text (the cut lies far past them, at a document boundary).
    """
    if max_tokens is None:
        return torch.tensor(tokenizer("\n\n".join(docs))["input_ids"], dtype=torch.long)
    margin = 256
    chars = (max_tokens + margin) * 8
    while True:
        joined, total = [], 0
        for doc in docs:
            joined.append(doc)
            total += len(doc) + 2
            if total >= chars:
                break
        ids = tokenizer("\n\n".join(joined))["input_ids"]
        if len(ids) >= max_tokens + margin or len(joined) == len(docs):
            return torch.tensor(ids[: max_tokens if len(joined) < len(docs) else None], dtype=torch.long)
        chars *= 2


def describe(docs_used: str, nsamples: int, seqlen: int, seed: int) -> dict[str, Any]:
    return {"source": docs_used, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}


def calibration_batch(
    source,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    **source_kwargs,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token windows for calibration plus a record of where they came from (for the report and config.json)."""
    docs, used = load_documents(source, **source_kwargs)
    windows = sample_windows(docs, tokenizer, nsamples, seqlen, seed)
    logger.info("Calibration: %d x %d tokens from %s (seed %d)", nsamples, seqlen, used, seed)
    return windows, describe(used, nsamples, seqlen, seed)
