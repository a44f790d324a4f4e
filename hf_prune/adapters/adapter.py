"""Find the decoder blocks and their linears in a loaded model, from the table or from ``_no_split_modules``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..utils import logger
from .experts import ExpertRef, discover_moe, expert_linear_paths, expert_refs, is_fused
from .table import (
    FAMILIES,
    LAYOUT_TEMPLATES,
    ROUTER_ROLE,
    TEXT_ALIASES,
    VLM_FAMILIES,
    ArchSpec,
    MoESpec,
    VLMSpec,
    prefixed,
)

COMPONENTS = ("language", "vision")


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` that returns None instead of raising; an empty path is the root."""
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 style, weight stored as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) view that shares storage with the parameter."""
    w = module.weight.data
    return w.t() if is_transposed(module) else w


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


@dataclass
class LinearRef:
    """One prunable linear: its full dotted name, its role, its path inside the block, the module, its block."""

    name: str
    role: str
    local: str
    module: nn.Module
    block: int = -1
    expert: int | None = None  # a routed expert's linear (per-expert ModuleList layout)

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    def weight(self) -> torch.Tensor:
        """The (out, in) weight, a view sharing storage with the parameter."""
        return weight_out_in(self.module)

    def parameter(self) -> nn.Parameter:
        return self.module.weight

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same (out, in) view into any tensor shaped like the parameter (a mask, a gradient)."""
        return tensor.t() if is_transposed(self.module) else tensor

    @property
    def in_features(self) -> int:
        return in_features(self.module)

    @property
    def device(self) -> torch.device:
        return self.module.weight.device


WeightRef = LinearRef | ExpertRef  # what a weight-pruning step prunes: ``weight()`` gives its (out, in) view


def zero_fraction(refs: list[WeightRef]) -> float:
    """Fraction of exact zeros over the weights of these linears or experts (0.0 for none)."""
    weights = [r.weight() for r in refs]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(total, 1)


