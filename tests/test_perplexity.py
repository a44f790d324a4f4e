"""Perplexity follows the declared convention exactly."""

import math

import torch
import torch.nn.functional as F

from hf_prune.eval.perplexity import perplexity, perplexity_of_tokens

from .conftest import make_tiny_model


def test_matches_manual_window_computation():
    model = make_tiny_model("llama")
    tokens = torch.randint(0, 3000, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    nll = []
    with torch.no_grad():
        for i in range(5):
            w = tokens[i * 32 : (i + 1) * 32].unsqueeze(0)
            logits = model(input_ids=w).logits[0, :-1]
            nll.append(F.cross_entropy(logits, w[0, 1:], reduction="none"))
    expected = math.exp(torch.cat(nll).mean().item())
    assert abs(perplexity_of_tokens(model, tokens, 32) - expected) < 1e-3 * expected
    assert abs(perplexity_of_tokens(model, tokens, 32, batch_size=3) - expected) < 1e-3 * expected
    first2 = math.exp(torch.cat(nll[:2]).mean().item())
    assert abs(perplexity_of_tokens(model, tokens, 32, max_windows=2) - first2) < 1e-3 * first2


def test_perplexity_on_a_text_source(tokenizer, calib_texts):
    model = make_tiny_model("gpt2")
    ppl = perplexity(model, tokenizer, calib_texts, seqlen=64, max_windows=3)
    assert math.isfinite(ppl) and ppl > 1
