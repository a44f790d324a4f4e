"""Config dataclasses that load from dicts/YAML, reject unknown keys by name, and save back with ``to_dict``."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from .errors import RecipeError

T = TypeVar("T", bound="StrictConfig")


def reject_unknown_keys(data: dict, allowed: list[str] | tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"Unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(allowed)}.")


@dataclasses.dataclass
class StrictConfig:
    """Base for every config: ``from_dict`` names any unknown key, ``validate`` checks ranges."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, where: str | None = None) -> T:
        data = dict(data or {})
        if not isinstance(data, dict):
            raise RecipeError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}.")
        reject_unknown_keys(data, cls.field_names(), where or cls.__name__)
        try:
            config = cls(**data)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors are programming errors
            raise RecipeError(f"{where or cls.__name__}: {exc}") from exc
        config.validate()
        return config

    def validate(self) -> None:
        """Raise RecipeError for out-of-range values. Subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def non_default_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what a user actually asked for)."""
        out = {}
        for f in dataclasses.fields(self):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            )
            value = getattr(self, f.name)
            if value != default:
                out[f.name] = value
        return out


@dataclasses.dataclass
class TextSourceFields:
    """Where text comes from: a built-in name, local file(s), a list of strings, or a dataset id (how to read it)."""

    source: Any = "fortunes"
    text_field: str = "text"
    split: str = "train"
    dataset_config: str | None = None
    data_files: Any = None

    def source_kwargs(self) -> dict[str, Any]:
        return {
            "text_field": self.text_field,
            "split": self.split,
            "dataset_config": self.dataset_config,
            "data_files": self.data_files,
        }
