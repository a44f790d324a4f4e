"""The method matrix the placement tests run on every device and dtype: one step per method, tiny-model sized."""

DENSE = {
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "wanda-2of4": {"method": "wanda", "structure": "2:4"},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-2of4": {"method": "sparsegpt", "structure": "2:4"},
    "owl": {"method": "wanda", "sparsity": 0.6, "sparsity_profile": "owl", "owl_lambda": 0.05},
    "reconstruct": {"method": "sparsegpt", "structure": "2:4", "reconstruct": {"batch_size": 2}},
    "width-ls": {"method": "width", "mlp": 0.5},
    "width-bias": {"method": "width", "mlp": 0.5, "compensate": "bias"},
    "width-per-block": {"method": "width", "mlp": 0.5, "per_block": True},
    "width-heads": {"method": "width", "heads": 0.5},
    "width-hidden": {"method": "width", "hidden": 0.25, "mlp": 0.25},
    "depth": {"method": "depth", "num_blocks": 1},
    "shrink": {"method": "shrink", "params": 0.99, "depth_shares": [0, 1], "eval_nsamples": 2},
    "slicegpt": {"method": "slicegpt", "slicing": 0.25},
}
MOE = {
    "moe-wanda": {"method": "wanda", "sparsity": 0.5},
    "moe-sparsegpt-2of4": {"method": "sparsegpt", "structure": "2:4"},
    "experts": {"method": "experts", "criterion": "reap", "num_experts": 2},
    "moe-width": {"method": "width", "mlp": 0.25},
}


def zeros_of(model):
    """Where each 2-D block weight is zero (on the CPU), by name."""
    return {n: (p == 0).cpu() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n}
