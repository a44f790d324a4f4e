"""The same Wanda / SparseGPT requests through llm-compressor (the most used public implementation), for comparison:
identical model, calibration token windows and evaluation.

llm-compressor 0.14 pins transformers <= 5.17, so it runs in its own environment:

    python -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv/bin/python benchmarks/reference_llmcompressor.py export --out /tmp/ref      # calibration windows
    .venv-ref/bin/python benchmarks/reference_llmcompressor.py prune --out /tmp/ref  # llm-compressor, timed
    .venv/bin/python benchmarks/reference_llmcompressor.py eval --out /tmp/ref       # perplexity, our convention
    .venv/bin/python benchmarks/reference_llmcompressor.py agree --out /tmp/ref --configs wanda-50  # same zeros?

Nothing of llm-compressor is imported by hf_prune; this script only drives it. A benchmark prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

CONFIGS = {
    "wanda-50": ("wanda", 0.5, "0:0"),
    "wanda-2of4": ("wanda", 0.5, "2:4"),
    "sparsegpt-50": ("sparsegpt", 0.5, "0:0"),
    "sparsegpt-2of4": ("sparsegpt", 0.5, "2:4"),
}


def export(out: str) -> None:
    import torch

    from hf_prune.assets import resolve_packaged_model
    from hf_prune.calibration.data import calibration_batch
    from hf_prune.pruner import load_model_and_tokenizer

    path = resolve_packaged_model("packaged:smollm2-135m")
    _, tokenizer = load_model_and_tokenizer(path)
    windows, info = calibration_batch("fortunes", tokenizer, 32, 512, 0)
    os.makedirs(out, exist_ok=True)
    torch.save({"windows": windows, "model": path, "info": info}, os.path.join(out, "calibration.pt"))


def prune(out: str, names: list[str]) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = torch.load(os.path.join(out, "calibration.pt"))
    windows = data["windows"]
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    times_path = os.path.join(out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for name in names:
        method, sparsity, structure = CONFIGS[name]
        model = AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(data["model"])
        cls = WandaPruningModifier if method == "wanda" else SparseGPTModifier
        # The decoder layers as targets (as llm-compressor's own 2:4 examples do): with targets=["Linear"] every
        # Linear becomes its own "layer", named "lm_head." (trailing dot), so ignore=["lm_head"] misses it and the
        # tied head/embedding matrix gets pruned too (it warns "add `re:.*lm_head` to your ignore list").
        modifier = cls(
            sparsity=sparsity, mask_structure=structure, targets=[r"re:model.layers.\d+$"], ignore=["re:.*lm_head"]
        )
        start = time.perf_counter()
        oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=[modifier],
            num_calibration_samples=32,
            max_seq_length=512,
            shuffle_calibration_samples=False,
        )
        times[name] = time.perf_counter() - start
        torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))
        print(name, times[name], flush=True)
        with open(times_path, "w") as f:  # after each configuration, so a long run can be resumed
            json.dump(times, f)


def evaluate(out: str, names: list[str]) -> None:
    import torch

    from hf_prune.adapters import ModelAdapter, zero_fraction
    from hf_prune.eval.perplexity import perplexity
    from hf_prune.pruner import load_model_and_tokenizer

    data = torch.load(os.path.join(out, "calibration.pt"))
    times = json.load(open(os.path.join(out, "times.json")))
    print(
        f"\nSmolLM2-135M; the same 32 x 512 calibration windows ({data['info']['source']}, seed 0) for both; "
        "perplexity: wikipedia, first 32 windows of 512 tokens."
    )
    print("\n| config | llm-compressor 0.14 ppl | llm-compressor time (s) | sparsity of block linears |")
    print("|---|---|---|---|")
    for name in names:
        model, tokenizer = load_model_and_tokenizer(data["model"])
        state = torch.load(os.path.join(out, f"{name}.pt"))
        model.load_state_dict(state, strict=False)
        sparsity = zero_fraction(ModelAdapter(model).all_linears())
        ppl = perplexity(model, tokenizer, "wikipedia", 512, 32)
        print(f"| {name} | {ppl:.2f} | {times[name]:.1f} | {sparsity:.4f} |")


def agree(out: str, names: list[str]) -> None:
    """Prune with hf_prune in llm-compressor's order (every linear of a block scored on the dense block's inputs:
    ``true_sequential: False``) and compare the two sets of zeros, linear by linear."""
    import torch

    from hf_prune import HFPruner
    from hf_prune.adapters import ModelAdapter, weight_out_in
    from hf_prune.pruner import load_model_and_tokenizer

    data = torch.load(os.path.join(out, "calibration.pt"))
    print("\n| config | linears | zeros shared, lowest | zeros shared, mean | lowest at |")
    print("|---|---|---|---|---|")
    for name in names:
        method, sparsity, structure = CONFIGS[name]
        step = {"method": method, "true_sequential": False}
        step.update({"structure": structure} if structure != "0:0" else {"sparsity": sparsity})
        model, tokenizer = load_model_and_tokenizer(data["model"])
        recipe = {"calibration": data["info"], "steps": [step]}  # the windows llm-compressor was given
        HFPruner(model, tokenizer, recipe).prune()
        reference = torch.load(os.path.join(out, f"{name}.pt"))
        shared = {}
        for ref in ModelAdapter(model).all_linears():
            ours = weight_out_in(ref.module) == 0
            theirs = reference[f"{ref.name}.weight"] == 0
            shared[ref.name] = float((ours & theirs).sum()) / float(ours.sum())
        lowest = min(shared, key=shared.get)
        mean = sum(shared.values()) / len(shared)
        print(f"| {name} | {len(shared)} | {shared[lowest]:.4f} | {mean:.4f} | {lowest} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["export", "prune", "eval", "agree"])
    parser.add_argument("--out", default="/tmp/hf_prune_reference")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    if args.stage == "export":
        export(args.out)
    else:
        {"prune": prune, "eval": evaluate, "agree": agree}[args.stage](args.out, args.configs)


if __name__ == "__main__":
    main()
