"""Recipe = model + calibration + steps[] + eval + output, from YAML / dict; unknown keys are errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .calibration.config import CalibrationConfig
from .configuration import StrictConfig, reject_unknown_keys
from .errors import RecipeError
from .heal.config import HealConfig
from .pruning.base import StepConfig
from .registry import get_method


@dataclass
class EvalConfig(StrictConfig):
    """Perplexity after pruning (and of the dense model first, when ``dense`` is true).

    Convention: documents joined with "\\n\\n", tokenized once, non-overlapping windows of ``seqlen`` tokens,
    remainder dropped, the first ``max_windows`` windows (all when null), ppl = exp(mean token NLL).
    """

    source: Any = "wikipedia"
    seqlen: int = 512
    max_windows: int | None = 32
    batch_size: int = 1
    dense: bool = True

    def validate(self) -> None:
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise RecipeError(f"eval.seqlen must be an integer >= 2, got {self.seqlen!r}.")
        if self.max_windows is not None and (not isinstance(self.max_windows, int) or self.max_windows < 1):
            raise RecipeError(f"eval.max_windows must be a positive integer or null, got {self.max_windows!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RecipeError(f"eval.batch_size must be a positive integer, got {self.batch_size!r}.")


@dataclass
class OutputConfig(StrictConfig):
    """Where ``hf-prune run`` saves the pruned model (and its report). ``streaming: true`` prunes a local
    safetensors checkpoint block by block without loading the model (weight-pruning steps only)."""

    dir: str | None = None
    overwrite: bool = False
    streaming: bool = False


RECIPE_KEYS = ("model", "device", "onload", "calibration", "steps", "heal", "eval", "output")
ONLOAD = ("auto", True, False)


@dataclass
class Recipe:
    """A pruning recipe. Build it from a YAML path, a YAML string, or a dict::

    model: HuggingFaceTB/SmolLM2-135M
    device: auto        # the accelerator if torch sees one (else the CPU); cpu, cuda, cuda:1 ... choose
    onload: auto        # true: weights stay in host memory, one block at a time on the device (auto: when needed)
    calibration: {source: fortunes, nsamples: 32, seqlen: 512, seed: 0}
    steps:
      - {method: wanda, sparsity: 0.5, structure: "2:4"}
    eval: {source: wikipedia, seqlen: 512, max_windows: 32}
    output: {dir: out/smollm2-wanda-2of4}
    """

    model: str | None = None
    device: str = "auto"
    onload: Any = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    steps: list[StepConfig] = field(default_factory=list)
    heal: HealConfig | None = None
    eval: EvalConfig | None = None
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(
                f"A recipe must be a mapping with keys {', '.join(RECIPE_KEYS)}; got {type(data).__name__}."
            )
        reject_unknown_keys(data, RECIPE_KEYS, "the recipe")
        steps_data = data.get("steps") or []
        if not isinstance(steps_data, list):
            raise RecipeError("recipe 'steps' must be a list of steps, each a mapping with a 'method' key.")
        steps = [parse_step(step, i) for i, step in enumerate(steps_data)]
        eval_data = data.get("eval")
        heal_data = data.get("heal")
        device = data.get("device", "auto")
        if not isinstance(device, str):
            raise RecipeError(f"device must be auto, cpu, cuda, cuda:N, xpu or mps; got {device!r}.")
        onload = data.get("onload", "auto")
        if onload not in ONLOAD or isinstance(onload, int) and not isinstance(onload, bool):
            raise RecipeError(f"onload must be auto, true or false; got {onload!r}.")
        return cls(
            model=data.get("model"),
            device=device,
            onload=onload,
            calibration=CalibrationConfig.from_dict(data.get("calibration"), "calibration"),
            steps=steps,
            heal=HealConfig.from_dict(heal_data, "heal") if heal_data is not None else None,
            eval=EvalConfig.from_dict(eval_data, "eval") if eval_data is not None else None,
            output=OutputConfig.from_dict(data.get("output"), "output"),
        )

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> Recipe:
        path = os.fspath(text_or_path)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
        elif path.endswith((".yaml", ".yml")) and "\n" not in path:
            raise RecipeError(f"Recipe file not found: {path}")
        else:
            text = path
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"The recipe is not valid YAML: {exc}") from exc
        return cls.from_dict(data or {})

    @classmethod
    def load(cls, recipe: Recipe | dict | str | os.PathLike | None) -> Recipe:
        if recipe is None:
            return cls()
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        return cls.from_yaml(recipe)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "device": self.device,
            "onload": self.onload,
            "calibration": self.calibration.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
            "output": self.output.to_dict(),
        }
        if self.heal is not None:
            out["heal"] = self.heal.to_dict()
        if self.eval is not None:
            out["eval"] = self.eval.to_dict()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_step(step: Any, index: int = 0) -> StepConfig:
    if not isinstance(step, dict) or "method" not in step:
        raise RecipeError(
            f"steps[{index}] must be a mapping with a 'method' key, e.g. {{method: wanda, sparsity: 0.5}}."
        )
    entry = get_method(step["method"])
    return entry.config_cls.from_dict(step, where=f"steps[{index}] ({step['method']})")
