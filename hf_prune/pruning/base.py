"""What every pruning step shares: the step config and the method interface. The run context lives in
``context.py``, weight pruning's orchestration in ``weight_pruning.py``, target selection in ``targets.py`` and the
routed experts' calibration in ``expert_calibration.py``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..configuration import StrictConfig
from ..report import StepReport
from .context import PruneContext


@dataclass
class StepConfig(StrictConfig):
    """Base of every step config: the registered method name."""

    method: str = ""


class PruningMethod(ABC):
    """One step of a recipe. Subclasses are registered with ``register_method``."""

    needs_calibration: bool = True
    # False: the step edits tensors outside the block being walked (or copies the model), which offloaded weights
    # (accelerate CPU/disk offload, hf_prune's onloading) cannot follow; such a recipe is refused before any work.
    supports_offload: bool = True

    def __init__(self, config: StepConfig):
        self.config = config

    def preflight(self, ctx: PruneContext) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Check the request against the model before any work starts (raise RecipeError)."""

    @abstractmethod
    def run(self, ctx: PruneContext) -> StepReport: ...

    def block_work_bytes(self, block_parameters: int, activation_bytes: int) -> int:
        """Memory one block's work needs on the execution device beyond the common estimate
        (``placement.calibration_headroom``), given the block's parameter count and the bytes of the calibration
        activations at a block boundary."""
        return 0

    def pruning_config(self) -> dict[str, Any]:
        """What goes into config.json's ``pruning_config`` for this step."""
        return self.config.to_dict()