class ModelAdapter:
    """Where the decoder blocks, linears, norms and embeddings of one loaded model are.

    Args:
        model: a loaded ``transformers`` model.
        spec: override the table (for remote-code models with their own layout).
        component: for vision-language models, ``language`` (the decoder, default) or ``vision`` (the vision
            tower's blocks).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None, component: str = "language"):
        if component not in COMPONENTS:
            raise UnsupportedModelError(f"component must be one of {COMPONENTS}, got {component!r}.")
        self.model = model
        self.component = component
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        self.model_type = model_type
        self.vlm: VLMSpec | None = VLM_FAMILIES.get(model_type)
        if self.vlm is None and component == "vision":
            raise UnsupportedModelError(
                f"'{model_type}' is not a vision-language model in the table: no vision tower."
            )
        if self.vlm is not None and spec is None:
            if component == "vision":
                self.spec, self.family = None, f"{model_type}:vision"
                self.blocks_path = self.vlm.vision_blocks
                self._block_list = get_submodule(model, self.blocks_path)
                return
            text_type = getattr(getattr(config, "text_config", None), "model_type", None)
            text_type = TEXT_ALIASES.get(text_type, text_type)
            if text_type in FAMILIES:
                spec = prefixed(FAMILIES[text_type], self.vlm.language_model)
                self.text_model_type = text_type
            else:
                self.blocks_path = f"{self.vlm.language_model}.layers"
        if spec is None and model_type in FAMILIES:
            spec = FAMILIES[model_type]
            if not self._spec_matches(spec):
                logger.warning(
                    "Model type '%s' does not have the module layout of its table row; falling back to "
                    "_no_split_modules discovery.",
                    model_type,
                )
                spec = None
        self.derived_from: str | None = None  # the table layout an unlisted family was found to have exactly
        if spec is None and self.vlm is None and model_type not in FAMILIES:
            for name, template in LAYOUT_TEMPLATES.items():
                if self._has_exactly(template):
                    spec, self.derived_from = template, name
                    break
        self.spec = spec
        if spec is not None:
            self.blocks_path = spec.blocks
            self.family = model_type or "custom"
        elif self.vlm is not None:  # a VLM whose text decoder is not in the table: its layers, linears by name
            self.family = f"{model_type}:fallback"
        else:
            self.blocks_path = self._discover_blocks()
            self.family = f"fallback:{type(model).__name__}"
        self._block_list = get_submodule(model, self.blocks_path)

    # ------------------------------------------------------------------ discovery
    def _spec_matches(self, spec: ArchSpec) -> bool:
        blocks = get_submodule(self.model, spec.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        return any(is_linear(get_submodule(blocks[0], p) or nn.Identity()) for p in spec.linears.values())

    def _has_exactly(self, spec: ArchSpec) -> bool:
        """The model has this layout and nothing more in its blocks: in every block, every linear and norm of the row
        at its path, no other linear, no other norm of the block's own and no fused (3-D) expert tensor; and the row's
        embeddings and final norm."""
        blocks = get_submodule(self.model, spec.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        for block in blocks:  # every block: a MoE model may start with dense blocks
            linears = {n for n, m in block.named_modules() if n and is_linear(m)}
            if linears != set(spec.linears.values()):
                return False
            norms = {n for n, m in block.named_children() if "norm" in type(m).__name__.lower()}
            if norms != set(spec.norms.values()):  # where the norms sit decides their roles
                return False
            if any(p.dim() > 2 for p in block.parameters()):  # fused expert tensors
                return False
        paths = [*spec.embeddings, *([spec.final_norm] if spec.final_norm else [])]
        return all(get_submodule(self.model, p) is not None for p in paths)

    def _discover_blocks(self) -> str:
        names = set(getattr(self.model, "_no_split_modules", None) or [])
        candidates = []
        for path, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                if all(type(child).__name__ in names for child in module):
                    candidates.append((path, len(module)))
        if not candidates:
            supported = ", ".join(sorted(FAMILIES))
            raise UnsupportedModelError(
                f"Cannot find the decoder blocks of {type(self.model).__name__} "
                f"(model_type={self.model_type!r}): it is not in the adapter table and its _no_split_modules "
                f"({sorted(names) or 'none'}) name no nn.ModuleList. Supported families: {supported}. "
                "Add a row to hf_prune/adapters/table.py, or pass an ArchSpec to ModelAdapter."
            )
        # A VLM has several stacks (vision tower, language model): the language model's is the deepest list
        # among those that are not inside a vision module.
        text_first = sorted(candidates, key=lambda c: ("vision" in c[0] or "visual" in c[0], -c[1]))
        return text_first[0][0]

    # ------------------------------------------------------------------ blocks and linears
    @property
    def blocks(self) -> nn.ModuleList:
        return self._block_list

    @property
    def num_blocks(self) -> int:
        return len(self._block_list)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def linears(self, index: int) -> list[LinearRef]:
        """The linears of block ``index``, with their roles (table roles, or the local name as role). Routers
        carry the role ``router``."""
        block = self._block_list[index]
        prefix = self.block_name(index)
        refs: list[LinearRef] = []
        if self.spec is not None:
            for role, local in self.spec.linears.items():
                module = get_submodule(block, local)
                if module is not None and is_linear(module):
                    refs.append(LinearRef(f"{prefix}.{local}", role, local, module, index))
            known = {r.local for r in refs}
            extra = [(n, m) for n, m in block.named_modules() if n and is_linear(m) and n not in known]
        else:
            extra = [(n, m) for n, m in block.named_modules() if n and is_linear(m)]
        moe = self.moe_spec(index)
        routers = self.router_paths(index)
        if moe is not None:  # per-expert linears are experts(index), not plain linears
            extra = [(n, m) for n, m in extra if not n.startswith(moe.experts + ".")]
        for local, module in extra:
            role = ROUTER_ROLE if local in routers else local.split(".")[-1]
            refs.append(LinearRef(f"{prefix}.{local}", role, local, module, index))
        return refs

    def all_linears(self) -> list[LinearRef]:
        return [ref for i in range(self.num_blocks) for ref in self.linears(i)]

    # ------------------------------------------------------------------ mixture of experts
    def moe_spec(self, index: int) -> MoESpec | None:
        """The MoE layout of block ``index``, or None for a dense block (or a model without experts)."""
        if not hasattr(self, "_moe_specs"):
            self._moe_specs: dict[int, MoESpec | None] = {}
        if index not in self._moe_specs:
            block = self._block_list[index]
            spec = self.spec.moe if self.spec is not None else None
            if spec is None and self.spec is None:
                spec = discover_moe(block, getattr(self.model, "config", None))
            if spec is not None and get_submodule(block, spec.experts) is None:
                spec = None  # a dense block of an MoE family
            self._moe_specs[index] = spec
        return self._moe_specs[index]

    def experts_module(self, index: int) -> nn.Module | None:
        spec = self.moe_spec(index)
        return get_submodule(self._block_list[index], spec.experts) if spec is not None else None

    def router_module(self, index: int) -> nn.Module | None:
        spec = self.moe_spec(index)
        return get_submodule(self._block_list[index], spec.router) if spec is not None and spec.router else None

    def router_paths(self, index: int) -> set[str]:
        """Block-relative paths of the modules that route tokens to experts (never default pruning targets)."""
        spec = self.moe_spec(index)
        return {p for p in (spec.router, *spec.other_routers) if p} if spec is not None else set()

    def moe_blocks(self) -> list[int]:
        return [i for i in range(self.num_blocks) if self.moe_spec(i) is not None]

    def experts(self, index: int) -> list[ExpertRef]:
        """Every routed expert's gate, up and down matrix in block ``index`` (empty for a dense block)."""
        spec = self.moe_spec(index)
        if spec is None:
            return []
        experts, prefix = self.experts_module(index), self.block_name(index)
        if is_fused(experts):
            return expert_refs(experts, spec.layout, prefix, spec.experts, index)
        refs = []
        for e, mlp in enumerate(experts):
            for role, name in expert_linear_paths(mlp, spec.layout).items():
                local = f"{spec.experts}.{e}.{name}"
                refs.append(LinearRef(f"{prefix}.{local}", role, local, getattr(mlp, name), index, expert=e))
        return refs

    def weight_targets(self, index: int) -> list[LinearRef | ExpertRef]:
        """What weight pruning can prune in block ``index``: its linears and its routed experts' matrices."""
        return self.linears(index) + self.experts(index)

    def all_weight_targets(self) -> list[LinearRef | ExpertRef]:
        return [ref for i in range(self.num_blocks) for ref in self.weight_targets(i)]

    @property
    def is_vlm(self) -> bool:
        return self.vlm is not None

    def embeddings(self) -> list[nn.Module]:
        if self.spec is not None:
            return [m for p in self.spec.embeddings if (m := get_submodule(self.model, p)) is not None]
        emb = self.model.get_input_embeddings()
        return [emb] if emb is not None else []

    def lm_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def __repr__(self) -> str:
        return f"ModelAdapter(family={self.family!r}, blocks={self.blocks_path!r} x{self.num_blocks})"
