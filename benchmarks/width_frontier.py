"""The structured frontier: width pruning (each criterion and compensation), depth pruning and SliceGPT at the same
fractions of parameters removed; perplexity, measured prefill / decode speed, and perplexity after the same healing
budget. Writes JSON and a plot (perplexity vs measured prefill speedup, one line per method).

Setting: calibration 32 x 512 tokens of fortunes (seed 0); perplexity on the first 32 windows of 512 tokens of the
Wikipedia extracts; speed as benchmarks/structured_speed.py (prefill 512 tokens, greedy decode 128 with the KV
cache, median of --runs, fp32, this machine); healing: LoRA r 16 on every block linear, --heal-steps x 4 x 256
tokens of fortunes, lr 2e-4, distillation from the dense model (alpha 0.5, T 2) for every method alike.

    python benchmarks/width_frontier.py --out benchmarks/results/width_frontier_smollm2.json \\
        --plot benchmarks/results/width_frontier_smollm2.png

Each configuration runs in its own process (resumable: finished ones are kept in --out). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CALIB = {"source": "fortunes", "nsamples": 32, "seqlen": 512, "seed": 0}
CRITERIA = ("activation", "fluctuation", "magnitude")
HIDDEN_SHARE = 0.125  # SmolLM2: 576 -> 504 (its config wants hidden_size a multiple of its 9 heads)
COMPENSATIONS = ("none", "bias", "least_squares")


def steps_for(kind: str, fraction: float, budget, units: int) -> list[dict] | None:
    """The recipe step that removes about ``fraction`` of all parameters with ``kind`` (``budget``: the model's
    parameters per block, as hf_prune's shrink step counts them)."""
    attn, mlp, blocks = budget.other, budget.mlp, budget.blocks
    target = fraction * budget.total
    if kind == "depth":
        return [{"method": "depth", "criterion": "angular", "num_blocks": max(1, round(target / (attn + mlp)))}]
    if kind == "slicegpt":
        return [{"method": "slicegpt", "slicing": fraction, "rotation": "shared"}]
    if kind == "depth+ls":
        count = max(1, round(target / (attn + mlp)))
        return [{"method": "depth", "criterion": "angular", "num_blocks": count, "compensate": "least_squares"}]
    name, _, rest = kind.partition(":")
    criterion, compensate, axes = rest.split("/")
    step = {"method": "width", "criterion": criterion, "compensate": compensate}
    if axes.startswith("hidden+"):  # a fixed share of the stream (and one attention unit), the rest in MLP neurons
        hidden = HIDDEN_SHARE
        heads = 1 / units if "heads" in axes.split("+") else 0.0
        embeddings = budget.total - blocks * (attn + mlp)
        left = target - hidden * (embeddings + blocks * (attn + mlp)) - (1 - hidden) * heads * attn * blocks
        mlp_fraction = left / ((1 - hidden) * mlp * blocks)
        if not 0 <= mlp_fraction < 0.9:
            return None
        step.update(hidden=hidden, **({"mlp": round(mlp_fraction, 4)} if mlp_fraction > 0 else {}))
        if heads:
            step["heads"] = round(heads, 4)
        return [step]
    heads = 1 / units if axes == "heads" else 0.0
    mlp_fraction = (target - heads * attn * blocks) / (mlp * blocks)
    if not 0 < mlp_fraction < 0.9:
        return None
    step["mlp"] = round(mlp_fraction, 4)
    if heads:
        step["heads"] = round(heads, 4)
    return [step]


def same_shapes(steps: list[dict]) -> list[dict] | None:
    """Steps that leave a model of the same shapes without calibration (speed depends on shapes only): width by
    magnitude without compensation, depth as a list of blocks. None where no such step exists (SliceGPT)."""
    out = []
    for step in steps:
        if step["method"] == "width":
            out.append({**step, "criterion": "magnitude", "compensate": "none"})
        elif step["method"] == "depth":
            out.append({"method": "depth", "blocks": list(range(1, 1 + step["num_blocks"]))})
        else:
            return None
    return out


def run_one(model_id: str, steps: list[dict], heal_steps: int, runs: int, speed_only: bool = False) -> dict:
    import torch

    from hf_prune import HFPruner
    from hf_prune.calibration.data import evaluation_tokens, load_documents
    from hf_prune.pruner import load_model_and_tokenizer

    sys.path.insert(0, os.path.dirname(__file__))
    from structured_speed import measure

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_id)
    docs, _ = load_documents("wikipedia")
    ids = evaluation_tokens(docs, tokenizer, 512)[:512].unsqueeze(0)
    pruner = HFPruner(model, tokenizer, {"calibration": CALIB, "steps": steps})
    result: dict = {"steps": steps}
    if speed_only:
        if steps:
            pruner.prune()
        result["params"] = sum(p.numel() for p in pruner.model.parameters())
        result["prefill_s"], result["decode_s"] = measure(pruner.model, ids, 128, runs)
        return result
    if steps:
        report = pruner.prune()
        result["prune_s"] = report.time_s
        result["details"] = report.steps[-1].details
    result["params"] = sum(p.numel() for p in pruner.model.parameters())
    result["ppl"] = pruner.perplexity("wikipedia", 512, 32)
    if runs:
        result["prefill_s"], result["decode_s"] = measure(pruner.model, ids, 128, runs)
    if heal_steps and steps:
        summary = pruner.heal(max_steps=heal_steps, distill=True, mask="none")
        result["heal"] = summary
        result["ppl_healed"] = pruner.perplexity("wikipedia", 512, 32)
    return result


