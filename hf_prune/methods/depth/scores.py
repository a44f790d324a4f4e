"""Which decoder blocks to remove: pure functions of per-block scores (no transformers import)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def angular_distance(cosine: float) -> float:
    """arccos(cos) / pi, in [0, 1]: 0 for parallel hidden states."""
    return math.acos(max(-1.0, min(1.0, cosine))) / math.pi


def allowed_blocks(num_blocks: int, keep_first: int, keep_last: int) -> list[int]:
    return list(range(keep_first, num_blocks - keep_last))


def lowest_scoring(scores: dict[int, float], count: int, allowed: Sequence[int]) -> list[int]:
    """The ``count`` allowed blocks with the lowest scores (ties broken by index), sorted."""
    ranked = sorted((scores[i], i) for i in allowed if i in scores)
    return sorted(i for _, i in ranked[:count])


def best_consecutive_run(distances: dict[int, float], count: int, allowed: Sequence[int]) -> list[int]:
    """The run [l, l + count) of allowed blocks whose input/output angular distance ``distances[l]`` is smallest."""
    allowed_set = set(allowed)
    starts = [s for s in distances if all(i in allowed_set for i in range(s, s + count))]
    if not starts:
        raise ValueError(f"no run of {count} consecutive removable blocks")
    best = min(starts, key=lambda s: (distances[s], s))
    return list(range(best, best + count))


def random_blocks(count: int, allowed: Sequence[int], seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(list(allowed), count))
