"""Least-squares replacement of removed blocks (after ReplaceMe, Shopkhoev et al., 2025): a run of removed blocks
l..e is replaced by one linear map T applied to the MLP output of the last kept block l-1, folded into its down
projection, so the model stays its plain class.

With M the MLP output of block l-1, Y = (its output) - M, and L the output of block e (what block e+1 reads), T
minimizes ||M T + Y - L||^2 over the calibration tokens: T = (M^T M + lambda I)^-1 M^T (L - Y). ``relative``: each
token's squared error divided by ||L_t||^2 (weighted least squares; the next block's norm sees each token's stream
up to its scale, and a few tokens with massive activations would otherwise decide the fit, as ReplaceMe's cosine
objective avoids). The statistics are sums (d x d), so they add over chunks and ranks. Folding: M T = x W^T T + b T,
i.e. W' = T^T W and b' = T^T b. Pure math: tensors in, tensors out.
"""

from __future__ import annotations

import torch


class RunStatistics:
    """Sums over calibration tokens for one removed run: G = M^T M, C = M^T B with B = L - Y, ||B||^2, ||L||^2 (with
    ``relative``, each token weighted by 1 / ||L_t||^2)."""

    def __init__(self, hidden: int, device: torch.device, relative: bool = False):
        self.relative = relative
        self.G = torch.zeros(hidden, hidden, dtype=torch.float32, device=device)
        self.C = torch.zeros(hidden, hidden, dtype=torch.float32, device=device)
        self.b_sq = 0.0
        self.l_sq = 0.0
        self.tokens = 0

    def update(self, mlp_out: torch.Tensor, run_input: torch.Tensor, run_output: torch.Tensor) -> None:
        """``mlp_out``: M of block l-1; ``run_input``: its output (block l's input); ``run_output``: block e's
        output. B = L - Y = run_output - run_input + M."""
        m = mlp_out.reshape(-1, mlp_out.shape[-1]).to(device=self.G.device, dtype=torch.float32)
        x = run_input.reshape(-1, m.shape[-1]).to(device=self.G.device, dtype=torch.float32)
        y = run_output.reshape(-1, m.shape[-1]).to(device=self.G.device, dtype=torch.float32)
        b = y - x + m
        if self.relative:  # every token's ||L_t||^2 weighs 1 after scaling by 1 / ||L_t||
            scale = y.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12).rsqrt()
            m, b = m * scale, b.mul_(scale)
            self.l_sq += float(m.shape[0])
        else:
            self.l_sq += float(y.pow(2).sum(dtype=torch.float64))
        self.G.addmm_(m.t(), m)
        self.C.addmm_(m.t(), b)
        self.b_sq += float(b.pow(2).sum(dtype=torch.float64))
        self.tokens += m.shape[0]


def fit_map(G: torch.Tensor, C: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """T = (G + damp * mean(diag G) I)^-1 C, solved in float64 (d x d only)."""
    G, C = G.double(), C.double()
    lam = damp * float(G.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + lam * eye, C)


def squared_error(G: torch.Tensor, C: torch.Tensor, b_sq: float, T: torch.Tensor | None) -> float:
    """||M T - B||^2 from the sums (T None: the identity, i.e. the blocks removed without compensation)."""
    G, C = G.double(), C.double()
    if T is None:
        return float(G.trace() - 2 * C.trace()) + b_sq
    T = T.double()
    return float((T * (G @ T)).sum() - 2 * (T * C).sum()) + b_sq


def fold_into_writer(
    weight: torch.Tensor, bias: torch.Tensor | None, T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) writer weight and bias that produce ``output @ T``: (T^T W, T^T b), in the weight's dtype."""
    Tt = T.t().to(device=weight.device, dtype=torch.float32)
    new_w = (Tt @ weight.float()).to(weight.dtype)
    new_b = None if bias is None else (Tt @ bias.float()).to(bias.dtype)
    return new_w, new_b
