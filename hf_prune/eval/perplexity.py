"""Perplexity with the convention stated wherever a number is shown."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import evaluation_tokens, load_documents
from ..calibration.engine import model_device
from ..errors import CalibrationDataError

PERPLEXITY_CONVENTION = (
    'documents joined with "\\n\\n", tokenized once (tokenizer defaults), non-overlapping windows of seqlen tokens, '
    "remainder dropped, ppl = exp(mean NLL of the seqlen-1 predicted tokens of every window)"
)


@torch.no_grad()
def perplexity_of_tokens(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1
) -> float:
    """Perplexity of a 1-D token stream cut into non-overlapping windows of ``seqlen`` tokens."""
    n_windows = tokens.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise CalibrationDataError(
            f"The evaluation text has {tokens.numel()} tokens: fewer than one window of {seqlen}."
        )
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", leave=False):
            batch = windows[i : i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
            del logits
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    source: Any = "wikipedia",
    seqlen: int = 512,
    max_windows: int | None = 32,
    batch_size: int = 1,
    **source_kwargs,
) -> float:
    """Perplexity of ``model`` on a text source.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        source: a built-in text (default ``wikipedia``), local file(s), a list of strings or an HF dataset id
            (``split``/``text_field``/``dataset_config`` as keyword arguments).
        seqlen: window length in tokens.
        max_windows: evaluate the first ``max_windows`` windows (None = all).
        batch_size: windows per forward.

    Convention: see ``PERPLEXITY_CONVENTION``.
    """
    source_kwargs.setdefault("allow_fallback", False)
    docs, _ = load_documents(source, **source_kwargs)
    tokens = evaluation_tokens(docs, tokenizer, None if max_windows is None else max_windows * seqlen)
    return perplexity_of_tokens(model, tokens, seqlen, max_windows, batch_size)
