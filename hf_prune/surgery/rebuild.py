"""Rebuild a model as a new class / config from its (edited) tensors, and put it back where the original was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.offload import _tensor_names, offload_hooks
from ..utils import logger

# Keys a rebuilt model may lack in the old state dict: non-persistent rotary tables.
_IGNORED_MISSING = ("rotary_emb.inv_freq",)


def materialized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every offloaded (meta) tensor replaced by its value in accelerate's weights map
    (CPU memory or the disk offload, as the offload hooks hold it after pruning); tensors on devices stay there."""
    state = model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    for module, hook in offload_hooks(model):
        prefix = f"{names[id(module)]}." if names[id(module)] else ""
        for name in _tensor_names(module, hook):
            if state.get(prefix + name) is not None and state[prefix + name].device.type == "meta":
                state[prefix + name] = hook.weights_map[name]
    still = [k for k, v in state.items() if v.device.type == "meta"]
    if still:
        raise RuntimeError(f"Cannot read {still[:3]} of the offloaded model (meta tensors without a weights map).")
    return state


def updated_config(config, updates: dict):
    """A new config of ``config``'s class with ``updates`` applied to its language model's part (a VLM's nested
    text config; the config itself for a text model)."""
    data = config.to_dict()
    text = config.get_text_config()
    if text is config:
        data.update(updates)
    else:
        key = next((k for k, v in vars(config).items() if v is text), None)
        if key is None:
            raise ValueError(f"{type(config).__name__}: its language model's config is nested deeper than one level")
        data[key] = {**data[key], **updates}
    return type(config).from_dict(data)


def parameter_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def skeleton(model: nn.Module, config) -> nn.Module:
    """The model ``config`` describes, of ``model``'s class, with no memory behind its weights (to compare shapes)."""
    with torch.device("meta"):
        return type(model)._from_config(config)


@dataclass
class Dispatch:
    """How accelerate placed a model, so that a rebuilt one can be placed the same way."""

    kind: str  # "none", "device_map" or "offload" (cpu_offload / hf_prune's onloading)
    device_map: dict | None = None
    execution_device: torch.device | None = None
    onloaded: str | None = None

    @classmethod
    def of(cls, model: nn.Module) -> Dispatch:
        device_map = getattr(model, "hf_device_map", None)
        onloaded = getattr(model, "hf_prune_onloaded", None)
        offloaded = next(offload_hooks(model), None)
        if device_map and (len(set(device_map.values())) > 1 or offloaded is not None):
            return cls("device_map", dict(device_map), onloaded=onloaded)
        if offloaded is not None:
            return cls("offload", execution_device=torch.device(offloaded[1].execution_device), onloaded=onloaded)
        return cls("none")

    def apply(self, model: nn.Module) -> nn.Module:
        from accelerate import cpu_offload, dispatch_model

        if self.kind == "offload":
            model.to("cpu")
            cpu_offload(model, execution_device=self.execution_device)
        elif self.kind == "device_map":
            device_map = {k: ("cpu" if v == "disk" else v) for k, v in self.device_map.items()}
            if device_map != self.device_map:
                logger.warning(
                    "The rebuilt model keeps its disk-offloaded modules in CPU memory (the offload folder holds the "
                    "old shapes); reload the saved model with your device_map to offload them again."
                )
            skip = getattr(model, "_skip_keys_device_placement", None)
            dispatch_model(model, device_map=device_map, skip_keys=skip)
        if self.onloaded:
            model.hf_prune_onloaded = self.onloaded
        return model


def rebuild_model(
    model: nn.Module,
    build: Callable[[], nn.Module],
    who: str,
    *,
    allow_missing: Callable[[str], bool] | None = None,
    fill_missing: Callable[[nn.Module, str], torch.Tensor] | None = None,
    edit_state: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> nn.Module:
    """The model ``build()`` makes (called under the meta device: no memory, no random init), holding ``model``'s
    tensors as they are (dtype and device kept, offloaded ones read from their weights map), placed again the way
    ``model`` was.

    Args:
        model: the edited model (its tensors already have the new shapes).
        build: makes the new, empty model (e.g. ``lambda: type(model)(new_config)``).
        who: the step, for error messages.
        allow_missing: keys of the new model the old one may lack (filled by ``fill_missing``).
        fill_missing: ``(owner module, leaf name) -> tensor`` for those keys (e.g. zero biases).
        edit_state: edits the materialized state dict in place before it is loaded (e.g. cuts hidden channels out
            of every tensor that holds them).
    """
    dispatch = Dispatch.of(model)
    state = materialized_state_dict(model)
    if edit_state is not None:
        edit_state(state)
    with torch.device("meta"):
        new_model = build()
    missing, unexpected = new_model.load_state_dict(state, strict=False, assign=True)
    del state
    missing = [k for k in missing if not k.endswith(_IGNORED_MISSING)]
    bad = [k for k in missing if allow_missing is None or not allow_missing(k)]
    if bad or unexpected:
        raise RuntimeError(f"{who}: the rebuilt model does not match: missing {bad[:5]}, unexpected {unexpected[:5]}")
    for key in missing:
        owner_name, _, leaf = key.rpartition(".")
        owner = new_model.get_submodule(owner_name)
        owner._parameters[leaf] = nn.Parameter(fill_missing(owner, leaf), requires_grad=False)
    _carry_buffers(new_model, model)
    if getattr(new_model.config, "tie_word_embeddings", False):
        new_model.tie_weights()
    for p in new_model.parameters():
        p.requires_grad_(False)
    new_model.eval()
    if hasattr(model.config, "pruning_config"):
        new_model.config.pruning_config = model.config.pruning_config
    new_model.name_or_path = getattr(model, "name_or_path", "")
    if getattr(model, "generation_config", None) is not None:
        new_model.generation_config = model.generation_config
    if dispatch.kind != "none":
        dispatch.apply(new_model)
    return new_model


def _carry_buffers(new_model: nn.Module, old_model: nn.Module) -> None:
    """Buffers the state dict does not hold (non-persistent rotary tables) come from the old model, on its device."""
    old = dict(old_model.named_buffers())
    for name, buf in list(new_model.named_buffers()):
        if buf.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            module = new_model.get_submodule(owner) if owner else new_model
            scalar = getattr(module, f"scalar_{leaf}", None)  # transformers fills it from this (Gemma's embed_scale)
            if name in old and old[name].device.type != "meta":
                module._buffers[leaf] = old[name].clone()
                if scalar is not None:
                    module._buffers[leaf].fill_(scalar)
            else:
                device = next((t.device for t in old.values() if t.device.type != "meta"), torch.device("cpu"))
                module._buffers[leaf] = _rebuilt_buffer(module, leaf, buf).to(device)


def _rebuilt_buffer(module: nn.Module, leaf: str, meta: torch.Tensor) -> torch.Tensor:
    """A buffer the old model did not have materialized: rebuild the module on the CPU to get its value."""
    config = getattr(module, "config", None)
    if config is not None:
        try:
            rebuilt = type(module)(config=config)
            value = rebuilt._buffers.get(leaf)
            if value is not None and value.shape == meta.shape:
                return value
        except Exception:  # noqa: BLE001 - fall back to zeros below, as transformers' own init would
            pass
    return torch.zeros(meta.shape, dtype=meta.dtype)
