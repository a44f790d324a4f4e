"""SliceGPT's linear algebra, pure tensor code (no transformers import).

Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns" (ICLR 2024).

Conventions: weights are (out, in); hidden-state vectors are rows. A linear that READS the residual stream
(q/k/v, gate/up, the head) becomes ``W @ B`` when the stream is expressed in the orthonormal basis ``B`` (d x d');
a linear that WRITES to it (o, down) becomes ``B.T @ W`` (and its bias ``B.T @ b``).
"""

from __future__ import annotations

import torch


def principal_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of a symmetric covariance, as columns sorted by decreasing eigenvalue (float64), and the values."""
    cov = cov.double()
    cov = (cov + cov.t()) / 2
    values, vectors = torch.linalg.eigh(cov)
    order = torch.argsort(values, descending=True)
    return vectors[:, order], values[order]


def sliced_dim(hidden: int, slicing: float, multiple: int = 8) -> int:
    """Dimension kept: floor((1 - slicing) * hidden) rounded down to a multiple of ``multiple`` (at least one)."""
    kept = int((1.0 - slicing) * hidden + 1e-9)
    kept -= kept % multiple
    return max(multiple, min(hidden, kept))


def fold_scale_into_readers(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W diag(gamma): a norm's scale moved into the linear that reads the norm's output."""
    return weight * gamma.to(weight.dtype).unsqueeze(0)


def fold_shift_into_bias(weight: torch.Tensor, bias: torch.Tensor | None, beta: torch.Tensor) -> torch.Tensor:
    """b + W beta: a LayerNorm's shift moved into the bias of the linear that reads it."""
    shift = weight.double() @ beta.double()
    return (shift if bias is None else bias.double() + shift).to(weight.dtype)


def center_columns(weight: torch.Tensor) -> torch.Tensor:
    """C W with C = I - 11^T/d: makes every output vector of a stream writer (out = d) mean-zero."""
    return weight - weight.mean(dim=0, keepdim=True)


def center_rows(embedding: torch.Tensor) -> torch.Tensor:
    """Embedding rows (vectors in the stream) made mean-zero."""
    return embedding - embedding.mean(dim=1, keepdim=True)


def read_in_basis(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """A stream reader (out, d) -> (out, d'): W @ B."""
    return (weight.double() @ basis.double()).to(weight.dtype)


def write_in_basis(weight: torch.Tensor, bias: torch.Tensor | None, basis: torch.Tensor):
    """A stream writer (d, in) -> (d', in), bias (d,) -> (d',): B.T @ W, B.T @ b."""
    w = (basis.double().t() @ weight.double()).to(weight.dtype)
    b = None if bias is None else (basis.double().t() @ bias.double()).to(bias.dtype)
    return w, b


def embed_in_basis(embedding: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Embedding rows (n, d) expressed in the basis: E @ B -> (n, d')."""
    return (embedding.double() @ basis.double()).to(embedding.dtype)


def shortcut(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The d' x d' map taking a row vector from basis ``previous`` to basis ``current``: B_prev.T @ B_cur."""
    return previous.double().t() @ current.double()


def norm_scale(original: int, kept: int) -> float:
    """An RMS norm over d' dimensions equals one over d (with the dropped coordinates near zero) times
    sqrt(d'/d)^-1: the kept norm's weight becomes sqrt(d / d')."""
    return (original / kept) ** 0.5
