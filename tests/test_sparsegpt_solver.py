"""SparseGPT's solver against a direct OBS reference with explicit inverses, on small problems."""

import pytest
import torch

from hf_prune.methods.sparsegpt.solver import DampeningError, inverse_cholesky_upper, sparsegpt_prune
from hf_prune.pruning.masks import Structure, nm_violations


def reference_obs(W, H, sparsity, structure, blocksize, percdamp=0.01):
    """Sequential OBS, column by column, with explicit inverses of the remaining Hessian (float64).

    Masks follow the paper's rule, the OBS saliency w_j^2 / [H_F^-1]_jj: per column block (unstructured: the lowest
    of the block, with the layer-exact quota) or every M columns (N:M), scored on the weights updated so far."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    hinv_diag = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)], dtype=H.dtype)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if structure.is_nm:
        blocksize = max(structure.m, blocksize - blocksize % structure.m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if not structure.is_nm:
            k = int(rows * i2 * sparsity + 1e-9) - int(rows * i1 * sparsity + 1e-9)
            sal = W[:, i1:i2] ** 2 / hinv_diag[i1:i2]
            idx = torch.topk(sal.flatten(), k, largest=False).indices
            block = torch.zeros(rows * (i2 - i1), dtype=torch.bool)
            block[idx] = True
            mask[:, i1:i2] = block.view(rows, i2 - i1)
        for j in range(i1, i2):
            if structure.is_nm and (j - i1) % structure.m == 0:
                g = slice(j, j + structure.m)
                sal = W[:, g] ** 2 / hinv_diag[g]
                idx = torch.topk(sal, structure.m - structure.n, dim=1, largest=False).indices
                mask[:, g].scatter_(1, idx, True)
            Hinv = torch.linalg.inv(H[j:, j:])  # inverse over the columns not yet visited
            q = torch.where(mask[:, j], torch.zeros_like(W[:, j]), W[:, j])
            err = (W[:, j] - q) / Hinv[0, 0]
            W[:, j:] -= err.unsqueeze(1) * Hinv[0].unsqueeze(0)
            W[:, j] = q
    return W, mask


def _problem(rows=8, cols=16, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    H = 2.0 / tokens * X.t() @ X
    return W, H


@pytest.mark.parametrize("blocksize", [16, 4, 5])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
def test_unstructured_matches_exact_obs(blocksize, sparsity):
    W, H = _problem()
    ref_w, ref_mask = reference_obs(W, H, sparsity, Structure(), blocksize)
    new_w, mask, info = sparsegpt_prune(W, H, sparsity, Structure(), blocksize=blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert int(mask.sum()) == int(8 * 16 * sparsity + 1e-9)
    assert (new_w[mask] == 0).all() and not info.raised


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 8), (2, 4, 16), (4, 8, 16), (1, 4, 4)])
def test_nm_matches_exact_obs(n, m, blocksize):
    W, H = _problem(seed=1)
    ref_w, ref_mask = reference_obs(W, H, 0.0, Structure(n, m), blocksize)
    new_w, mask, _ = sparsegpt_prune(W, H, 0.0, Structure(n, m), blocksize=blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert nm_violations(new_w, n, m) == 0


def test_reconstruction_beats_plain_masking_on_the_layer_output():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(256, 12, generator=g) @ torch.randn(12, 32, generator=g) + 0.1 * torch.randn(256, 32, generator=g)
    H = 2.0 / 256 * X.t() @ X  # correlated inputs, as in real layers: the kept weights can absorb the error
    new_w, mask, _ = sparsegpt_prune(W, H, 0.5)
    masked_only = W.masked_fill(mask, 0)

    def err(w):  # E||(W - w) x||^2 = tr((W-w) H (W-w)^T) / 2
        d = W - w
        return float(torch.trace(d @ H @ d.t()))

    assert err(new_w) < 0.7 * err(masked_only)


def test_dead_inputs_are_pruned_first_and_zero():
    W, H = _problem()
    H[3, :] = 0
    H[:, 3] = 0
    new_w, mask, info = sparsegpt_prune(W, H, 0.5)
    assert info.dead_inputs == 1 and mask[:, 3].all() and (new_w[:, 3] == 0).all()


def test_rank_deficient_hessian_raises_dampening_and_says_so():
    """4 tokens for 32 inputs (rank 4), plus the small negative eigenvalues that float32 accumulation produces on
    real models: Cholesky fails at low dampening, so the dampening is raised tenfold until it succeeds."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 32, generator=g)
    H = 2.0 / 4 * X.t() @ X
    H -= 1e-4 * torch.diag(H).mean() * torch.eye(32)
    W = torch.randn(8, 32, generator=g)
    _, info = inverse_cholesky_upper(H, percdamp=1e-6)
    assert info.raised and info.tries[:3] == pytest.approx([1e-6, 1e-5, 1e-4]) and info.damp_fraction >= 1e-3
    new_w, mask, info2 = sparsegpt_prune(W, H, 0.5, percdamp=1e-6)
    assert info2.raised and torch.isfinite(new_w).all() and int(mask.sum()) == 128


