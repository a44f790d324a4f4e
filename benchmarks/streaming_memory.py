"""Peak RSS and wall time of pruning in memory vs streaming, one fresh process per run, and a streaming run under a
hard memory limit smaller than the model (a cgroup-v1 memory controller where the machine allows it).

Checkpoints: the packaged SmolLM2-135M and Gemma-3-270m (converted folders), and a Llama-architecture model of about
1.2B parameters with RANDOM weights (about 4.6 GB in fp32), written as several safetensors shards by this script
(weights do not matter for memory). Calibration: 8 windows of 512 tokens of fortunes.

    python benchmarks/streaming_memory.py --big --limit-gib 2.5

A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def make_big_checkpoint(folder: Path) -> Path:
    """A ~1.2B-parameter Llama with random weights, saved as 1 GB shards (built once, cached)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_prune.assets import resolve_packaged_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BIG))
    tmp = folder.with_suffix(".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(resolve_packaged_model("packaged:smollm2-135m")).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def run_one(model: str, method: str, mode: str, out: str) -> dict:
    from hf_prune import HFPruner, prune_streaming
    from hf_prune.streaming import ShardedCheckpoint
    from hf_prune.utils import peak_rss_bytes

    recipe = {
        "calibration": {"source": "fortunes", "nsamples": 8, "seqlen": 512, "seed": 0},
        "steps": [{"method": method, "sparsity": 0.5}],
    }
    start = time.perf_counter()
    if mode == "streaming":
        prune_streaming(model, recipe, out, overwrite=True)
    else:
        pruner = HFPruner.from_pretrained(model, recipe=recipe)
        pruner.prune()
        pruner.save_pretrained(out, overwrite=True)
    return {
        "model": model,
        "method": method,
        "mode": mode,
        "wall_s": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "checkpoint": ShardedCheckpoint(model).size_bytes(),
    }


def in_cgroup(limit_bytes: int, cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` inside a new cgroup-v1 memory group limited to ``limit_bytes`` (swap included where possible)."""
    group = Path("/sys/fs/cgroup/memory") / f"hf_prune_bench_{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
        script = f"echo $$ > {group}/cgroup.procs && exec " + " ".join(cmd)
        proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
        failcnt = (group / "memory.failcnt").read_text().strip()
        return proc.returncode, proc.stdout + proc.stderr[-2000:] + f"\n[memory.failcnt={failcnt}]"
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="also the ~1.2B random Llama checkpoint")
    parser.add_argument("--limit-gib", type=float, default=0.0, help="hard memory limit for one streaming run")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hf_prune_streaming_bench"))
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, str(work / "out"))))
        return

    from hf_prune.assets import resolve_packaged_model

    models = [resolve_packaged_model("packaged:smollm2-135m"), resolve_packaged_model("packaged:gemma3-270m")]
    if args.big:
        models.append(str(make_big_checkpoint(work / "llama-1.2b-random")))
    rows = []
    for model in models:
        for method in ("wanda", "sparsegpt"):
            for mode in ("in-memory", "streaming"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--work", str(work), "--one", model, method, mode],
                    capture_output=True,
                    text=True,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    sys.exit(f"{model} {method} {mode} failed")
                rows.append(json.loads(line[7:]))
                r = rows[-1]
                print(
                    f"{Path(model).name} {method} {mode}: {r['peak_rss'] / 2**30:.2f} GiB, {r['wall_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )

    print(
        f"\nCalibration 8 x 512 tokens of fortunes; 50% unstructured; fp32; {platform.machine()}, "
        f"{os.cpu_count()} CPUs. Peak RSS of the whole process (python + torch runtime included)."
    )
    print("\n| checkpoint | size on disk | method | mode | wall (s) | peak RSS (GiB) | peak RSS / size |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r['model']).name} | {r['checkpoint'] / 2**30:.2f} GiB | {r['method']} | {r['mode']} | "
            f"{r['wall_s']:.0f} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / r['checkpoint']:.2f} |"
        )

    if args.limit_gib and args.big:
        limit = int(args.limit_gib * 2**30)
        cmd = [sys.executable, __file__, "--work", str(work), "--one", models[-1], "wanda", "streaming"]
        code, output = in_cgroup(limit, cmd)
        line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), "")
        print(
            f"\nHard limit: cgroup-v1 memory.limit_in_bytes = {args.limit_gib} GiB, checkpoint "
            f"{rows[-1]['checkpoint'] / 2**30:.2f} GiB: streaming wanda exit code {code}; {line[7:] or output[-500:]}"
        )
        code, output = in_cgroup(
            limit, [sys.executable, __file__, "--work", str(work), "--one", models[-1], "wanda", "in-memory"]
        )
        print(f"Same limit, in-memory path: exit code {code} ({'killed' if code else 'completed'}).")


if __name__ == "__main__":
    main()
