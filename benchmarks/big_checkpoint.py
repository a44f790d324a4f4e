"""Streaming prunes of big checkpoints on a small machine: peak RSS against the checkpoint size, time per block, total.

    python benchmarks/big_checkpoint.py build --shape llama3-8b --out /tmp/llama3-8b-random    # ~16 GB of shards
    python benchmarks/big_checkpoint.py prune --model /tmp/llama3-8b-random --method wanda --nsamples 2 --seqlen 128
    python benchmarks/big_checkpoint.py sweep --nsamples 2 --seqlen 128 --out benchmarks/results/big_checkpoint

``build`` writes a bf16 checkpoint with a real model's block shapes (the config values of that model; RANDOM weights,
std 0.02) shard by shard, one decoder block per shard, never the whole model in memory; SmolLM2's tokenizer. ``prune``
runs ``hf_prune.prune_streaming`` in a fresh process (so its peak RSS is its own) and prints one JSON line: peak RSS,
checkpoint size, seconds per block, total. ``sweep`` does that for every shape (SmolLM2-135M, a Llama-3.2-1B shape,
a Llama-3.1-8B shape), writes a table, a plot of time per block and peak RSS against parameters, and a linear cost
model per block (seconds = a + b * block parameters) fitted on them, with its PREDICTION for a 70B-shape prune on
this machine. A benchmark prints tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # the real configs' block shapes
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, head_dim=64,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, head_dim=128,
    ),
    "llama3-70b": dict(  # for the prediction only (not built here: 141 GB)
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, head_dim=128,
    ),
}  # fmt: skip
STEPS = {
    "wanda": [{"method": "wanda", "sparsity": 0.5}],
    "sparsegpt-2of4": [{"method": "sparsegpt", "structure": "2:4"}],
    "width-mlp20": [{"method": "width", "mlp": 0.2}],
}


def block_parameters(shape: dict) -> int:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    return h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h


def build(shape_name: str, out: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Write the checkpoint block by block: each tensor is made, written and dropped (peak: one block). ``layers``:
    fewer blocks of the same shapes (a per-block measurement of a method too slow for the whole model here)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_prune.assets import resolve_packaged_model

    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shape = {**SHAPES[shape_name], **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(**shape, max_position_embeddings=8192, dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    names = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in names:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    n = len(groups)
    weight_map, total = {}, 0
    for j, (key, members) in enumerate(groups.items()):
        file = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in members:
            shape = names[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in members})
        del tensors
        print(f"wrote {file} ({key})", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_packaged_model("packaged:smollm2-135m")).save_pretrained(tmp)
    tmp.rename(out)
    return out


class PeakTracer:
    """Samples this process's resident size every few milliseconds and, at each new high, keeps the main thread's
    Python stack: where the peak happens (``prune --trace-rss``). Sampling, so a spike shorter than the interval can
    be missed; the peak itself is still VmHWM's."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak, self.where, self.timeline = interval, 0, [], []
        self.main = threading.main_thread().ident
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        import traceback

        ticks = 0
        while not self.stop.wait(self.interval):
            now = self.rss()
            ticks += 1
            if ticks % max(1, int(2.0 / self.interval)) == 0:  # the resident size every 2 s: creep shows here
                self.timeline.append(round(now / 2**30, 3))
            if now > self.peak + (16 << 20) or (now > self.peak and not self.where):
                self.peak = now
                frame = sys._current_frames().get(self.main)
                stack = traceback.extract_stack(frame)[-8:] if frame is not None else []
                self.where.append(
                    {
                        "rss_gib": round(now / 2**30, 3),
                        "stack": [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in stack],
                    }
                )

    def __enter__(self) -> PeakTracer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def prune(model: Path, method: str, nsamples: int, seqlen: int, device: str, trace: bool = False) -> dict:
    """One streaming prune in this process; its measurements (with ``trace``, the stacks of the RSS highs)."""
    import shutil
    import tempfile
    from contextlib import nullcontext

    from hf_prune import prune_streaming
    from hf_prune.utils import peak_rss_bytes, setup_logging

    setup_logging()
    out = Path(tempfile.mkdtemp(prefix="big_prune_", dir=str(model.parent))) / "out"
    recipe = {
        "device": device,
        "calibration": {"source": "fortunes", "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
        "steps": STEPS[method],
    }
    tracer = PeakTracer() if trace else nullcontext()
    start = time.perf_counter()
    with tracer:
        report = prune_streaming(model, recipe, out)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    blocks = report.steps[0].details.get("block_seconds", [])  # weight steps; width: the total over the blocks
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "model": str(model),
        "method": method,
        "calibration": f"{nsamples} x {seqlen}",
        "placement": report.placement,
        "checkpoint_bytes": size,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_fraction": round(peak_rss_bytes() / size, 4),
        "total_s": round(seconds, 1),
        "seconds_per_block": round((sum(blocks) if blocks else seconds) / (len(blocks) or report.num_blocks), 2),
        "block_seconds": blocks,
        **({"rss_highs": tracer.where[-6:], "rss_every_2s_gib": tracer.timeline} if trace else {}),
    }


