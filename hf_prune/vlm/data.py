"""Image + text calibration batches for vision-language models, through the model's processor."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from ..calibration.builtin_texts import wikipedia_tail_documents
from ..errors import CalibrationDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN_IMAGE_SOURCES = ("skimage",)


def skimage_pairs() -> list[tuple[Any, str]]:
    """scikit-image's sample photos (real images), each with a Wikipedia lead section as its text."""
    try:
        import skimage
        from PIL import Image
    except ImportError as exc:
        raise CalibrationDataError(
            "The built-in image source 'skimage' needs scikit-image: pip install scikit-image"
        ) from exc
    folder = Path(skimage.__file__).parent / "data"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    texts = wikipedia_tail_documents()
    return [(Image.open(p).convert("RGB"), texts[i]) for i, p in enumerate(files)]


def folder_pairs(folder: Path) -> list[tuple[Any, str]]:
    """Images in a folder, each with the text of ``<stem>.txt`` or of ``captions.jsonl`` ({"image", "text"})."""
    from PIL import Image

    captions: dict[str, str] = {}
    index = folder / "captions.jsonl"
    if index.exists():
        for line in index.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                captions[item["image"]] = item["text"]
    pairs = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        text = captions.get(path.name)
        if text is None and path.with_suffix(".txt").exists():
            text = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if text is None:
            raise CalibrationDataError(f"{path.name} has no caption: add {path.stem}.txt or a captions.jsonl entry.")
        pairs.append((Image.open(path).convert("RGB"), text))
    if not pairs:
        raise CalibrationDataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return pairs


def dataset_pairs(
    name: str, split: str, image_field: str, text_field: str, dataset_config: str | None, data_files: Any
) -> list[tuple[Any, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, dataset_config, split=split, data_files=data_files)
    except Exception as exc:  # noqa: BLE001
        raise CalibrationDataError(
            f"Could not load the image-text dataset '{name}': {exc}. Offline, use a folder "
            "of images with captions, or the built-in 'skimage'."
        ) from exc
    missing = [c for c in (image_field, text_field) if c not in ds.column_names]
    if missing:
        raise CalibrationDataError(f"Dataset '{name}' lacks column(s) {missing}; it has {ds.column_names}.")
    return [(row[image_field].convert("RGB"), row[text_field]) for row in ds]


def image_text_pairs(source: Any, **kwargs) -> tuple[list[tuple[Any, str]], str]:
    if source == "skimage":
        return skimage_pairs(), "skimage photos + wikipedia-tail text"
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return folder_pairs(Path(source)), str(source)
    if isinstance(source, str):
        return dataset_pairs(
            source,
            kwargs.get("split", "train"),
            kwargs.get("image_field", "image"),
            kwargs.get("text_field", "text"),
            kwargs.get("dataset_config"),
            kwargs.get("data_files"),
        ), f"dataset:{source}"
    raise CalibrationDataError(f"Unsupported image-text source {source!r}.")


def is_image_source(source: Any) -> bool:
    if source in BUILTIN_IMAGE_SOURCES:
        return True
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(source).iterdir())
    return False


def image_text_batches(
    source: Any, processor, image_prompt: str, nsamples: int, seqlen: int | None, seed: int, **kwargs
) -> tuple[list[dict], dict[str, Any]]:
    """``nsamples`` processor outputs of one image and its text each (seeded order; images reused if fewer).
    The text is cut to ``seqlen`` tokens."""
    pairs, used = image_text_pairs(source, **kwargs)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = []
    for i in range(nsamples):
        image, text = pairs[order[i % len(order)]]
        if seqlen:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seqlen]
            text = tokenizer.decode(ids)
        batches.append(dict(processor(images=[image], text=[image_prompt + text], return_tensors="pt")))
    return batches, {"source": used, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "images": True}