def plan(args) -> dict[str, tuple[list[dict], int]]:
    """name -> (steps, heal steps) of every configuration of the frontier."""
    from hf_prune.adapters import ModelAdapter
    from hf_prune.methods.shrink.method import measure_budget
    from hf_prune.pruner import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model)
    budget = measure_budget(model, ModelAdapter(model))
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    units = kv if kv > 1 else model.config.num_attention_heads
    configs: dict[str, tuple[list[dict], int]] = {"dense": ([], 0)}
    best = f"width:{args.criterion}/{args.compensate}"
    for level in args.levels:
        heal = args.heal_steps if level in args.heal_levels else 0
        pct = f"{level:.0%}"
        for kind in args.kinds or ("depth", "slicegpt", f"{best}/mlp", f"{best}/heads"):
            kind = kind.replace("BEST", best)
            steps = steps_for(kind, level, budget, units)
            if steps is not None:
                configs[f"{kind.replace('width:', 'width ')} {pct}"] = (steps, heal)
    for criterion in () if args.no_grid else CRITERIA:
        for compensate in COMPENSATIONS:
            kind = f"width:{criterion}/{compensate}/mlp"
            steps = steps_for(kind, args.grid_level, budget, units)
            name = f"{kind.replace('width:', 'width ')} {args.grid_level:.0%}"
            if steps is not None and name not in configs:
                configs[name] = (steps, 0)
    return configs


def measure_speed(args, results: dict[str, dict]) -> None:
    """Fill in prefill / decode times of the finished configurations that have none (same shapes, see same_shapes);
    dense is re-measured in the same invocation so every speedup compares runs of one sitting."""
    todo = {n: r for n, r in results.items() if n == "dense" or "prefill_s" not in r}
    for name, r in todo.items():
        steps = same_shapes(r["steps"])
        if steps is None:
            print(f"{name}: no calibration-free step of the same shapes; skipped", flush=True)
            continue
        cmd = [sys.executable, __file__, "--model", args.model, "--runs", str(args.runs), "--out", args.out]
        proc = subprocess.run(cmd + ["--speed-only", "--one", json.dumps([steps, 0])], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"{name} failed")
        timing = json.loads(line[len("RESULT ") :])
        if timing["params"] != r["params"]:
            sys.exit(f"{name}: the speed model has {timing['params']} parameters, the measured one {r['params']}")
        r.update(prefill_s=timing["prefill_s"], decode_s=timing["decode_s"], speed_from=steps)
        with open(args.out + ".tmp", "w") as f:
            json.dump({"model": args.model, "calibration": CALIB, "results": results}, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)
        print(f"{name}: prefill {timing['prefill_s']:.3f} s decode {timing['decode_s']:.3f} s", flush=True)


