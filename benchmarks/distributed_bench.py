"""Data-parallel pruning under torchrun: wall time, time per block and time spent in collectives, for N ranks.

    python benchmarks/distributed_bench.py --model packaged:smollm2-135m --nproc 1 2 \\
        --step '{"method": "sparsegpt", "sparsity": 0.5}' --out benchmarks/results/distributed_smollm2.json

On a node of GPUs pass --nproc 1 2 4 8: each rank loads the model on cuda:LOCAL_RANK (nccl); on CPU the ranks share
the cores (gloo), so the numbers there measure overhead, not speedup. Every rank calibrates on its share of the
windows; the statistics are summed over the ranks before each decision. A benchmark prints a table; it asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from hf_prune import HFPruner, distributed

    recipe = {
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "steps": [json.loads(args.step)],
    }
    start = time.perf_counter()
    pruner = HFPruner.from_pretrained(args.model, recipe=recipe)
    load_s = time.perf_counter() - start
    report = pruner.prune()
    mine = {
        "rank": distributed.rank(),
        "load_s": load_s,
        "prune_s": report.steps[0].time_s,
        "block_seconds": report.steps[0].details.get("block_seconds", []),
        "collective_s": distributed.COLLECTIVES["seconds"],
        "collective_calls": distributed.COLLECTIVES["calls"],
    }
    ranks = [None] * distributed.world_size()
    if distributed.active():
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if distributed.is_main():
        print("RESULT " + json.dumps({"world_size": distributed.world_size(), "ranks": ranks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--step", default='{"method": "sparsegpt", "sparsity": 0.5}')
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib", default="fortunes")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = []
    for n in args.nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
        cmd = [*(launcher if n > 1 else [sys.executable]), __file__, "--worker", "--model", args.model]
        cmd += ["--step", args.step, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        cmd += ["--calib", args.calib]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{n} process(es) failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(
        f"\nModel {args.model}; step {args.step}; calibration {args.nsamples} x {args.seqlen} tokens of {args.calib}; "
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs.\n"
    )
    print("| ranks | prune time (s) | per block, mean / max (s) | in collectives, max over ranks (s) | collectives |")
    print("|---|---|---|---|---|")
    for r in results:
        prune = max(x["prune_s"] for x in r["ranks"])
        blocks = r["ranks"][0]["block_seconds"] or [0.0]
        coll = max(x["collective_s"] for x in r["ranks"])
        calls = r["ranks"][0]["collective_calls"]
        mean = sum(blocks) / len(blocks)
        print(f"| {r['world_size']} | {prune:.1f} | {mean:.2f} / {max(blocks):.2f} | {coll:.2f} | {calls} |")


if __name__ == "__main__":
    main()
