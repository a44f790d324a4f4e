"""SparseGPT's layer-wise solver, pure tensor code (no transformers import).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023).

Given a weight W (out x in) and the Hessian H = 2/n X^T X of its inputs, columns are visited left to right.
Masks are chosen per column block by the OBS saliency w^2 / [H_F^-1]_jj^2 (F = the columns not yet visited),
and each pruned weight's error is propagated to the columns not yet visited through the upper Cholesky factor of
H^-1 (whose row j is row j of (H_F)^-1 scaled by 1/sqrt([H_F^-1]_jj)). Updates to later column blocks are applied
lazily, once per block, as one matrix product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...pruning.masks import Structure, num_pruned
from ...utils import all_finite

UNSTRUCTURED = Structure()


class DampeningError(RuntimeError):
    """The Hessian stayed non positive-definite at every dampening level tried."""


@dataclass
class SolveInfo:
    damp_fraction: float  # dampening actually used, as a fraction of mean(diag(H))
    tries: list[float] = field(default_factory=list)  # every fraction tried, in order
    dead_inputs: int = 0  # input channels that never saw a non-zero activation
    dead: torch.Tensor | None = None  # which they are (H's zero diagonal entries)

    @property
    def raised(self) -> bool:
        return len(self.tries) > 1


def inverse_cholesky_upper_(
    work: torch.Tensor,
    percdamp: float,
    restore: Callable[[torch.Tensor], None] | None = None,
    max_tries: int = 6,
) -> SolveInfo:
    """In place: ``work`` (float32) holds H on entry and the upper Cholesky factor of (H + damp * I)^-1 on success,
    the dampening raised tenfold until H + damp * I is positive definite.

    The factorisation, the inverse and the factor of the inverse overwrite ``work``, so the solve needs no n x n
    matrix besides it (a 14336-wide Hessian is 0.8 GiB). A failed try leaves ``work`` destroyed: ``restore(work)``
    refills it with H for the next try; without ``restore`` the first failure raises. Dead inputs (a zero diagonal
    entry: the channel never saw a non-zero activation) get a diagonal of 1; ``info.dead`` says which. Raises
    DampeningError if ``max_tries`` levels all fail.
    """
    diag = work.diagonal()
    dead = diag == 0
    info = SolveInfo(damp_fraction=percdamp, dead_inputs=int(dead.sum()), dead=dead)
    fraction = percdamp
    diag[dead] = 1.0
    mean_diag = float(diag.mean())
    if mean_diag <= 0 or not all_finite(work):
        raise DampeningError(f"the Hessian is degenerate (mean diagonal {mean_diag:g}, or non-finite entries)")
    status = torch.zeros((), dtype=torch.int32, device=work.device)
    for attempt in range(max_tries):
        if attempt:
            if restore is None:
                break
            restore(work)
            diag[dead] = 1.0
        info.tries.append(fraction)
        diag.add_(fraction * mean_diag)
        # LAPACK / cuSOLVER work on column-major matrices: on the column-major view of ``work`` (H is symmetric, so
        # its values are H) each step runs in place; on ``work`` itself each would allocate an n x n temporary
        cols = work.mT
        torch.linalg.cholesky_ex(cols, out=(cols, status))  # L, in place
        if not int(status):
            torch.cholesky_inverse(cols, out=cols)  # (H + damp I)^-1, in place
            torch.linalg.cholesky_ex(cols, out=(cols, status))  # its lower factor L'; ``work`` then holds L'^T = U
            if not int(status) and all_finite(work):
                info.damp_fraction = fraction
                return info
        fraction = fraction * 10.0 if fraction > 0 else 1e-6
    raise DampeningError(f"not positive definite with dampening up to {info.tries[-1]:g} x mean(diag(H))")


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, SolveInfo]:
    """``inverse_cholesky_upper_`` on a float32 copy of ``H`` (which is not modified): (the factor, info)."""
    work = H.detach().to(torch.float32, copy=True)
    info = inverse_cholesky_upper_(work, percdamp, lambda w: w.copy_(H), max_tries=max_tries)
    return work, info


def _block_quota(rows: int, i1: int, i2: int, sparsity: float) -> int:
    """Weights to prune in columns [i1, i2) so that the running total after column i2 is floor(rows * i2 * s).
    The layer then holds exactly floor(rows * cols * s) pruned weights, however the blocks fall."""
    return num_pruned(rows * i2, sparsity) - num_pruned(rows * i1, sparsity)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """Prune ``weight`` (out x in) with reconstruction; return (new weight, mask of pruned entries, info).

    Args:
        weight: the weight, any float dtype; not modified.
        H: the (in x in) Hessian 2/n X^T X in float32; not modified.
        sparsity: fraction pruned (unstructured); ignored for N:M, which prunes M-N of every M.
        structure: unstructured, or N:M (masks chosen every M columns, on the weights updated so far).
        blocksize: columns per lazy-update block (128 in the paper). For N:M it is rounded down to a multiple of M.
        percdamp: dampening as a fraction of mean(diag(H)); raised tenfold while H is not positive definite.
    """
    U, info = inverse_cholesky_upper(H, percdamp)
    new_weight, mask = sparsegpt_prune_factored(weight, U, info.dead, sparsity, structure, blocksize)
    return new_weight, mask, info


@torch.no_grad()
def sparsegpt_prune_factored(
    weight: torch.Tensor,
    U: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparsegpt_prune`` given the upper factor ``U`` of the damped inverse Hessian (``inverse_cholesky_upper_``)
    and the dead inputs (zero diagonal of H): linears that read the same input share one factor."""
    W = torch.empty(weight.shape, dtype=torch.float32, device=weight.device).copy_(weight.detach())  # one copy
    rows, cols = W.shape
    W[:, dead] = 0.0

    if structure.is_nm:
        blocksize = max(structure.m, blocksize - blocksize % structure.m)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        M1 = torch.zeros_like(W1, dtype=torch.bool)
        if not structure.is_nm:
            k = _block_quota(rows, i1, i2, sparsity)
            if k > 0:
                saliency = (W1 * W1) / (d * d).unsqueeze(0)
                idx = torch.topk(saliency.flatten(), k, largest=False, sorted=False).indices
                M1.view(-1)[idx] = True
        for i in range(i2 - i1):
            if structure.is_nm and i % structure.m == 0:
                group = slice(i, i + structure.m)
                saliency = (W1[:, group] ** 2) / (d[group] ** 2).unsqueeze(0)
                idx = torch.topk(saliency, structure.m - structure.n, dim=1, largest=False, sorted=False).indices
                M1[:, group].scatter_(1, idx, True)
            w = W1[:, i]
            q = w.masked_fill(M1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = M1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)  # in place: no rows x rest temporary
    return W, mask