def plot(results: dict[str, dict], path: str, title: str, by_params: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    lines: dict[str, list[tuple[float, float, float | None]]] = {}
    for name, r in results.items():
        if name == "dense":
            continue
        method = name.rsplit(" ", 1)[0]
        x = 1 - r["params"] / dense["params"] if by_params else dense["prefill_s"] / r["prefill_s"]
        lines.setdefault(method, []).append((x, r["ppl"], r.get("ppl_healed")))
    lines = {m: p for m, p in lines.items() if len(p) > 1}  # the grid's single points stay in the table
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (method, points) in enumerate(sorted(lines.items())):
        points.sort()
        color = f"C{i}"
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=method)
        healed = [(p[0], p[2]) for p in points if p[2] is not None]
        if healed:
            ax.plot(*zip(*healed), "s--", color=color, label=f"{method}, healed")
    ax.axhline(dense["ppl"], color="gray", lw=0.8, ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel(
        "fraction of the parameters removed" if by_params else "measured prefill speedup over dense (512 tokens, CPU)"
    )
    ax.set_ylabel("perplexity (Wikipedia, 32 x 512)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _speedup(dense: dict, r: dict, key: str) -> str:
    return f"{dense[key] / r[key]:.2f}x" if key in dense and key in r else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--grid-level", type=float, default=0.2, help="level of the criterion x compensation grid")
    parser.add_argument("--criterion", default="activation", help="width criterion on the frontier lines")
    parser.add_argument("--compensate", default="least_squares", help="width compensation on the frontier lines")
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--heal-levels", nargs="*", type=float, default=[0.2])
    parser.add_argument("--runs", type=int, default=3, help="speed runs per configuration (0: no speed)")
    parser.add_argument(
        "--kinds", nargs="*", help="frontier lines, e.g. depth depth+ls BEST/mlp BEST/hidden+mlp (BEST: the criterion)"
    )
    parser.add_argument("--no-grid", action="store_true", help="skip the criterion x compensation grid")
    parser.add_argument("--only", nargs="*", help="run only these configuration names")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="measure speed (--runs) of the configurations in --out that have none, on a model of the same shapes "
        "pruned without calibration (width: magnitude, no compensation; depth: the first blocks); run on an idle "
        "machine after the perplexity runs",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        steps, heal = json.loads(args.one)
        result = run_one(args.model, steps, heal, args.runs, args.speed_only)
        print("RESULT " + json.dumps(result, default=str))
        return
    results: dict[str, dict] = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["results"]
    if args.speed_only:
        measure_speed(args, results)
        return
    for name, (steps, heal) in plan(args).items():
        if name in results or (args.only and name not in args.only):
            continue
        cmd = [sys.executable, __file__, "--model", args.model, "--runs", str(args.runs), "--out", args.out]
        proc = subprocess.run(cmd + ["--one", json.dumps([steps, heal])], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"{name} failed")
        results[name] = json.loads(line[len("RESULT ") :])
        with open(args.out + ".tmp", "w") as f:
            json.dump({"model": args.model, "calibration": CALIB, "results": results}, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)
        r = results[name]
        print(f"{name}: params {r['params'] / 1e6:.1f} M ppl {r['ppl']:.2f} healed {r.get('ppl_healed')}", flush=True)
    dense = results["dense"]
    print(
        f"\nModel {args.model}; {platform.machine()}, {os.cpu_count()} CPUs; fp32. Speed: prefill 512 tokens, greedy "
        f"decode 128 tokens with KV cache, median of {args.runs}."
    )
    print("\n| config | params | removed | ppl | ppl healed | prefill speedup | decode speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        healed = f"{r['ppl_healed']:.2f}" if r.get("ppl_healed") else "-"
        print(
            f"| {name} | {r['params'] / 1e6:.1f} M | {1 - r['params'] / dense['params']:.1%} | {r['ppl']:.2f} | "
            f"{healed} | {_speedup(dense, r, 'prefill_s')} | {_speedup(dense, r, 'decode_s')} |"
        )
    if args.plot:
        plot(results, args.plot, f"{args.model}: structured pruning frontier", by_params="prefill_s" not in dense)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