def prune_in_subprocess(model: Path, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "prune", "--model", str(model), "--method", method]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        folder = build(shape, Path(args.work) / f"{shape}-random")
        for method in args.methods:
            row = prune_in_subprocess(folder, method, args)
            row["shape"], row["block_params"] = shape, block_parameters(SHAPES[shape])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "block_seconds"}), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    write_report(rows, args.methods, out)


def record(row: dict, shape: str, out: Path) -> None:
    """Put one measured row into ``out``'s results (replacing the same shape and method's) and rewrite the report."""
    row = {k: v for k, v in row.items() if k not in ("rss_highs", "rss_every_2s_gib")}
    row["shape"], row["block_params"] = shape, block_parameters(SHAPES[shape])
    path = out / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if (r["shape"], r["method"]) != (shape, row["method"])] + [row]
    path.write_text(json.dumps(rows, indent=2))
    write_report(rows, sorted({r["method"] for r in rows}), out)


def write_report(rows: list[dict], methods: list[str], out: Path) -> None:
    """The table, the cost model and its 70B prediction, and the plot, from the measured rows."""
    lines = [
        "| shape | method | block params | checkpoint | peak RSS | RSS / checkpoint | s per block | total (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['block_params'] / 1e6:.1f}M | "
            f"{r['checkpoint_bytes'] / 2**30:.2f} GiB | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['rss_fraction']:.3f} | {r['seconds_per_block']} | {r['total_s']} |"
        )
    lines += ["", "Cost model per block (least squares over the rows above): seconds = a + b * block parameters."]
    big = SHAPES["llama3-70b"]
    for method in methods:
        pts = [(r["block_params"], r["seconds_per_block"]) for r in rows if r["method"] == method]
        if len(pts) < 2:
            continue
        mx = sum(p for p, _ in pts) / len(pts)
        my = sum(s for _, s in pts) / len(pts)
        b = sum((p - mx) * (s - my) for p, s in pts) / max(sum((p - mx) ** 2 for p, _ in pts), 1e-9)
        a = my - b * mx
        predicted = (a + b * block_parameters(big)) * big["num_hidden_layers"]
        lines.append(
            f"- {method}: a = {a:.2f} s, b = {b * 1e9:.2f} s per 1e9 parameters; PREDICTION (not measured) for a "
            f"Llama-3-70B-shape prune on this machine, same calibration: {predicted / 60:.0f} min"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out / "big_checkpoint.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted(
            (r["block_params"], r["seconds_per_block"], r["peak_rss_bytes"]) for r in rows if r["method"] == method
        )
        ax1.plot([p / 1e6 for p, _, _ in pts], [s for _, s, _ in pts], "o-", label=method)
        ax2.plot([p / 1e6 for p, _, _ in pts], [m / 2**30 for _, _, m in pts], "o-", label=method)
    ax1.set(xlabel="parameters per block (M)", ylabel="seconds per block", title="time per block (streaming)")
    ax2.set(xlabel="parameters per block (M)", ylabel="peak RSS (GiB)", title="peak memory (streaming)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "llama3-70b"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, help="only this many blocks (same shapes): per-block measurements")
    p = sub.add_parser("prune")
    p.add_argument("--model", required=True)
    p.add_argument("--method", choices=list(STEPS), default="wanda")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--trace-rss", action="store_true", help="record where the resident size reaches its highs")
    p.add_argument("--record", metavar="DIR", help="replace this shape and method's row of DIR/results.json, rewrite")
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "llama3-70b"], help="the shape (with --record)")
    p = sub.add_parser("report", help="table, cost model and plot from a sweep's results.json")
    p.add_argument("--out", default="benchmarks/results/big_checkpoint")
    p = sub.add_parser("sweep")
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3.2-1b", "llama3-8b"])
    p.add_argument("--methods", nargs="+", default=["wanda"])
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default="/tmp/hf_prune_big")
    p.add_argument("--out", default="benchmarks/results/big_checkpoint")
    args = parser.parse_args()
    if args.command == "build":
        build(args.shape, Path(args.out), layers=args.layers)
    elif args.command == "prune":
        if args.record and not args.shape:
            parser.error("--record needs --shape (the row's key)")
        row = prune(Path(args.model), args.method, args.nsamples, args.seqlen, args.device, args.trace_rss)
        print(json.dumps(row))
        if args.record:
            record(row, args.shape, Path(args.record))
    elif args.command == "report":
        rows = json.loads((Path(args.out) / "results.json").read_text())
        write_report(rows, sorted({r["method"] for r in rows}), Path(args.out))
    else:
        sweep(args)


if __name__ == "__main__":
    main()
