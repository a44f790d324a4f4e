"""The same recipes on a GPU in bf16 and on the CPU in fp32: do they prune the same weights, and how far apart are
the perplexities? For a machine with a GPU (the CI and the dev machines have none):

    python benchmarks/gpu_vs_cpu.py --model packaged:smollm2-135m --out benchmarks/results/gpu_vs_cpu.json
    python benchmarks/gpu_vs_cpu.py --device cpu --dtype bfloat16 --nsamples 4 --seqlen 64 --eval-windows 2  # smoke

Each configuration is pruned twice (reference: CPU fp32; candidate: --device / --dtype) on the same calibration
windows; the table gives the fraction of target weights whose pruned/kept state agrees, the structure of the model
after the step (blocks, experts) on both, and both perplexities (README convention, --eval-windows windows).
A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time

CONFIGS: dict[str, list[dict]] = {
    "magnitude-50": [{"method": "magnitude", "sparsity": 0.5}],
    "wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "wanda-2of4": [{"method": "wanda", "structure": "2:4"}],
    "sparsegpt-50": [{"method": "sparsegpt", "sparsity": 0.5}],
    "sparsegpt-2of4": [{"method": "sparsegpt", "structure": "2:4"}],
    "wanda-60-owl": [{"method": "wanda", "sparsity": 0.6, "sparsity_profile": "owl"}],
    "depth-angular-20": [{"method": "depth", "criterion": "angular", "ratio": 0.2}],
    "slicegpt-25-shared": [{"method": "slicegpt", "slicing": 0.25, "rotation": "shared"}],
}
MOE_CONFIGS: dict[str, list[dict]] = {
    "moe-wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "moe-sparsegpt-2of4": [{"method": "sparsegpt", "structure": "2:4"}],
    "moe-experts-reap-25": [{"method": "experts", "criterion": "reap", "ratio": 0.25}],
}


def prune(model_id: str, steps: list[dict], device: str, dtype: str, args: argparse.Namespace):
    import torch

    from hf_prune import HFPruner

    recipe = {
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "steps": steps,
    }
    kwargs = {"dtype": getattr(torch, dtype)}
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    pruner = HFPruner.from_pretrained(model_id, recipe=recipe, **kwargs)
    start = time.perf_counter()
    report = pruner.prune()
    seconds = time.perf_counter() - start
    ppl = pruner.perplexity("wikipedia", 512, args.eval_windows)
    return pruner.model, report, seconds, ppl


def agreement(a, b) -> float | None:
    """Fraction of the target weights pruned (or kept) in both models; None when their shapes differ."""
    from hf_prune.adapters import ModelAdapter

    ra, rb = ModelAdapter(a).all_weight_targets(), ModelAdapter(b).all_weight_targets()
    if [r.name for r in ra] != [r.name for r in rb]:
        return None
    same = total = 0
    for x, y in zip(ra, rb):
        wx, wy = x.weight(), y.weight()
        if wx.shape != wy.shape:
            return None
        same += int(((wx == 0).cpu() == (wy == 0).cpu()).sum())
        total += wx.numel()
    return same / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--moe-model", default="packaged:smollm2-135m-moe", help="'' to skip the MoE rows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--configs", nargs="+", default=[*CONFIGS, *MOE_CONFIGS])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calib", default="fortunes")
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; pass --device cpu --dtype bfloat16 for a smoke run.")
    rows = []
    for name in args.configs:
        moe = name in MOE_CONFIGS
        model_id = args.moe_model if moe else args.model
        if not model_id:
            continue
        steps = (MOE_CONFIGS if moe else CONFIGS)[name]
        ref, ref_report, ref_s, ref_ppl = prune(model_id, steps, "cpu", "float32", args)
        cand, cand_report, cand_s, cand_ppl = prune(model_id, steps, args.device, args.dtype, args)
        rows.append(
            {
                "config": name,
                "model": model_id,
                "agreement": agreement(ref, cand),
                "blocks": [ref.config.num_hidden_layers, cand.config.num_hidden_layers],
                "details": [
                    ref_report.steps[-1].details.get("removed_experts"),
                    cand_report.steps[-1].details.get("removed_experts"),
                ],
                "ppl": [ref_ppl, cand_ppl],
                "seconds": [ref_s, cand_s],
            }
        )
        del ref, cand
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2, default=str)
    print(
        f"\nReference: CPU fp32. Candidate: {args.device} {args.dtype}. Calibration {args.nsamples} x {args.seqlen}.\n"
    )
    print(
        "| config | mask agreement | blocks (ref / cand) | same experts removed | ppl ref | ppl cand "
        "| time ref / cand (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.4f}"
        experts = "-" if r["details"][0] is None else str(r["details"][0] == r["details"][1])
        print(
            f"| {r['config']} | {agree} | {r['blocks'][0]} / {r['blocks'][1]} | {experts} | {r['ppl'][0]:.2f} | "
            f"{r['ppl'][1]:.2f} | {r['seconds'][0]:.1f} / {r['seconds'][1]:.1f} |"
        )


if __name__ == "__main__":
    main()
