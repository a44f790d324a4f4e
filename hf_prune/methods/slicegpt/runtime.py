"""What a sliced model needs at run time beyond its base architecture. Self-contained (torch only): this file is
copied verbatim into the modeling file written next to a sliced checkpoint, and hf_prune uses the same code.

A slicing spec (``config.hf_prune_slicing``) says:
  resize:        {module path: new shape}  Linear [out, in], Embedding [num, dim], norm [dim]
  rms_layernorm: [module paths]            LayerNorms that stop subtracting the mean (SliceGPT's RMSN)
  shortcuts:     blocks path or null       per-block rotations: each block holds two d' x d' matrices:
                                           ``hf_prune_shortcut`` maps its input to its output basis (the residual),
                                           ``hf_prune_mlp_shortcut`` maps the stream into the MLP's input basis
  attn_in_norm:  path of the attention-input norm inside a block (it reads the block input as it came in)
  mlp_in_norm:   path of the MLP-input norm inside a block
  add_bias:      [module paths]            Linears that gain a bias (a LayerNorm shift folded into them)
"""

import torch
from torch import nn


class RMSLayerNorm(nn.LayerNorm):
    """A LayerNorm that does not subtract the mean: x / sqrt(mean(x^2) + eps) * weight + bias."""

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.to(dtype)
        if self.weight is not None:
            h = h * self.weight
        if self.bias is not None:
            h = h + self.bias
        return h


def _new_param(old, shape):
    return nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def resize_module(module, shape):
    """Give ``module`` parameters of a new shape (values are set afterwards, or loaded from a checkpoint)."""
    if isinstance(module, nn.Linear):
        out_features, in_features = shape
        module.weight = _new_param(module.weight, (out_features, in_features))
        if module.bias is not None:
            module.bias = _new_param(module.bias, (out_features,))
        module.in_features, module.out_features = in_features, out_features
    elif isinstance(module, nn.Embedding):
        module.weight = _new_param(module.weight, tuple(shape))
        module.embedding_dim = shape[1]
    else:  # a norm over the hidden dimension
        (dim,) = shape
        module.weight = _new_param(module.weight, (dim,))
        if getattr(module, "bias", None) is not None:
            module.bias = _new_param(module.bias, (dim,))
        if hasattr(module, "normalized_shape"):
            module.normalized_shape = (dim,)


def _replace(root, path, new):
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def to_rms_layernorm(root, path):
    """Swap the nn.LayerNorm at ``path`` for an RMSLayerNorm with the same parameters."""
    old = root.get_submodule(path)
    if isinstance(old, RMSLayerNorm):
        return
    new = RMSLayerNorm(
        old.normalized_shape,
        eps=old.eps,
        elementwise_affine=old.elementwise_affine,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        if old.weight is not None:
            new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _replace(root, path, new)


def _block_pre_hook(block, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    block._hf_prune_stream = hidden
    moved = hidden @ block.hf_prune_shortcut.to(hidden.dtype)
    if args:
        return (moved,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = moved
    return args, kwargs


def _mlp_pre_hook(norm, args):
    hidden = args[0]
    return (hidden @ norm._hf_prune_block.hf_prune_mlp_shortcut.to(hidden.dtype),) + tuple(args[1:])


def _attach_shortcuts(block, attn_in_norm, mlp_in_norm):
    """The residual carries the block input times ``hf_prune_shortcut`` (the output basis); the attention norm
    reads the input as it came in; the MLP norm reads the stream times ``hf_prune_mlp_shortcut``."""
    norm = block.get_submodule(attn_in_norm)

    def norm_pre_hook(module, args):
        stream = block._hf_prune_stream
        block._hf_prune_stream = None
        return (stream,) + tuple(args[1:])

    block.register_forward_pre_hook(_block_pre_hook, with_kwargs=True)
    norm.register_forward_pre_hook(norm_pre_hook)
    mlp_norm = block.get_submodule(mlp_in_norm)
    object.__setattr__(mlp_norm, "_hf_prune_block", block)  # a plain reference, not a submodule
    mlp_norm.register_forward_pre_hook(_mlp_pre_hook)


def add_shortcuts(block, dim, attn_in_norm, mlp_in_norm, residual=None, mlp=None):
    ref = next(block.parameters())
    for name, value in (("hf_prune_shortcut", residual), ("hf_prune_mlp_shortcut", mlp)):
        data = torch.empty(dim, dim, dtype=ref.dtype, device=ref.device) if value is None else value.to(ref.dtype)
        block.register_parameter(name, nn.Parameter(data, requires_grad=False))
    block._hf_prune_stream = None
    _attach_shortcuts(block, attn_in_norm, mlp_in_norm)


def apply_slicing(model, spec):
    """Turn a freshly built base model into the sliced architecture described by ``spec``."""
    for path in spec.get("rms_layernorm") or []:
        to_rms_layernorm(model, path)
    for path in spec.get("add_bias") or []:
        linear = model.get_submodule(path)
        linear.bias = _new_param(linear.weight, (linear.out_features,))
    for path, shape in (spec.get("resize") or {}).items():
        resize_module(model.get_submodule(path), shape)
    for path, groups in (spec.get("attention_groups") or {}).items():  # query heads per KV head, per block
        model.get_submodule(path).num_key_value_groups = groups
    blocks_path = spec.get("shortcuts")
    if blocks_path:
        for block in model.get_submodule(blocks_path):
            add_shortcuts(block, spec["hidden"], spec["attn_in_norm"], spec["mlp_in_norm"])
