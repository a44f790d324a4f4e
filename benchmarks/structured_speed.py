"""CPU speed of structurally pruned models (depth pruning, SliceGPT): prefill of 512 tokens and greedy decode of 128
new tokens (KV cache), dense vs pruned, in one process on one machine; median of several runs.

    python benchmarks/structured_speed.py --model packaged:smollm2-135m --ratios 0.1 0.2 0.3 --runs 5
    python benchmarks/structured_speed.py --method slicegpt-shared --ratios 0.1 0.2 0.25 0.3

Which blocks are removed does not matter for speed, only how many; the blocks are chosen by the angular criterion on
a small calibration set (8 x 256 tokens of fortunes) so the pruned model is a real one; SliceGPT uses the same
calibration. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def measure(model, ids: torch.Tensor, new_tokens: int, runs: int) -> tuple[float, float]:
    prefill, decode = [], []
    with torch.no_grad():
        model(input_ids=ids[:, :16], use_cache=False)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
            elapsed = time.perf_counter() - start
            assert out.shape[1] == ids.shape[1] + new_tokens
            decode.append(elapsed)
    return statistics.median(prefill), statistics.median(decode)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--method",
        choices=["depth", "slicegpt-per_block", "slicegpt-shared"],
        default="depth",
        help="depth: remove this fraction of the blocks (angular); slicegpt-*: slice this fraction of the hidden size",
    )
    args = parser.parse_args()

    from hf_prune import HFPruner
    from hf_prune.calibration.data import evaluation_tokens, load_documents
    from hf_prune.pruner import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    docs, _ = load_documents("wikipedia")
    ids = evaluation_tokens(docs, tokenizer, args.prefill)[: args.prefill].unsqueeze(0)
    rows = [("dense", num_params(model), *measure(model, ids, args.new_tokens, args.runs))]
    for ratio in args.ratios:
        model, tokenizer = load_model_and_tokenizer(args.model)
        if args.method == "depth":
            step = {"method": "depth", "criterion": "angular", "ratio": ratio}
        else:
            step = {"method": "slicegpt", "slicing": ratio, "rotation": args.method.split("-")[1]}
        recipe = {"calibration": {"source": "fortunes", "nsamples": 8, "seqlen": 256, "seed": 0}, "steps": [step]}
        HFPruner(model, tokenizer, recipe).prune()
        rows.append(
            (f"{args.method} {ratio:.0%}", num_params(model), *measure(model, ids, args.new_tokens, args.runs))
        )
    print(
        f"\nModel {args.model}; prefill {args.prefill} tokens, greedy decode {args.new_tokens} new tokens with KV "
        f"cache; median of {args.runs} runs; fp32; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}."
    )
    print("\n| model | parameters | prefill (s) | prefill speedup | decode (s) | decode speedup |")
    print("|---|---|---|---|---|---|")
    base_p, base_d = rows[0][2], rows[0][3]
    for name, params, p, d in rows:
        print(f"| {name} | {params / 1e6:.1f} M | {p:.3f} | {base_p / p:.2f}x | {d:.2f} | {base_d / d:.2f}x |")


if __name__ == "__main__":
    main()
