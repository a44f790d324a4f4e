"""Heal one pruned model under several healing settings, each from the same pruned weights, and compare perplexity
(Wikipedia windows) before and after; the README's frontier configuration hidden + heads + MLP at 20% by default:

    python benchmarks/heal_settings.py --windows 8

Settings: the README's budget (20 steps, LoRA r 16, lr 2e-4, distillation), without distillation, with lr 5e-5, and
unmerged (the adapter kept apart: the same perplexity as merged, or the merge is wrong). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from width_frontier import CALIB  # noqa: E402

HIDDEN_HEADS_MLP_20 = [
    {
        "method": "width",
        "criterion": "fluctuation",
        "compensate": "least_squares",
        "hidden": 0.125,
        "mlp": 0.0335,
        "heads": 0.3333,
    }
]
SETTINGS = ({"distill": True}, {"distill": False}, {"distill": True, "lr": 5e-5}, {"distill": True, "merge": False})


def main() -> None:
    from hf_prune import HFPruner
    from hf_prune.pruner import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--steps", default=json.dumps(HIDDEN_HEADS_MLP_20), help="the pruning steps (JSON)")
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    pruner = HFPruner(model, tokenizer, {"calibration": CALIB, "steps": json.loads(args.steps)})
    pruner.prune()
    print(f"pruned: ppl {pruner.perplexity('wikipedia', 512, args.windows):.2f}", flush=True)
    pruned = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    for setting in SETTINGS:  # unmerged last: it leaves a PEFT model behind
        pruner.model.load_state_dict(pruned)
        summary = pruner.heal(max_steps=args.heal_steps, mask="none", **setting)
        ppl = pruner.perplexity("wikipedia", 512, args.windows)
        print(
            f"{setting}: loss {summary['loss_first10']} -> {summary['loss_last10']}, ppl {ppl:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
