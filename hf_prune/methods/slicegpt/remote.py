"""The modeling file written next to a sliced checkpoint, so ``from_pretrained(..., trust_remote_code=True)``, lm-eval
and pipelines load it: the base architecture's own classes plus ``runtime.py`` (copied verbatim)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from ...utils import cache_dir
from . import runtime

MODULE_NAME = "modeling_hf_prune_sliced"

_CLASSES = '''

from transformers import {config_cls} as _BaseConfig
from transformers import {model_cls} as _BaseForCausalLM


class HFPruneSlicedConfig(_BaseConfig):
    model_type = "{model_type}"


class HFPruneSlicedForCausalLM(_BaseForCausalLM):
    """{model_cls} with the width slicing of hf_prune (SliceGPT-style): smaller residual stream, and per-block
    shortcut matrices where consecutive blocks use different rotations."""

    config_class = HFPruneSlicedConfig

    def __init__(self, config):
        super().__init__(config)
        apply_slicing(self, config.hf_prune_slicing)
'''


PREFIX = "hf_prune_sliced_"


def sliced_model_type(base_model_type: str) -> str:
    return f"{PREFIX}{base_model_type}"


def render(config_cls: str, model_cls: str, base_model_type: str) -> str:
    header = f'"""Written by hf_prune: a width-sliced {model_cls}. Load with trust_remote_code=True."""\n\n'
    source = inspect.getsource(runtime).split('"""', 2)[2]  # the runtime without its own docstring
    body = _CLASSES.format(config_cls=config_cls, model_cls=model_cls, model_type=sliced_model_type(base_model_type))
    return header + source.strip() + "\n" + body


def sliced_classes(base_model) -> tuple[type, type]:
    """(config class, model class) of the sliced variant of ``base_model``'s architecture, importable from a file
    (transformers copies that file into the checkpoint and writes ``auto_map``)."""
    return _classes(type(base_model.config).__name__, type(base_model).__name__, base_model.config.model_type)


def with_modeling_file(model, spec: dict):
    """An empty model of ``model``'s architecture under hf_prune's modeling file, shaped by ``spec`` (resized
    modules, added biases, shortcuts, attention groups): what saves with ``auto_map``. Build it under the meta
    device (``surgery.rebuild_model`` does)."""
    config_cls, model_cls = sliced_classes(model)
    data = model.config.to_dict()
    data.pop("model_type", None)
    data["hf_prune_slicing"] = spec
    return model_cls(config_cls.from_dict(data))


def rebuild_with_modeling_file(model, spec: dict, who: str):
    """``model``'s (edited) tensors in the modeling-file class ``spec`` describes, through the one surgery path."""
    from ...surgery import rebuild_model

    sliced_classes(model)  # written and imported before the meta-device build
    return rebuild_model(model, lambda: with_modeling_file(model, spec), who)


def load_sliced(path: str, config_dict: dict, **kwargs):
    """Load a sliced checkpoint with hf_prune's own copy of the modeling code (never the checkpoint's file)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base_type = config_dict["model_type"][len(PREFIX) :]
    config_cls = CONFIG_MAPPING[base_type]
    model_cls = AutoModelForCausalLM._model_mapping[config_cls]
    kwargs.pop("trust_remote_code", None)
    return _classes(config_cls.__name__, model_cls.__name__, base_type)[1].from_pretrained(path, **kwargs)


def _classes(config_name: str, model_name: str, base_type: str) -> tuple[type, type]:
    text = render(config_name, model_name, base_type)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(cache_dir()) / "remote_code" / digest
    path = folder / f"{MODULE_NAME}.py"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    name = f"hf_prune_remote_{digest}.{MODULE_NAME}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    config_cls, model_cls = module.HFPruneSlicedConfig, module.HFPruneSlicedForCausalLM
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModelForCausalLM")
    return config_cls, model_cls
