"""Per-expert statistics for weight pruning: one hook on a block's experts module feeds every routed expert.

For each expert, the gate and up matrices read the tokens the router sent to it (``moe_calibration: routed``) or every
token of the block (``all``: statistics only, the block's output is what the model computes); the down matrix reads
act(gate) * up of those tokens, recomputed from the expert's current matrices. An expert routed fewer than
``min_tokens`` tokens (or none at all) is calibrated on every token of the block instead (reported as a fallback).

Two modes, matching the linears' orchestration: ``prune`` given (true-sequential, one forward): each expert is pruned
inside the hook as its inputs arrive, gate/up first, then down on the pruned gate/up's outputs, and the block's
forward goes on with the pruned experts; no ``prune`` (parallel): statistics accumulate over every chunk and the
caller prunes afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import distributed
from ..adapters import MoESpec, WeightRef
from ..adapters.experts import expert_count, is_fused
from .engine import BlockStep, hooks
from .experts import (
    ALL,
    ROUTED,
    ExpertCall,
    ParentInput,
    expert_call_hooks,
    expert_hidden,
    mlp_hidden,
)


class ExpertStatistics:
    """Statistics of the targeted routed experts of one MoE block.

    Args:
        step: the block being walked.
        spec: its MoE layout.
        refs: the targeted expert matrices of this block (fused views, or per-expert linears).
        make_stats: a fresh statistics object for a target (``update(x)``), or None when the method needs none.
        mode: ``routed`` or ``all``.
        min_tokens: below this many routed tokens an expert is calibrated on all tokens.
    """

    def __init__(
        self,
        step: BlockStep,
        spec: MoESpec,
        refs: list[WeightRef],
        make_stats: Callable[[WeightRef], Any],
        mode: str = ROUTED,
        min_tokens: int = 0,
    ):
        self.step, self.spec, self.make_stats = step, spec, make_stats
        self.mode, self.min_tokens = mode, min_tokens
        self.experts = step.block.get_submodule(spec.experts)
        self.fused = is_fused(self.experts)
        self.num_experts = expert_count(self.experts, spec.layout)
        self.by_expert: dict[int, list[WeightRef]] = {}
        for ref in refs:
            self.by_expert.setdefault(ref.expert, []).append(ref)
        self.tokens = [0] * self.num_experts
        self.fallback: list[int] = []
        self.stats: dict[str, Any] = {}
        # per-expert MLPs see only their routed tokens: every token comes from the module holding them
        self._parent = None if self.fused else ParentInput(step.block, spec.experts)

    # ------------------------------------------------------------------ passes
    def groups(self, stats_bytes: Callable[[WeightRef], int], budget: int) -> list[set[int]]:
        """The targeted experts in groups whose statistics take at most ``budget`` bytes together (one expert at
        least), for ``accumulate`` one group at a time: 256 experts' 7168-wide Hessians would be 52 GB at once."""
        groups: list[set[int]] = []
        used = budget + 1
        for e in sorted(self.by_expert):
            refs = self.by_expert[e]
            readers = [r for r in refs if r.role != "expert_down"][:1]  # gate/up share their statistics
            size = sum(stats_bytes(r) for r in readers + [r for r in refs if r.role == "expert_down"])
            if used + size > budget:
                groups.append(set())
                used = 0
            groups[-1].add(e)
            used += size
        return groups

    def accumulate(self, keep_outputs: bool = False, experts: set[int] | None = None) -> list[torch.Tensor] | None:
        """One forward of the block over every chunk that collects the statistics of ``experts`` (default: every
        targeted expert); then those under ``min_tokens`` are recollected on all tokens (one more forward, only if
        any). Returns the block's outputs if ``keep_outputs``. Each expert's statistics depend on its own inputs
        only, so collecting them a group at a time gives the same statistics."""
        experts = set(self.by_expert) if experts is None else experts
        outputs = self._forward(None, experts, count=True, keep_outputs=keep_outputs)
        if distributed.active():  # an expert no token of this rank reached: empty statistics, as the other ranks have
            hidden = self.step.inputs[0]
            for e in sorted(experts):
                if not any(r.name in self.stats for r in self.by_expert[e]):
                    self._update(e, hidden.new_zeros(0, hidden.shape[-1]), None)
        order = sorted(experts)
        counts = distributed.all_reduce_numbers(*[self.tokens[e] for e in order])
        for e, n in zip(order, counts):
            self.tokens[e] = int(n)
        if self.mode == ROUTED:
            fallback = [e for e in order if self.tokens[e] < max(self.min_tokens, 1)]
            if fallback:
                self.fallback += fallback
                for e in fallback:
                    for ref in self.by_expert[e]:
                        self.stats.pop(ref.name, None)
                self._forward(None, set(fallback), count=False, mode=ALL)
        return outputs

    def prune_during(self, prune: Callable[[WeightRef, Any], None]) -> list[torch.Tensor]:
        """One forward in which every expert is pruned as its inputs arrive; returns the block's outputs."""
        return self._forward(prune, set(self.by_expert), count=True, keep_outputs=True)

    def _forward(self, prune, experts: set[int], count: bool, mode: str | None = None, keep_outputs: bool = False):
        mode = mode or self.mode
        if not self.fused:
            return self._forward_per_expert(prune, experts, count, mode, keep_outputs)

        def on_call(call: ExpertCall) -> None:
            order = sorted(experts)
            routed = {e: call.routed(e)[0] for e in order}
            counts = [routed[e].shape[0] for e in order]
            if prune is not None:  # decisions on the tokens of every rank, so all ranks prune alike
                counts = [int(n) for n in distributed.all_reduce_numbers(*counts)]
            for e, n in zip(order, counts):
                if count:
                    self.tokens[e] += n  # this rank's tokens; every rank's when pruning here
                x = call.hidden if mode == ALL else routed[e]
                if prune is not None and mode == ROUTED and n < max(self.min_tokens, 1):
                    x = call.hidden
                    self.fallback.append(e)
                self._update(e, x, prune)

        with hooks(expert_call_hooks(self.step.block, self.spec, on_call)):
            return self.step.forward(keep_outputs=keep_outputs)

    def _forward_per_expert(self, prune, experts: set[int], count: bool, mode: str, keep_outputs: bool):
        """ModuleList layout: the block calls each expert's MLP on its routed tokens (a pre-hook on each), the MoE
        module's input holds every token (``all``, and the fallback for experts routed too few tokens)."""
        seen: set[int] = set()

        def every_token() -> torch.Tensor:
            return self._parent.hidden.reshape(-1, self._parent.hidden.shape[-1])

        def expert_hook(e: int):
            def hook(module, args, kwargs):
                x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
                x = x.reshape(-1, x.shape[-1])
                if e not in experts:
                    return
                if count:
                    self.tokens[e] += x.shape[0]
                if mode == ALL:
                    return
                if prune is not None and x.shape[0] < max(self.min_tokens, 1):
                    x = every_token()
                    self.fallback.append(e)
                seen.add(e)
                self._update(e, x, prune)

            return hook

        def before(module, args, kwargs):
            if mode == ALL:
                for e in sorted(experts):
                    self._update(e, every_token(), prune)

        def after(module, args, kwargs, output):  # one pass: experts the router never chose
            if mode == ROUTED and prune is not None:
                for e in sorted(experts - seen):
                    self.fallback.append(e)
                    self._update(e, every_token(), prune)

        parent = self._parent.module
        handles = [self._parent.hook(), parent.register_forward_pre_hook(before, with_kwargs=True)]
        handles.append(parent.register_forward_hook(after, with_kwargs=True))
        handles += [m.register_forward_pre_hook(expert_hook(e), with_kwargs=True) for e, m in enumerate(self.experts)]
        with hooks(handles):
            return self.step.forward(keep_outputs=keep_outputs)

    def _hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return expert_hidden(self.experts, self.spec.layout, e, x)
        return mlp_hidden(self.experts[e], self.spec.layout, x)

    def _update(self, e: int, x: torch.Tensor, prune) -> None:
        """Feed expert ``e``'s statistics with inputs ``x``; with ``prune``, prune its matrices right away and keep
        nothing (one expert's statistics in memory at a time), else keep them for the caller."""
        refs = self.by_expert[e]
        readers = [r for r in refs if r.role != "expert_down"]
        down = [r for r in refs if r.role == "expert_down"]
        if readers:
            stats = self._stats_for(readers[0], x)
            for ref in readers:
                self._keep_or_prune(ref, stats, prune)
        for ref in down:
            self._keep_or_prune(ref, self._stats_for(ref, self._hidden(e, x)), prune)

    def _stats_for(self, ref: WeightRef, x: torch.Tensor):
        stats = self.stats.get(ref.name)
        if stats is None:
            stats = self.make_stats(ref)
        if stats is not None:
            stats.update(x)
        return stats

    def _keep_or_prune(self, ref: WeightRef, stats, prune) -> None:
        if prune is None:
            self.stats[ref.name] = stats
        else:
            prune(ref, stats)

    def summary(self) -> dict[str, Any]:
        return {"tokens_per_expert": list(self.tokens), "fallback_experts": sorted(set(self.fallback))}
