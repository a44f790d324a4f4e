"""lm-eval on saved SmolLM2-135M checkpoints: dense vs Wanda 50% vs depth 20%, through ``hf-prune eval`` (the shipped
offline tasks: wikipedia_lead_ppl, wikipedia_lead_mc).

    python benchmarks/lm_eval_table.py

A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from hf_prune import HFPruner
from hf_prune.assets import resolve_packaged_model

CALIB = {"source": "fortunes", "nsamples": 32, "seqlen": 512, "seed": 0}
MODELS = {
    "dense": None,
    "wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "depth-20 (angular)": [{"method": "depth", "criterion": "angular", "ratio": 0.2}],
}


def main() -> None:
    work = tempfile.mkdtemp(prefix="hf_prune_lmeval_")
    rows = {}
    for name, steps in MODELS.items():
        folder = resolve_packaged_model("packaged:smollm2-135m")
        if steps:
            pruner = HFPruner.from_pretrained("packaged:smollm2-135m", recipe={"calibration": CALIB, "steps": steps})
            pruner.prune()
            folder = str(pruner.save_pretrained(os.path.join(work, name.split()[0])))
        out = subprocess.run(
            [sys.executable, "-m", "hf_prune.cli", "eval", "--model", folder, "--device", "cpu", "--json"],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rows[name] = json.loads(out.stdout[out.stdout.index("{") :])["results"]
        print(name, rows[name], file=sys.stderr, flush=True)
    print(
        "\nSmolLM2-135M, `hf-prune eval --model DIR` (lm-eval 0.4, shipped offline tasks, full task sizes: 200 lead "
        "sections; 300 four-way items)."
    )
    print("\n| model | wikipedia_lead_ppl word ppl | bits per byte | wikipedia_lead_mc acc | acc_norm |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        p, m = r["wikipedia_lead_ppl"], r["wikipedia_lead_mc"]
        print(
            f"| {name} | {p['word_perplexity']:.2f} | {p['bits_per_byte']:.4f} | {m['acc']:.3f} "
            f"(+-{m['acc_stderr']:.3f}) | {m['acc_norm']:.3f} |"
        )


if __name__ == "__main__":
    main()