def test_hopeless_hessian_fails_with_actionable_error():
    H = torch.full((4, 4), float("nan"))
    with pytest.raises(DampeningError, match="degenerate"):
        sparsegpt_prune(torch.randn(2, 4), H, 0.5)


def _rank_deficient_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 32, generator=g)
    H = 2.0 / 4 * X.t() @ X
    H -= 1e-4 * torch.diag(H).mean() * torch.eye(32)
    return torch.randn(8, 32, generator=g), H


@pytest.mark.parametrize("file_bytes", [0, None])  # 0: the copy goes to a temporary file; None: a small clone
def test_in_place_solve_retries_from_an_offloaded_copy(file_bytes):
    """The in-place factorisation destroys H on a failed try; the offloaded copy refills it, so the tenfold retries
    reach the same factor as the solve on a separate copy."""
    from hf_prune.methods.sparsegpt.solver import inverse_cholesky_upper_
    from hf_prune.utils import OffloadedCopy

    _, H = _rank_deficient_problem()
    expected, info = inverse_cholesky_upper(H, percdamp=1e-6)
    work = H.clone()
    with OffloadedCopy(work, file_bytes=file_bytes) as backup:
        info_in_place = inverse_cholesky_upper_(work, 1e-6, backup.restore_into)
    assert info_in_place.tries == info.tries and info.raised
    assert torch.equal(work, expected)
    with pytest.raises(DampeningError, match="not positive definite"):  # nothing to refill from: one try
        inverse_cholesky_upper_(H.clone(), 1e-6)


def test_offloaded_copy_round_trips_any_dtype_through_an_unnamed_file(tmp_path, monkeypatch):
    from hf_prune.utils import OffloadedCopy

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    t = torch.randn(33, 17).to(torch.bfloat16)
    copy = OffloadedCopy(t, file_bytes=0)
    assert copy._file is not None and not list(tmp_path.iterdir())  # an unnamed file: nothing left if killed
    original = t.clone()
    t.fill_(0)
    copy.restore_into(t)
    assert torch.equal(t, original)
    target = torch.zeros(17, 33, dtype=torch.bfloat16).t()  # not contiguous
    copy.restore_into(target)
    assert torch.equal(target, original)
    with pytest.raises(ValueError, match="cannot restore"):
        copy.restore_into(torch.zeros(3))
    copy.close()
    with pytest.raises(RuntimeError, match="closed"):
        copy.restore_into(t)


def test_targets_reading_one_input_share_one_factor_made_in_the_hessians_memory():
    """q/k/v (or gate/up) read one input, so they share one HessianStats: the factor is computed once, in the
    statistics' own H (no second n x n matrix), and each target's result equals the solve on a copy of H."""
    from hf_prune.calibration.stats import HessianStats
    from hf_prune.methods.sparsegpt.method import SparseGPTConfig, SparseGPTMethod

    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 32, generator=g)
    stats = HessianStats(32, torch.device("cpu"))
    stats.update(X)
    H = stats.H.clone()
    storage = stats.H.data_ptr()
    method = SparseGPTMethod(SparseGPTConfig(sparsity=0.5, blocksize=8))
    weights = [torch.randn(8, 32, generator=g) for _ in range(3)]
    for i, w in enumerate(weights):
        new_w, mask = method.prune_weight(w, stats, 0.5, Structure(), f"q{i}")
        ref_w, ref_mask, _ = sparsegpt_prune(w, H, 0.5, blocksize=8)
        assert torch.equal(mask, ref_mask) and torch.equal(new_w, ref_w)
    assert stats.H is None and len(method._factors) == 1
    assert method._factors[stats][0].data_ptr() == storage  # the factor lives in the Hessian's memory
    with pytest.raises(RuntimeError, match="handed to a solver"):
        stats.update(X)
    del stats
    assert len(method._factors) == 0  # freed with its statistics
