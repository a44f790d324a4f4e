"""Evaluation: perplexity under a declared convention."""

from .perplexity import PERPLEXITY_CONVENTION, perplexity, perplexity_of_tokens

__all__ = ["PERPLEXITY_CONVENTION", "perplexity", "perplexity_of_tokens"]
