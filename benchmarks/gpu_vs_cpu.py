"""The method matrix on an accelerator in bf16 against the CPU in float32: does each step run, does it prune the same
weights, how far apart are the perplexities, how long does it take and how much GPU memory does it need?

    python benchmarks/gpu_vs_cpu.py --out benchmarks/results/gpu_vs_cpu            # a machine with a GPU
    python benchmarks/gpu_vs_cpu.py --device cpu --nsamples 4 --seqlen 64 --eval-windows 1 --rows wanda-50 \\
        --out /tmp/smoke                                                            # a smoke run, here

Each row is pruned twice on the same calibration windows: reference CPU float32 (skipped with --no-reference),
candidate --device / --dtype (the recipe's ``device:``, so the default placement logic picks moved or onloaded).
Columns: ran or the error, fraction of target weights whose pruned/kept state agrees (when both models have the same
shapes), perplexity (README convention, Wikipedia, seqlen 512, first --eval-windows windows), prune time, peak GPU
memory. ``--sparse-kernels`` adds, on Ampere or newer, the prefill time of a Wanda 2:4 model (batch 8 x 512) dense
against its 2:4 linears converted by ``torch.sparse.to_sparse_semi_structured``. Writes results.json and table.md
into --out. A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

DENSE = "packaged:smollm2-135m"
MOE = "packaged:smollm2-135m-moe"
ROWS: dict[str, tuple[str, list[dict], dict]] = {  # name: (model, steps, extras: heal / streaming / generate)
    "wanda-50": (DENSE, [{"method": "wanda", "sparsity": 0.5}], {}),
    "wanda-2of4": (DENSE, [{"method": "wanda", "structure": "2:4"}], {}),
    "sparsegpt-50": (DENSE, [{"method": "sparsegpt", "sparsity": 0.5}], {}),
    "sparsegpt-2of4": (DENSE, [{"method": "sparsegpt", "structure": "2:4"}], {}),
    "owl-wanda-70": (DENSE, [{"method": "wanda", "sparsity": 0.7, "sparsity_profile": "owl"}], {}),
    "sparsegpt-2of4-reconstruct": (DENSE, [{"method": "sparsegpt", "structure": "2:4", "reconstruct": True}], {}),
    "width-mlp30-ls": (DENSE, [{"method": "width", "mlp": 0.3}], {}),
    "width-mlp30-bias": (DENSE, [{"method": "width", "mlp": 0.3, "compensate": "bias"}], {}),
    "width-mlp30-per-block": (DENSE, [{"method": "width", "mlp": 0.3, "per_block": True}], {}),
    "width-heads33": (DENSE, [{"method": "width", "heads": 0.33}], {}),
    "width-hidden12-mlp20": (DENSE, [{"method": "width", "hidden": 0.125, "mlp": 0.2}], {}),
    "depth-6": (DENSE, [{"method": "depth", "criterion": "angular", "num_blocks": 6}], {}),
    "shrink-80": (DENSE, [{"method": "shrink", "params": 0.8, "eval_nsamples": 4}], {}),
    "slicegpt-25": (DENSE, [{"method": "slicegpt", "slicing": 0.25}], {}),
    "moe-experts-reap-25": (MOE, [{"method": "experts", "criterion": "reap", "ratio": 0.25}], {}),
    "moe-width-mlp25": (MOE, [{"method": "width", "mlp": 0.25}], {}),
    "moe-wanda-50": (MOE, [{"method": "wanda", "sparsity": 0.5}], {}),
    "heal-20": (DENSE, [{"method": "wanda", "structure": "2:4"}], {"heal": 20}),
    "streaming-wanda-50": (DENSE, [{"method": "wanda", "sparsity": 0.5}], {"streaming": True}),
    "fastv-generate": (DENSE, [], {"fastv": True}),
}


def _cuda_peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def run_row(name: str, device: str, dtype: str, args: argparse.Namespace) -> dict:
    """Prune one row on ``device`` in ``dtype``; the model, perplexity, time and peak memory (or the error)."""
    import torch

    from hf_prune import HFPruner
    from hf_prune.pruner import resolve_model_path

    model_id, steps, extras = ROWS[name]
    recipe = {
        "device": device,
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "steps": steps,
    }
    result: dict = {"device": device, "dtype": dtype}
    _cuda_peak_reset(device)
    start = time.perf_counter()
    try:
        if extras.get("fastv"):
            return {**result, **fastv_row(model_id, device, dtype)}
        if extras.get("streaming"):
            from transformers import AutoModelForCausalLM

            from hf_prune import prune_streaming

            tmp = Path(tempfile.mkdtemp(prefix="gpu_vs_cpu_"))
            src = tmp / "src"
            AutoModelForCausalLM.from_pretrained(
                resolve_model_path(model_id), dtype=getattr(torch, dtype)
            ).save_pretrained(src)
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(resolve_model_path(model_id)).save_pretrained(src)
            prune_streaming(src, recipe, tmp / "out", device=device)
            seconds = time.perf_counter() - start
            pruner = HFPruner.from_pretrained(str(tmp / "out"), dtype=getattr(torch, dtype))
            placement_moved(pruner, device)
        else:
            pruner = HFPruner.from_pretrained(model_id, recipe=recipe, dtype=getattr(torch, dtype))
            pruner.prune()
            if extras.get("heal"):
                pruner.heal(max_steps=extras["heal"], distill=False)
            seconds = time.perf_counter() - start
        result.update(
            ran=True,
            seconds=round(seconds, 2),
            peak_gpu_bytes=_cuda_peak(device),
            ppl=pruner.perplexity("wikipedia", 512, args.eval_windows),
        )
        result["model"] = pruner.model
    except Exception as exc:  # noqa: BLE001 - a benchmark row records the failure and goes on
        result.update(ran=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=8))
    return result


def placement_moved(pruner, device: str) -> None:
    from hf_prune import placement

    placement.apply(pruner.model, placement.plan(pruner.model, pruner.adapter, device, nsamples=1, seqlen=512))


def fastv_row(model_id: str, device: str, dtype: str) -> dict:
    """FastV on the LLaVA-style harness (SmolLM2 + a random vision tower): generate with and without the cache."""
    import torch

    from hf_prune.vlm import enable_visual_token_pruning
    from hf_prune.vlm.harness import build_llava_smollm2

    model, processor = build_llava_smollm2()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    from PIL import Image

    image = Image.new("RGB", (64, 64), (120, 30, 200))
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
    enable_visual_token_pruning(model, "fastv", keep=0.25, layer=2)
    start = time.perf_counter()
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        plain = model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=False)
    return {
        "ran": True,
        "seconds": round(time.perf_counter() - start, 2),
        "ppl": None,
        "note": f"cached == uncached: {bool(torch.equal(cached, plain))}",
        "peak_gpu_bytes": _cuda_peak(device),
    }


def agreement(a, b) -> float | None:
    """Fraction of the target weights pruned (or kept) in both models; None when their shapes differ."""
    from hf_prune.adapters import ModelAdapter

    if a is None or b is None:
        return None
    ra, rb = ModelAdapter(a).all_weight_targets(), ModelAdapter(b).all_weight_targets()
    if [r.name for r in ra] != [r.name for r in rb]:
        return None
    same = total = 0
    for x, y in zip(ra, rb):
        wx, wy = x.weight(), y.weight()
        if wx.shape != wy.shape or "meta" in (wx.device.type, wy.device.type):
            return None
        same += int(((wx == 0).cpu() == (wy == 0).cpu()).sum())
        total += wx.numel()
    return same / max(total, 1)


def sparse_kernel_row(device: str, dtype: str, args: argparse.Namespace) -> dict:
    """Prefill (batch 8 x 512) of a Wanda 2:4 SmolLM2: dense tensors vs torch's semi-structured 2:4 kernels."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from hf_prune import HFPruner
    from hf_prune.adapters import ModelAdapter

    if not device.startswith("cuda") or torch.cuda.get_device_capability() < (8, 0):
        return {"ran": False, "error": "needs an Ampere-or-newer CUDA GPU"}
    recipe = {
        "device": device,
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "steps": [{"method": "wanda", "structure": "2:4"}],
    }
    pruner = HFPruner.from_pretrained(DENSE, recipe=recipe, dtype=getattr(torch, dtype))
    pruner.prune()
    model = pruner.model
    ids = torch.randint(0, 1000, (8, 512), device=device)

    def timed() -> float:
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / 10

    dense = timed()
    converted = 0
    for ref in ModelAdapter(model).all_linears():
        w = ref.module.weight
        try:
            ref.module.weight = torch.nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
            converted += 1
        except Exception:  # noqa: BLE001 - shapes the kernels do not take stay dense
            pass
    sparse = timed()
    return {"ran": True, "dense_s": dense, "sparse_s": sparse, "speedup": dense / sparse, "linears": converted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calib", default="fortunes")
    parser.add_argument("--no-reference", action="store_true", help="skip the CPU float32 runs")
    parser.add_argument("--sparse-kernels", action="store_true")
    parser.add_argument("--out", required=True, help="folder for results.json and table.md")
    args = parser.parse_args()
    import torch

    from hf_prune.utils import setup_logging

    setup_logging()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; pass --device cpu for a smoke run.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    rows = []
    for name in args.rows:
        ref = None if args.no_reference else run_row(name, "cpu", "float32", args)
        cand = run_row(name, args.device, args.dtype, args)
        row = {
            "row": name,
            "reference": {k: v for k, v in (ref or {}).items() if k != "model"},
            "candidate": {k: v for k, v in cand.items() if k != "model"},
            "agreement": agreement((ref or {}).get("model"), cand.get("model")),
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("row", "agreement")} | {"ran": cand["ran"]}), flush=True)
        (out / "results.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=2))
        del ref, cand
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    kernels = sparse_kernel_row(args.device, args.dtype, args) if args.sparse_kernels else None
    lines = [
        f"Candidate: {args.device} {args.dtype} ({env}); reference: CPU float32. Calibration {args.nsamples} x "
        f"{args.seqlen} {args.calib}; perplexity Wikipedia seqlen 512, first {args.eval_windows} windows.",
        "",
        "| row | ran | mask agreement | ppl CPU fp32 | ppl candidate | time CPU / candidate (s) | peak GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, f = r["candidate"], r["reference"]
        ran = "yes" if c.get("ran") else f"error: {c.get('error', '')[:80]}"
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.4f}"
        ppl = lambda x: "-" if x.get("ppl") is None else f"{x['ppl']:.2f}"  # noqa: E731
        peak = c.get("peak_gpu_bytes")
        lines.append(
            f"| {r['row']} | {ran} | {agree} | {ppl(f)} | {ppl(c)} | {f.get('seconds', '-')} / "
            f"{c.get('seconds', '-')} | {'-' if peak is None else f'{peak / 2**20:.0f} MiB'} |"
        )
    if kernels is not None:
        lines += ["", f"2:4 kernels (Wanda 2:4 SmolLM2, prefill 8 x 512): {kernels}"]
        (out / "results.json").write_text(
            json.dumps({"env": env, "args": vars(args), "rows": rows, "sparse_kernels": kernels}, indent=2)
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
