"""lm-eval integration: run lm-evaluation-harness on an in-memory model, and ship tasks that run offline.

Shipped tasks (written once, with absolute data paths, under ``<cache>/lm_eval_tasks``; pass that folder to lm-eval's
own CLI as ``--include_path``):

- ``wikipedia_lead_ppl``: ``loglikelihood_rolling`` over the first 200 packaged Wikipedia lead sections (file order);
  word/byte perplexity and bits per byte, lm-eval's document-level convention.
- ``wikipedia_lead_mc``: 300 multiple-choice items: the first sentence of a lead section is cut at 60% of its words;
  pick the true continuation among it and the continuations of 3 other articles (seeded). acc and acc_norm.

Both use the first half of the extracts, which the fallback calibration text (``wikipedia-tail``) never reads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import HFPruneError
from ..utils import cache_dir

TASKS_VERSION = "v2"
SHIPPED_TASKS = ("wikipedia_lead_ppl", "wikipedia_lead_mc")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def build_mc_items(docs: list[str], n_items: int = 300, n_choices: int = 4, seed: int = 1234) -> list[dict]:
    """Multiple-choice items from real text: true continuation of a sentence vs continuations from other articles."""
    rng = random.Random(seed)
    cut = []
    for doc in docs:
        words = _first_sentence(doc).split()
        if len(words) >= 12:
            k = int(len(words) * 0.6)
            cut.append((" ".join(words[:k]), " " + " ".join(words[k:])))
        if len(cut) >= n_items * 2:
            break
    items = []
    for context, truth in cut:
        others = sorted({c for _, c in cut if c != truth})  # distinct from the truth and from each other
        if len(others) < n_choices - 1:
            continue
        choices = [truth, *rng.sample(others, n_choices - 1)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(truth)})
        if len(items) == n_items:
            break
    return items


def _task_yaml(name: str, data_file: Path, body: str) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n" + body + "metadata:\n  version: 1.0\n"
    )


def task_dir() -> Path:
    """The folder holding the shipped task definitions and their data (built once from the packaged text)."""
    target = Path(cache_dir()) / "lm_eval_tasks" / TASKS_VERSION
    if (target / "wikipedia_lead_mc.yaml").exists():
        return target
    from ..calibration.builtin_texts import wikipedia_documents

    docs = wikipedia_documents()
    head = docs[: len(docs) // 2]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tasks-", dir=target.parent))
    try:
        ppl_file, mc_file = target / "wikipedia_lead_ppl.jsonl", target / "wikipedia_lead_mc.jsonl"
        (tmp / ppl_file.name).write_text("".join(json.dumps({"text": d}) + "\n" for d in head[:200]))
        (tmp / mc_file.name).write_text("".join(json.dumps(x) + "\n" for x in build_mc_items(head)))
        (tmp / "wikipedia_lead_ppl.yaml").write_text(
            _task_yaml(
                "wikipedia_lead_ppl",
                ppl_file,
                "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                "metric_list:\n"
                "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
                "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
                "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n",
            )
        )
        (tmp / "wikipedia_lead_mc.yaml").write_text(
            _task_yaml(
                "wikipedia_lead_mc",
                mc_file,
                "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                "doc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def flatten_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section as {task: {metric: value}} (filters like ``,none`` dropped, stderr kept)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            clean[key.split(",")[0]] = float(value)
        out[task] = clean
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any = None,
    tasks: list[str] | tuple[str, ...] = SHIPPED_TASKS,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate with lm-evaluation-harness; the shipped offline tasks are always on the include path.

    Args:
        model: an in-memory ``transformers`` model (wrapped in lm-eval's ``HFLM``), or a folder / Hub id.
        tokenizer: the tokenizer for an in-memory model.
        tasks: lm-eval task names (shipped ones, or standard ones such as ``arc_easy`` where their data is reachable).
        limit: examples per task (a count, or a fraction).
        model_args: extra ``HFLM`` arguments for a folder / Hub id (e.g. ``{"trust_remote_code": True}``).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise HFPruneError("Evaluation needs lm-eval: pip install 'hf-prune[eval]' (or pip install lm-eval).") from exc

    if device is None:
        import torch

        from ..calibration.engine import model_device

        if isinstance(model, (str, os.PathLike)):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = str(model_device(model))
    if isinstance(limit, float) and limit >= 1:
        limit = int(limit)
    kwargs = dict(model_args or {})
    if isinstance(model, (str, os.PathLike)):
        lm = HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, device=device, **kwargs)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(task_dir()))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HFPruneError(f"Unknown lm-eval task(s) {unknown}. Shipped offline tasks: {', '.join(SHIPPED_TASKS)}.")
    output = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
    )
    return flatten_results(output["results"])
