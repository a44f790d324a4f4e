"""Visual-token pruning at inference for HF vision-language models, through their own ``forward`` and ``generate``.

Image tokens of the prompt are dropped before decoder block K (K = 0 for DivPrune / random / uniform, before the
language model; K = 2 by default for FastV, ranked by the attention they receive at block K-1). Kept tokens keep
their ORIGINAL positions (1-D or Qwen2-VL's 3-D M-RoPE), so with a 100% budget nothing changes, and generation
continues at the positions the unpruned prompt would have had.

Semantics: in the prefill, blocks < K see every prompt token and blocks >= K the kept ones; generated tokens see
only the kept ones, in every block. With the KV cache: after the prefill the cache of blocks < K is cut to the kept
tokens, and every decode step gets its 2-D attention mask cut and its position ids set to match. Without the cache,
each step re-runs the prompt, prunes the same tokens (the scores only look at prompt tokens), and in blocks < K masks
the pruned tokens out of the generated tokens' attention: the same tokens come out either way.

FastV's attention scores come from ONE extra eager attention call on block K-1 (with an explicit causal mask and no
cache), so SDPA / FlashAttention stay in use everywhere else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..errors import HFPruneError
from . import selection

STRATEGIES = ("fastv", "divprune", "random", "uniform")


@dataclass
class VisualTokenSettings:
    strategy: str = "fastv"
    keep: float | int = 0.25
    layer: int | None = None  # None: 2 for FastV, 0 otherwise
    score: str = "last"  # FastV queries: the last prompt token, or the mean over prompt text tokens after the image
    seed: int = 0

    @property
    def prune_before(self) -> int:
        if self.layer is not None:
            return self.layer
        return 2 if self.strategy == "fastv" else 0


@dataclass
class _Request:
    prompt_ids: torch.Tensor
    prompt_len: int
    kept: torch.Tensor | None = None  # (B, n') kept prompt positions
    next_pos: torch.Tensor | None = None  # (B,) original position of the first token after the prompt
    mrope: bool = False

    @property
    def n_kept(self) -> int:
        return int(self.kept.shape[1])


def image_token_id(config) -> int:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise HFPruneError(f"{type(config).__name__} names no image token id (image_token_id / image_token_index).")


def _gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Select positions ``index`` (B, n') along ``dim`` of a tensor whose dim 0 (or dim 1 for 3-D position ids) is
    the batch; a batch of 1 is broadcast."""
    batch = index.shape[0]
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    shape = [1] * x.ndim
    shape[0], shape[dim] = batch, index.shape[1]
    idx = index.view(shape).expand(*[x.shape[d] if d not in (0, dim) else shape[d] for d in range(x.ndim)])
    return x.gather(dim, idx.to(x.device))


