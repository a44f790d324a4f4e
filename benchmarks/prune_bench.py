"""Perplexity, pruning wall time and peak RSS of pruning recipes, one fresh process per configuration.

Setting (the README's "embedded default"): calibration = 32 random 512-token windows of fortunes (seed 0);
evaluation = the first 32 non-overlapping 512-token windows of the Wikipedia extracts (file order, joined with
"\\n\\n"). Each configuration runs in its own process, so its peak RSS is its own.

    python benchmarks/prune_bench.py --model packaged:smollm2-135m \\
        --configs dense magnitude-50 wanda-50 wanda-50-parallel wanda-2of4 wanda-4of8 --out benchmarks/results/x.json

A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CONFIGS: dict[str, list[dict]] = {
    "dense": [],
    "magnitude-50": [{"method": "magnitude", "sparsity": 0.5}],
    "magnitude-2of4": [{"method": "magnitude", "structure": "2:4"}],
    "wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "wanda-50-parallel": [{"method": "wanda", "sparsity": 0.5, "true_sequential": False}],
    "wanda-2of4": [{"method": "wanda", "structure": "2:4"}],
    "wanda-2of4-parallel": [{"method": "wanda", "structure": "2:4", "true_sequential": False}],
    "wanda-4of8": [{"method": "wanda", "structure": "4:8"}],
    "wanda-60": [{"method": "wanda", "sparsity": 0.6}],
    "wanda-70": [{"method": "wanda", "sparsity": 0.7}],
    "wanda-60-owl": [{"method": "wanda", "sparsity": 0.6, "sparsity_profile": "owl"}],
    "wanda-70-owl": [{"method": "wanda", "sparsity": 0.7, "sparsity_profile": "owl"}],
    "sparsegpt-50": [{"method": "sparsegpt", "sparsity": 0.5}],
    "sparsegpt-50-parallel": [{"method": "sparsegpt", "sparsity": 0.5, "true_sequential": False}],
    "sparsegpt-2of4": [{"method": "sparsegpt", "structure": "2:4"}],
    "sparsegpt-4of8": [{"method": "sparsegpt", "structure": "4:8"}],
    "sparsegpt-60": [{"method": "sparsegpt", "sparsity": 0.6}],
    "sparsegpt-70": [{"method": "sparsegpt", "sparsity": 0.7}],
    "sparsegpt-60-owl": [{"method": "sparsegpt", "sparsity": 0.6, "sparsity_profile": "owl"}],
    "sparsegpt-70-owl": [{"method": "sparsegpt", "sparsity": 0.7, "sparsity_profile": "owl"}],
}
# Mixture of experts: per-expert statistics from every token instead of the routed ones; whole-expert removal.
CONFIGS["wanda-50-moe-all"] = [{"method": "wanda", "sparsity": 0.5, "moe_calibration": "all"}]
CONFIGS["wanda-2of4-moe-all"] = [{"method": "wanda", "structure": "2:4", "moe_calibration": "all"}]
CONFIGS["sparsegpt-50-moe-all"] = [{"method": "sparsegpt", "sparsity": 0.5, "moe_calibration": "all"}]
CONFIGS["sparsegpt-2of4-moe-all"] = [{"method": "sparsegpt", "structure": "2:4", "moe_calibration": "all"}]
for _pct in (25, 50):
    for _criterion in ("reap", "frequency", "random"):
        CONFIGS[f"experts-{_criterion}-{_pct}"] = [{"method": "experts", "criterion": _criterion, "ratio": _pct / 100}]
for _pct in (10, 20, 25, 30):
    for _rotation in ("per_block", "shared"):
        _step = {"method": "slicegpt", "slicing": _pct / 100, "rotation": _rotation}
        CONFIGS[f"slicegpt-{_pct}-{_rotation}"] = [_step]
for _pct in (10, 20, 30):
    for _name, _criterion in (
        ("angular", "angular"),
        ("bi", "block_influence"),
        ("ppl", "ppl_delta"),
        ("random", "random"),
    ):
        _step = {"method": "depth", "criterion": _criterion, "ratio": _pct / 100}
        if _criterion == "ppl_delta":
            _step["ppl_nsamples"] = 8
        CONFIGS[f"depth-{_name}-{_pct}"] = [_step]

# Width on every axis (in MoE models mlp narrows every routed expert; hidden narrows the stream through them too).
for _pct in (10, 20):
    CONFIGS[f"width-hidden-{_pct}"] = [{"method": "width", "hidden": _pct / 100}]
for _pct in (10, 25, 40):
    CONFIGS[f"width-mlp-{_pct}"] = [{"method": "width", "mlp": _pct / 100}]
for _mlp in (15, 25):  # hidden channels and MLP (every expert's) neurons in one step
    CONFIGS[f"width-hidden-10-mlp-{_mlp}"] = [{"method": "width", "hidden": 0.1, "mlp": _mlp / 100}]


# Block reconstruction: every weight-pruning setting of the grid again with ``reconstruct: true`` ("<name>-rec").
for _method in ("magnitude", "wanda", "sparsegpt"):
    for _name, _setting in (
        ("50", {"sparsity": 0.5}),
        ("60", {"sparsity": 0.6}),
        ("70", {"sparsity": 0.7}),
        ("2of4", {"structure": "2:4"}),
        ("4of8", {"structure": "4:8"}),
    ):
        CONFIGS.setdefault(f"{_method}-{_name}", [{"method": _method, **_setting}])
        CONFIGS[f"{_method}-{_name}-rec"] = [{"method": _method, **_setting, "reconstruct": True}]


def extend_configs(extra: dict[str, list[dict]]) -> None:
    """Let other benchmark scripts add their configurations to the same runner."""
    CONFIGS.update(extra)


def run_one(model_id: str, name: str, nsamples: int, seqlen: int, eval_windows: int, source: str) -> dict:
    import torch

    from hf_prune import HFPruner
    from hf_prune.calibration.data import calibration_batch
    from hf_prune.pruner import load_model_and_tokenizer
    from hf_prune.utils import peak_rss_bytes

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_id)
    result: dict = {"config": name, "model": model_id}
    if name == "dense":
        windows, info = calibration_batch(source, tokenizer, nsamples, seqlen, 0)
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=windows, use_cache=False)
            result["dense_forward_s"] = time.perf_counter() - start
        result["calibration"] = info
        pruner = HFPruner(model, tokenizer)
    else:
        recipe = {
            "calibration": {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
            "steps": CONFIGS[name],
        }
        pruner = HFPruner(model, tokenizer, recipe)
        report = pruner.prune()
        result["prune_s"] = sum(s.time_s for s in report.steps)
        result["sparsity"] = report.steps[-1].sparsity
        result["params_before"] = report.params_before
        result["params_after"] = report.params_after
        result["nonzero_after"] = report.nonzero_after
        result["calibration"] = report.calibration
        result["details"] = [s.details for s in report.steps]
    result["peak_rss_prune_bytes"] = peak_rss_bytes()
    start = time.perf_counter()
    result["ppl"] = pruner.perplexity("wikipedia", 512, eval_windows)
    result["eval_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=["dense", "magnitude-50", "wanda-50", "wanda-2of4"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--calib", default="fortunes")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    parser.add_argument("--extra", help=argparse.SUPPRESS)  # internal: module that extends CONFIGS
    args = parser.parse_args()

    if args.extra:
        __import__(args.extra)
    if args.one:
        res = run_one(args.model, args.one, args.nsamples, args.seqlen, args.eval_windows, args.calib)
        print("RESULT " + json.dumps(res, default=str))
        return

    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    results = load_finished(args.out, args)
    for name in args.configs:
        if any(r["config"] == name for r in results):
            print(f"{name}: already in {args.out}, skipped", file=sys.stderr, flush=True)
            continue
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--model",
            args.model,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--eval-windows",
            str(args.eval_windows),
            "--calib",
            args.calib,
        ]
        if args.extra:
            cmd += ["--extra", args.extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"config {name} failed")
        res = json.loads(line[len("RESULT ") :])
        results.append(res)
        save_results(args.out, args, results)
        print(f"{name}: ppl {res['ppl']:.3f}  prune {res.get('prune_s', 0):.1f}s", file=sys.stderr, flush=True)

    dense_fwd = next((r["dense_forward_s"] for r in results if "dense_forward_s" in r), None)
    calib = results[0].get("calibration") or {}
    print(
        f"\nModel {args.model}; calibration {args.nsamples} x {args.seqlen} tokens of {calib.get('source')}, seed 0; "
        f"perplexity: wikipedia, first {args.eval_windows} windows of 512 tokens; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}."
    )
    if dense_fwd:
        print(f"One dense forward over the calibration tokens (one batch, with lm_head): {dense_fwd:.1f} s")
    print("\n| config | perplexity | measured sparsity | prune time (s) | prune / dense forward | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['prune_s'] / dense_fwd:.2f}x" if dense_fwd and "prune_s" in r else "-"
        sp = f"{r['sparsity']:.4f}" if r.get("sparsity") is not None else "-"
        print(
            f"| {r['config']} | {r['ppl']:.2f} | {sp} | {r.get('prune_s', 0):.1f} | {ratio} | "
            f"{r['peak_rss_prune_bytes'] / 2**30:.2f} |"
        )


SETTING_KEYS = ("model", "nsamples", "seqlen", "eval_windows", "calib")


def load_finished(out: str | None, args: argparse.Namespace) -> list[dict]:
    """Results already in ``out`` from an interrupted run with the same setting, so a rerun resumes."""
    if not out or not os.path.exists(out):
        return []
    with open(out) as f:
        saved = json.load(f)
    if any(saved["args"].get(k) != getattr(args, k) for k in SETTING_KEYS):
        sys.exit(f"{out} holds results for another setting; pass a new --out or delete it")
    return saved["results"]


def save_results(out: str | None, args: argparse.Namespace, results: list[dict]) -> None:
    """Write after every configuration (atomically), so an interrupted run loses at most one."""
    if not out:
        return
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2, default=str)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
