"""Model cards and pushing pruned checkpoints to the Hugging Face Hub."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import HFPruneError
from .eval.perplexity import PERPLEXITY_CONVENTION
from .version import __version__

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(HFPruneError):
    """The Hub refused or could not be reached; nothing local was changed."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def build_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> str:
    """A README.md (YAML metadata + body) for a pruned checkpoint folder, from its ``config.json``
    ``pruning_config`` and ``pruning_report.json``: what was pruned and how, sizes, measured results, usage."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    report = _read_json(folder / "pruning_report.json")
    pc = config.get("pruning_config") or {}
    steps = pc.get("steps", [])
    methods = [s.get("method") for s in steps if s.get("method")]
    base = pc.get("base_model")
    tags = ["pruned", "hf_prune", *methods]
    for s in steps:
        if s.get("structure") and s["structure"] != "unstructured":
            tags.append(f"sparsity-{s['structure'].replace(':', 'of')}")
        if s.get("sparsity_profile") == "owl":
            tags.append("owl")
    if pc.get("heal"):
        tags.append("healed")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        base_model=base if base and HUB_ID.match(base) and not os.path.exists(base) else None,
    )
    name = repo_id or folder.name
    lines = [f"# {name}", ""]
    origin = f"`{base}`" if base else "its dense base model"
    lines += [
        f"Pruned from {origin} with [hf_prune](https://pypi.org/project/hf-prune/) "
        f"{pc.get('hf_prune_version', __version__)} ({' then '.join(methods) or 'no steps'}).",
        "",
    ]

    recipe = {"calibration": pc.get("calibration"), "steps": steps}
    if pc.get("heal"):
        recipe["heal"] = {k: v for k, v in pc["heal"].items() if k in ("mask", "steps", "tokens", "distill")}
    lines += ["## What was done", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]

    lines += ["## Size", "", "| | before | after |", "|---|---|---|"]
    if report:
        lines.append(f"| parameters | {report.get('params_before', 0):,} | {report.get('params_after', 0):,} |")
        lines.append(
            f"| non-zero parameters | {report.get('nonzero_before', 0):,} | {report.get('nonzero_after', 0):,} |"
        )
        after = report.get("params_after") or 1
        lines.append(f"| zeros (whole model) | - | {1 - report.get('nonzero_after', 0) / after:.2%} |")
    size = folder_size(folder)
    if size:
        lines.append(f"| safetensors on disk | - | {size / 2**20:,.1f} MiB |")
    lines += [
        "",
        "Zeros from unstructured or N:M pruning are stored as zeros: the file is as large as a dense one. "
        "Depth and width pruning make it smaller.",
        "",
    ]

    evaluation = {k: v for k, v in (report.get("evaluation") or {}).items() if k != "perplexity_convention"}
    heal_ppl = (pc.get("heal") or {}).get("perplexity_after_heal")
    if heal_ppl is not None:
        evaluation["perplexity_after_heal"] = heal_ppl
    if evaluation:
        lines += ["## Evaluation (measured by hf_prune)", "", "| metric | value |", "|---|---|"]
        for key, value in evaluation.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    lines.append(f"| {key} / {sub} | {_fmt(v)} |")
            else:
                lines.append(f"| {key} | {_fmt(value)} |")
        convention = (report.get("evaluation") or {}).get("perplexity_convention") or PERPLEXITY_CONVENTION
        lines += ["", f"Perplexity convention: {convention}.", ""]

    repo = repo_id or "<this repo>"
    lines += [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
        "",
        "`config.json` carries the pruning settings under `pruning_config`.",
        "",
        "## Reproduce",
        "",
        "Save the YAML above with `model: <base model>` added, then run `hf-prune run recipe.yaml`.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _hub_error(exc: Exception, repo_id: str, endpoint: str | None) -> HubError:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"Revision not found on {repo_id}: {exc}. Create the branch or push to main.")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"Repository {repo_id} not found on {where}, or your token cannot see it.")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return HubError(
                f"The Hub at {where} rejected the token (401). Log in with `hf auth login`, set HF_TOKEN, or pass "
                "token=... with write access."
            )
        if status == 403:
            return HubError(f"Your token may not write to {repo_id} (403). Use a token with write access to it.")
        return HubError(f"The Hub at {where} answered {status} for {repo_id}: {exc}")
    return HubError(
        f"Could not reach the Hub at {where} ({type(exc).__name__}: {exc}). Check HF_ENDPOINT and the "
        "network; nothing was uploaded."
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a saved pruned checkpoint and a generated model card; return the commit URL.

    The local folder is only read: the card is uploaded from memory, not written into it.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise HFPruneError(f"{folder} holds no config.json: not a saved model folder.")
    card = build_model_card(folder, repo_id).encode()
    operations = [
        CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload pruned model (hf_prune {__version__})",
            revision=revision,
        )
    except HFPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub/network failure becomes one actionable error
        raise _hub_error(exc, repo_id, endpoint) from exc
    return info.commit_url