def _prune_value(value: Any, index: torch.Tensor, length: int) -> Any:
    """Apply a token selection to one keyword argument of a decoder block (masks, positions, rotary tables)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_prune_value(v, index, length) for v in value)
    if not torch.is_tensor(value):
        return value
    if value.ndim == 4 and value.shape[-1] == length and value.shape[-2] == length:  # (B, 1, L, L) masks
        return _gather_seq(_gather_seq(value, index, 2), index, 3)
    if value.ndim == 3 and value.shape[0] in (3, 4) and value.shape[-1] == length:  # M-RoPE ids (3|4, B, L)
        return torch.stack([_gather_seq(v, index, 1) for v in value])
    if value.ndim == 3 and value.shape[1] == length:  # (B, L, D) rotary cos / sin
        return _gather_seq(value, index, 1)
    if value.ndim == 2 and value.shape[-1] == length:  # (B, L) position ids
        return _gather_seq(value, index, 1)
    return value


class VisualTokenPruner:
    """Installs the hooks that prune visual tokens on a loaded VLM; ``disable()`` removes them.

    Args:
        model: a vision-language model in the adapter table (LLaVA, Qwen2-VL, Idefics3/SmolVLM, Gemma 3).
        settings: strategy, budget (``keep``: a ratio or a count of image tokens), layer, FastV score, seed.
    """

    def __init__(self, model: nn.Module, settings: VisualTokenSettings):
        if settings.strategy not in STRATEGIES:
            raise HFPruneError(f"visual token strategy must be one of {STRATEGIES}, got {settings.strategy!r}.")
        self.model = model
        self.settings = settings
        self.adapter = ModelAdapter(model)
        if not self.adapter.is_vlm:
            raise HFPruneError(f"{type(model).__name__} is not a vision-language model in the adapter table.")
        self.image_token = image_token_id(model.config)
        self.k = settings.prune_before
        if not 0 <= self.k < self.adapter.num_blocks:
            raise HFPruneError(
                f"layer={self.k} is outside the language model's blocks 0..{self.adapter.num_blocks - 1}."
            )
        if settings.strategy == "fastv" and self.k == 0:
            raise HFPruneError("FastV ranks tokens by the attention of block K-1: use layer >= 1.")
        self.request: _Request | None = None
        self._step: dict[str, Any] | None = None
        self._scoring = False
        self.handles: list = []
        self.last_kept: int | None = None  # image tokens kept in the last prefill (for tests and benchmarks)

    # ------------------------------------------------------------------ lifecycle
    def enable(self) -> VisualTokenPruner:
        self.disable()
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._model_post, with_kwargs=True))
        for i, block in enumerate(self.adapter.blocks):
            hook = self._block_pre if i >= self.k else self._early_block_pre
            self.handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        if self.settings.strategy == "fastv":
            attention = self.adapter.blocks[self.k - 1].get_submodule(self.adapter.spec.attention)
            self.handles.append(attention.register_forward_pre_hook(self._score_pre, with_kwargs=True))
        m._hf_prune_visual_tokens = self
        return self

    def disable(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.request = None
        if getattr(self.model, "_hf_prune_visual_tokens", None) is self:
            del self.model._hf_prune_visual_tokens

    # ------------------------------------------------------------------ top level
    def _model_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_len = cache.get_seq_length() if cache is not None else 0
        self._step = None
        if input_ids is None:
            return None
        req = self.request
        if cache_len > 0:
            if req is None or req.kept is None:
                return None
            return args, self._decode_kwargs(kwargs, input_ids.shape[1], cache_len)
        image_mask = input_ids == self.image_token
        if not bool(image_mask.any()):
            self.request = None
            return None
        length = input_ids.shape[1]
        continuing = (
            req is not None
            and length > req.prompt_len
            and input_ids.shape[0] == req.prompt_ids.shape[0]
            and torch.equal(input_ids[:, : req.prompt_len], req.prompt_ids)
        )
        if not continuing:
            req = self.request = _Request(prompt_ids=input_ids.detach().clone(), prompt_len=length)
        prompt_image = image_mask[:, : req.prompt_len]
        counts = prompt_image.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise HFPruneError("Every row of a batch must hold the same number of image tokens to prune them.")
        self._step = {
            "length": length,
            "image_positions": [row.nonzero().flatten() for row in prompt_image],
            "attention_mask": kwargs.get("attention_mask"),
            "cache": cache,
            "prompt_len": req.prompt_len,
            "continuing": continuing and req.kept is not None,
        }
        return None

    def _decode_kwargs(self, kwargs: dict, new_tokens: int, cache_len: int) -> dict:
        req = self.request
        kwargs = dict(kwargs)
        t = cache_len - req.n_kept
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[1] == req.prompt_len + t + new_tokens:
            kwargs["attention_mask"] = torch.cat(
                [_gather_seq(mask[:, : req.prompt_len], req.kept, 1), mask[:, req.prompt_len :]], dim=1
            )
        device = req.next_pos.device
        positions = req.next_pos.view(-1, 1) + t + torch.arange(new_tokens, device=device).view(1, -1)
        kwargs["position_ids"] = positions.unsqueeze(0).expand(3, -1, -1) if req.mrope else positions
        return kwargs

    def _model_post(self, module, args, kwargs, output):
        step, self._step = self._step, None
        if step is None or "index" not in step:
            return None
        req, index = self.request, step["index"]
        cache = step["cache"]
        if cache is not None:
            self._cut_cache(cache, index, step["length"])
        kept_prompt = index[:, : index.shape[1] - (step["length"] - req.prompt_len)]
        req.kept = kept_prompt
        deltas = getattr(getattr(module, "model", None), "rope_deltas", None)
        req.mrope = torch.is_tensor(deltas)
        base = torch.full((index.shape[0],), req.prompt_len, dtype=torch.long, device=index.device)
        req.next_pos = base + deltas.view(-1).to(base.device).long() if req.mrope else base
        return None

    def _cut_cache(self, cache, index: torch.Tensor, length: int) -> None:
        """Blocks < K cached every prompt token; keep only the kept ones so all layers agree."""
        for layer in list(getattr(cache, "layers", []))[: self.k]:
            stored = layer.keys.shape[-2]
            if stored != length:
                raise HFPruneError(
                    f"The prompt ({length} tokens) is longer than a sliding-window cache layer before block {self.k}; "
                    "prune with layer=0 (DivPrune / random / uniform) or shorten the prompt."
                )
            idx = index.to(layer.keys.device).view(index.shape[0], 1, -1, 1)
            layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = index.shape[1]

    # ------------------------------------------------------------------ decoder blocks
    def _early_block_pre(self, module, args, kwargs):
        """Blocks < K, re-run without cache after the prompt: generated tokens must not see pruned image tokens."""
        step = self._step
        if step is None or not step["continuing"] or self.k == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if "early_mask" not in step:
            step["early_mask"] = {}
        original = kwargs.get("attention_mask")
        key = id(original)
        if key not in step["early_mask"]:
            step["early_mask"][key] = (original, self._restricted_mask(original, hidden, step))
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = step["early_mask"][key][1]
        return args, kwargs

    def _restricted_mask(self, original, hidden: torch.Tensor, step: dict) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        req = self.request
        blocked = torch.zeros(batch, length, length, dtype=torch.bool, device=hidden.device)
        for b, positions in enumerate(step["image_positions"]):
            pruned = torch.ones(length, dtype=torch.bool)
            pruned[req.kept[b].cpu()] = False
            pruned[req.prompt_len :] = False
            cols = (pruned & torch.isin(torch.arange(length), positions.cpu())).to(hidden.device)
            blocked[b, req.prompt_len :, :] = cols.view(1, -1)
        blocked = blocked.unsqueeze(1)
        if original is None:
            allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
            pad = step["attention_mask"]
            allowed = allowed.view(1, 1, length, length).expand(batch, 1, length, length)
            if torch.is_tensor(pad) and pad.ndim == 2:
                allowed = allowed & pad.bool().to(hidden.device).view(batch, 1, 1, length)
            if self.model.config.get_text_config()._attn_implementation == "eager":
                mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
                return mask.masked_fill(~(allowed & ~blocked), torch.finfo(hidden.dtype).min)
            return allowed & ~blocked
        if not torch.is_tensor(original) or original.ndim != 4:
            raise HFPruneError("Visual-token pruning without a KV cache needs 4-D (or no) attention masks; use_cache.")
        if original.dtype == torch.bool:
            return original & ~blocked
        return original.masked_fill(blocked, torch.finfo(original.dtype).min)

    def _select(self, hidden: torch.Tensor, step: dict) -> torch.Tensor:
        """(B, n') kept positions: all text tokens, and the image tokens the strategy keeps."""
        s = self.settings
        rows = []
        for b, positions in enumerate(step["image_positions"]):
            n = positions.numel()
            k = selection.budget(n, s.keep)
            if s.strategy == "fastv":
                local = selection.top_scores(step["scores"][b], k)
            elif s.strategy == "divprune":
                local = selection.max_min_diverse(hidden[b, positions.to(hidden.device)], k)
            elif s.strategy == "random":
                local = selection.random_subset(n, k, s.seed)
            else:
                local = selection.uniform_stride(n, k)
            keep_mask = torch.ones(step["length"], dtype=torch.bool)
            keep_mask[positions.cpu()] = False
            keep_mask[positions.cpu()[local.cpu()]] = True
            rows.append(keep_mask.nonzero().flatten())
        self.last_kept = selection.budget(step["image_positions"][0].numel(), s.keep)
        return torch.stack(rows).to(hidden.device)

    def _block_pre(self, module, args, kwargs):
        step = self._step
        if step is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if "index" not in step:
            step["index"] = self._select(hidden, step)
            step["memo"] = {}
        index, length = step["index"], step["length"]
        if hidden.shape[1] == length:
            hidden = _gather_seq(hidden, index, 1)
        memo = step["memo"]
        new_kwargs = {}
        for key, value in kwargs.items():
            if key == "hidden_states":
                continue
            ident = id(value)
            if ident not in memo:
                memo[ident] = (value, _prune_value(value, index, length))  # keep value alive: ids stay unique
            new_kwargs[key] = memo[ident][1]
        if args:
            return (hidden, *[_prune_value(a, index, length) for a in args[1:]]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    # ------------------------------------------------------------------ FastV scores
    @torch.no_grad()
    def _score_pre(self, module, args, kwargs):
        step = self._step
        if step is None or self._scoring or "scores" in step:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch, length = hidden.shape[:2]
        allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        allowed = allowed.view(1, 1, length, length).expand(batch, 1, length, length)
        pad = step["attention_mask"]
        if torch.is_tensor(pad) and pad.ndim == 2:
            allowed = allowed & pad.bool().to(hidden.device).view(batch, 1, 1, length)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        call = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        call["attention_mask"] = mask
        config = module.config
        eager = copy.copy(config)
        eager._attn_implementation = "eager"
        self._scoring = True
        try:
            module.config = eager
            _, weights = module.forward(hidden, *args[1:], **call)
        finally:
            module.config = config
            self._scoring = False
        if weights is None:
            raise HFPruneError(
                f"{type(module).__name__} returned no attention weights in eager mode; FastV needs them."
            )
        weights = weights.float().mean(dim=1)  # (B, L, L), mean over heads
        prompt_len = step["prompt_len"]
        scores = []
        for b, positions in enumerate(step["image_positions"]):
            if self.settings.score == "last":
                queries = torch.tensor([prompt_len - 1])
            else:
                after = torch.arange(int(positions.min()) + 1, prompt_len)
                is_image = torch.zeros(prompt_len, dtype=torch.bool)
                is_image[positions.cpu()] = True
                queries = after[~is_image[after]]
            scores.append(weights[b][queries.to(weights.device)][:, positions.to(weights.device)].mean(dim=0))
        step["scores"] = scores
        return None


def enable_visual_token_pruning(
    model: nn.Module,
    strategy: str = "fastv",
    keep: float | int = 0.25,
    layer: int | None = None,
    score: str = "last",
    seed: int = 0,
) -> VisualTokenPruner:
    """One call on any loaded VLM: prune its visual tokens in every forward / generate from now on.

    Args:
        strategy: ``fastv`` (attention received at block ``layer`` - 1), ``divprune`` (max-min diverse subset of the
            image embeddings, before the language model), ``random`` or ``uniform`` (baselines).
        keep: the budget: a ratio in (0, 1] of the image tokens, or a count.
        layer: prune before this decoder block (default 2 for FastV, 0 for the others).
        score: FastV's query: ``last`` prompt token or ``text_mean`` (prompt text tokens after the image).
        seed: for ``random``.

    Returns the pruner; ``.disable()`` restores the model.
    """
    existing = getattr(model, "_hf_prune_visual_tokens", None)
    if existing is not None:
        existing.disable()
    return VisualTokenPruner(model, VisualTokenSettings(strategy, keep, layer, score, seed)).enable()
