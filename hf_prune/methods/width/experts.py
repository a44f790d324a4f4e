"""MLP width of mixture-of-experts models: every routed expert keeps the same number of intermediate neurons (its own
best, scored on the tokens the router sends it), its down projection refit by least squares on them; shared experts
and dense blocks narrow as MLPs. Which config key holds each width is found by value, and what the narrower config
describes (its meta skeleton) gives each block's target widths, so a family whose shared expert derives its width
from the experts' (DeepSeek: n_shared_experts x moe_intermediate_size) follows by itself."""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import ExpertRef, ModelAdapter
from ...adapters.experts import expert_count, is_fused
from ...calibration.engine import BlockStep
from ...calibration.expert_stats import ExpertStatistics
from ...calibration.experts import ROUTED
from ...errors import UnsupportedModelError
from .scores import ChannelStats, channel_scores, keep_top, refit_kept_columns, refit_summary

# config keys that may hold each kind of MLP width, most specific first
WIDTH_KEYS = {
    "experts": ("moe_intermediate_size", "intermediate_size", "expert_intermediate_size"),
    "shared": ("shared_expert_intermediate_size", "moe_intermediate_size", "intermediate_size"),
    "mlp": ("intermediate_size_mlp", "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"),
}
MIN_ROUTED_TOKENS = 16  # an expert routed fewer calibration tokens is scored on every token of its block


def block_widths(adapter: ModelAdapter, index: int) -> dict[str, int]:
    """The MLP widths of block ``index``: dense MLP (``mlp``), shared expert (``shared``), routed experts
    (``experts``), the ones it has."""
    refs = {r.role: r for r in adapter.linears(index)}
    widths = {}
    if "down" in refs:
        widths["mlp"] = refs["down"].in_features
    if "shared_down" in refs:
        widths["shared"] = refs["shared_down"].in_features
    downs = [r for r in adapter.experts(index) if r.role == "expert_down"]
    if downs:
        widths["experts"] = downs[0].in_features
    return widths


def width_updates(adapter: ModelAdapter, keep) -> dict[str, int]:
    """Config updates that narrow every MLP kind: ``keep(width) -> new width``; a kind whose width no config key
    holds is left to the keys it derives from (the skeleton then says what it becomes)."""
    config, updates = adapter.model.config.get_text_config(), {}
    for i in range(adapter.num_blocks):
        for kind, width in block_widths(adapter, i).items():
            key = next((k for k in WIDTH_KEYS[kind] if getattr(config, k, None) == width), None)
            if key is not None:
                updates.setdefault(key, keep(width))
    return updates


def unsupported_experts(adapter: ModelAdapter) -> str | None:
    for i in adapter.moe_blocks():
        experts = adapter.experts_module(i)
        if not is_fused(experts):
            return "its experts are a list of per-expert MLPs (remote code / older checkpoints), not fused tensors"
    return None


def narrowed_fused_shapes(adapter: ModelAdapter, index: int, width: int) -> dict[str, tuple[int, ...]]:
    """What block ``index``'s fused expert tensors become with ``width`` neurons per expert."""
    spec = adapter.moe_spec(index)
    layout = spec.layout
    experts = adapter.experts_module(index)
    old = next(r for r in adapter.experts(index) if r.role == "expert_down").in_features
    out = {}
    for name, p in experts.named_parameters(recurse=False):
        shape = list(p.shape)
        if name == (layout.gate_up or layout.up):
            factor = 2 if layout.gate_up else 1
            shape[2 if layout.transposed else 1] = factor * width
        elif name == layout.gate_up_bias:
            shape[1] = 2 * width
        elif name == layout.down:
            shape[1 if layout.transposed else 2] = width
        elif old in shape[1:]:
            raise UnsupportedModelError(
                f"width.mlp: {spec.experts}.{name} {tuple(shape)} also spans the experts' width {old}, in a layout "
                "hf_prune does not know how to narrow; remove whole experts with {method: experts} instead."
            )
        out[f"{spec.experts}.{name}"] = tuple(shape)
    return out


@torch.no_grad()
def narrow_routed_experts(
    step: BlockStep, adapter: ModelAdapter, width: int, criterion: str, least_squares: bool
) -> dict:
    """Score and cut every routed expert of the walked block to ``width`` neurons; returns the refit errors."""
    spec = adapter.moe_spec(step.index)
    layout = spec.layout
    experts = step.block.get_submodule(spec.experts)
    downs: list[ExpertRef] = sorted(
        (r for r in adapter.experts(step.index) if r.role == "expert_down"), key=lambda r: r.expert
    )
    old = downs[0].in_features
    collector = ExpertStatistics(
        step,
        spec,
        downs,
        lambda ref: ChannelStats(ref.in_features, ref.device, least_squares),
        ROUTED,
        MIN_ROUTED_TOKENS,
    )
    collector.accumulate()
    keeps, new_downs, errors = [], [], []
    for ref in downs:
        stats = collector.stats[ref.name]
        stats.all_reduce()
        weight = ref.weight().float()  # (hidden, old)
        keep = keep_top(channel_scores(criterion, stats, weight), width).to(weight.device)
        new = None
        if least_squares:
            new, error = refit_kept_columns(weight, stats.take_second_moment(weight.device), keep)
            errors.append(error)
        keeps.append(keep)
        new_downs.append((new if new is not None else weight[:, keep]).to(ref.parameter().dtype))
    _set_fused(experts, layout, keeps, new_downs, old, width)
    summary = {"tokens_per_expert": collector.summary()["tokens_per_expert"]}
    return {**summary, **refit_summary(errors)} if errors else summary


def _set_fused(experts: nn.Module, layout, keeps, new_downs, old: int, width: int) -> None:
    """Rebuild the fused tensors with each expert's kept neurons (gate and up rows alike, interleaved or not)."""
    first = layout.gate_up or layout.up

    def rows(keep: torch.Tensor) -> torch.Tensor:  # rows of the first matrix (gate and up) that stay
        if layout.gate_up is None:
            return keep
        if layout.interleaved:
            return torch.stack((2 * keep, 2 * keep + 1), 1).reshape(-1)
        return torch.cat((keep, keep + old))

    def replace(name: str, expert_matrix) -> None:
        """The fused tensor rebuilt expert by expert into one buffer of its dtype (no stacked float32 copy)."""
        param = getattr(experts, name)
        new = None
        for e in range(len(keeps)):
            matrix = expert_matrix(param, e)
            if new is None:
                new = torch.empty((len(keeps), *matrix.shape), dtype=param.dtype, device=param.device)
            new[e] = matrix
        experts._parameters[name] = nn.Parameter(new, requires_grad=False)

    dim = 1 if layout.transposed else 0  # the out dimension of one expert's matrix
    replace(first, lambda p, e: p[e].index_select(dim, rows(keeps[e]).to(p.device)))
    if layout.gate_up_bias is not None:
        replace(layout.gate_up_bias, lambda p, e: p[e].index_select(0, rows(keeps[e]).to(p.device)))
    replace(layout.down, lambda p, e: new_downs[e].t() if layout.transposed else new_downs[e])
    for attr in ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size"):
        if getattr(experts, attr, None) == old:
            setattr(experts, attr, width)
    assert expert_count(experts, layout) == len(keeps)
