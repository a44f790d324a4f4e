"""Pruning methods register here by name: ``register_method("wanda", WandaConfig, WandaMethod)``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RecipeError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type
    method_cls: type


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type, method_cls: type) -> None:
    """Make a pruning method available to recipes and the CLI under ``name`` (a built-in's name is taken)."""
    _load_builtin_methods()
    _add(name, config_cls, method_cls)


def _add(name: str, config_cls: type, method_cls: type) -> None:
    if name in _METHODS and _METHODS[name].method_cls is not method_cls:
        raise ValueError(f"A pruning method named '{name}' is already registered.")
    _METHODS[name] = MethodEntry(name, config_cls, method_cls)


def get_method(name: str) -> MethodEntry:
    _load_builtin_methods()
    if name not in _METHODS:
        raise RecipeError(f"Unknown pruning method '{name}'. Available: {', '.join(available_methods())}.")
    return _METHODS[name]


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def _load_builtin_methods() -> None:
    """Register the built-in methods on first use (importing them pulls in torch and transformers)."""
    from .methods import BUILTIN_METHODS

    for name, config_cls, method_cls in BUILTIN_METHODS:
        _add(name, config_cls, method_cls)
