"""Where a family records its widths, and whether its config can describe the narrowed model: the table's row, or
one derived from what the adapter knows (roles of the linears, the config's size keys), checked by building the
narrowed model's skeleton on the meta device and comparing every parameter shape of a block."""

from __future__ import annotations

from torch import nn

from ...adapters import WIDTH_FAMILIES, ModelAdapter, WidthSpec, is_transposed, weight_out_in
from ...errors import UnsupportedModelError
from ...surgery import parameter_shapes, skeleton, updated_config

MLP_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


def width_spec(model: nn.Module, adapter: ModelAdapter) -> WidthSpec:
    """The table's row for the family, or one derived from the config (verified later by ``plan_mismatch``)."""
    row = WIDTH_FAMILIES.get(getattr(adapter, "text_model_type", None) or adapter.family)
    if row is not None:
        return row
    roles = {r.role for r in adapter.linears(0)}
    config = model.config.get_text_config()
    if adapter.moe_blocks():  # MLP widths: experts.width_updates finds their keys; heads need q, k, v and o
        return WidthSpec(
            mlp_key="",
            heads={"q", "k", "v", "o"} <= roles,
            attention_bias_key="attention_bias" if hasattr(config, "attention_bias") else None,
        )
    if adapter.spec is None or not {"down", "o"} <= roles:
        raise UnsupportedModelError(
            f"width: {adapter.family} has no layout hf_prune knows (the roles of its block's linears: "
            f"{sorted(roles)}); add a row to hf_prune/adapters/table.py."
        )
    down = next(r for r in adapter.linears(0) if r.role == "down")
    key = next((k for k in MLP_KEYS if getattr(config, k, None) == down.in_features), None)
    if key is None:
        raise UnsupportedModelError(
            f"width: no config key of {adapter.family} ({', '.join(MLP_KEYS)}) holds its MLP width "
            f"{down.in_features}, so a narrower MLP cannot be saved as a plain checkpoint."
        )
    return WidthSpec(
        mlp_key=key,
        heads=True,
        mlp_bias_key="mlp_bias" if hasattr(config, "mlp_bias") else None,
        attention_bias_key="attention_bias" if hasattr(config, "attention_bias") else None,
    )


def narrowed_skeleton(model: nn.Module, updates: dict) -> tuple[nn.Module | None, str | None]:
    """The model ``updates`` describe, on meta (no memory); or None and why the config class refuses them."""
    try:
        return skeleton(model, updated_config(model.config, updates)), None
    except Exception as exc:  # noqa: BLE001 - the config class refuses the widths: say why
        return None, f"{type(model.config).__name__} refuses {updates}: {str(exc).strip().splitlines()[-1]}"


def plan_mismatch(
    model: nn.Module,
    adapter: ModelAdapter,
    narrowed: nn.Module,
    rows: dict[str, int],
    cols: dict[str, int],
    stream: dict[str, int] | None = None,
    stream_width: int | None = None,
    extra: dict[str, tuple[int, ...]] | None = None,
) -> str | None:
    """Compare every parameter shape of ``narrowed`` (the skeleton the new config describes) with the ones the cut
    leaves: ``rows``/``cols`` give the new output / input width per role of every block's linears, ``stream`` the
    dimension of each state-dict key that narrows to ``stream_width`` (hidden channels), ``extra`` the new shapes of
    other tensors (fused experts). The first difference, or
    None. Biases only the new config has are fine (a bias flag turned on: zero-filled)."""
    expected = parameter_shapes(model)
    for ref in adapter.all_linears():
        out_features, in_features = weight_out_in(ref.module).shape
        out_features = rows.get(ref.role, out_features)
        in_features = cols.get(ref.role, in_features)
        shape = (in_features, out_features) if is_transposed(ref.module) else (out_features, in_features)
        expected[f"{ref.name}.weight"] = shape
        if ref.module.bias is not None:
            expected[f"{ref.name}.bias"] = (out_features,)
    expected.update(extra or {})
    for key, dim in (stream or {}).items():
        if key in expected:
            shape = list(expected[key])
            shape[dim] = stream_width
            expected[key] = tuple(shape)
    got = parameter_shapes(narrowed)
    for name in sorted(set(expected) | set(got)):
        if name not in got:
            return f"{name} would be missing on reload"
        if name not in expected:
            if name.endswith(".bias"):
                continue
            return f"{name} would appear on reload"
        if expected[name] != got[name]:
            return f"{name} would be {expected[name]} after the cut, but the config describes {got[name]}"
    return None
