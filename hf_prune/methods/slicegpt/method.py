"""SliceGPT-style width slicing: make the network rotation-invariant, rotate the residual stream onto its principal
components, delete the least important rows/columns, and save a model that loads where HF models load."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import distributed
from ...adapters import LinearRef, ModelAdapter, get_submodule, weight_out_in
from ...calibration.engine import BlockwiseEngine, hooks
from ...errors import RecipeError, UnsupportedModelError
from ...pruning.base import PruneContext, PruningMethod, StepConfig
from ...report import StepReport
from ...utils import logger
from . import rotation as R
from .runtime import add_shortcuts, resize_module, to_rms_layernorm

READER_ROLES = {"attn": ("q", "k", "v", "qkv"), "mlp": ("gate", "up", "gate_up")}
WRITER_ROLES = {"attn": ("o",), "mlp": ("down",)}
SLICEABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "opt")
# A plain class with a smaller hidden_size needs head_dim to be read from the config, not derived from hidden_size.
PLAIN_WHEN_SHARED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
WHY_NOT = {
    "gemma3_text": "its post-attention and post-feedforward (sandwich) norms normalize each branch's output before it "
    "joins the residual stream, so a rotation of the stream cannot pass through them",
    "gemma2": "its sandwich norms (see gemma3_text) break rotation invariance",
    "gemma": "its embeddings are scaled by sqrt(hidden_size) inside the model and its norms use (1 + weight)",
    "gpt2": "its attention derives head sizes and the q/k/v split from hidden_size (n_embd), which slicing changes",
}


@dataclass
class SliceGPTConfig(StepConfig):
    """SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024).

    Args:
        slicing: fraction of the hidden dimension to delete, in [0, 1).
        rotation: ``per_block`` (a PCA basis per block, computed block by block on the already sliced model, with
            d' x d' shortcut matrices on the residual between bases; saved with a modeling file: load with
            ``trust_remote_code=True``) or ``shared`` (one basis for the whole stream: no shortcuts, and for
            llama-like families a plain checkpoint with a smaller ``hidden_size``).
        round_to: the kept dimension is rounded down to a multiple of this (8: friendly to GPU kernels).

    Example recipe::

        steps:
          - {method: slicegpt, slicing: 0.25}                 # rotation: per_block (default) or shared
    """

    method: str = "slicegpt"
    slicing: float = 0.25
    rotation: str = "per_block"
    round_to: int = 8

    def validate(self) -> None:
        if isinstance(self.slicing, bool) or not isinstance(self.slicing, (int, float)) or not 0 <= self.slicing < 1:
            raise RecipeError(f"slicegpt.slicing must be in [0, 1), got {self.slicing!r}.")
        if self.rotation not in ("per_block", "shared"):
            raise RecipeError(f"slicegpt.rotation must be 'per_block' or 'shared', got {self.rotation!r}.")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise RecipeError(f"slicegpt.round_to must be a positive integer, got {self.round_to!r}.")


def _norm_modules(adapter: ModelAdapter, index: int) -> dict[str, nn.Module]:
    block = adapter.blocks[index]
    return {role: get_submodule(block, path) for role, path in adapter.spec.norms.items()}


def _by_role(refs: list[LinearRef], roles) -> list[LinearRef]:
    return [r for r in refs if r.role in roles]


def _recorder(store: list):
    return lambda module, args: store.append(args[0])


def _projector(P: torch.Tensor):
    return lambda module, args: (args[0] @ P,) + tuple(args[1:])


def _is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm)


class SliceGPTMethod(PruningMethod):
    """Width slicing by PCA rotation (SliceGPT). Families: llama, mistral, qwen2, qwen3, phi3, opt."""

    config: SliceGPTConfig
    supports_offload = False  # edits every block at once / copies the model

    # ------------------------------------------------------------------ checks
    def preflight(self, ctx: PruneContext) -> None:
        adapter = ctx.adapter
        family = adapter.model_type
        if family in WHY_NOT:
            raise UnsupportedModelError(f"SliceGPT does not support '{family}': {WHY_NOT[family]}.")
        if adapter.spec is None or family not in SLICEABLE:
            raise UnsupportedModelError(
                f"SliceGPT supports {', '.join(SLICEABLE)}; '{family}' has no verified rotation-invariant layout."
            )
        cfg = ctx.model.config
        if family == "opt" and (not cfg.do_layer_norm_before or cfg.word_embed_proj_dim != cfg.hidden_size):
            raise UnsupportedModelError("SliceGPT supports pre-norm OPT models without project_in/out (not OPT-350m).")
        if getattr(cfg, "pruning_config", None) and any(
            s.get("method") == "slicegpt" for s in cfg.pruning_config.get("steps", [])
        ):
            raise RecipeError("This model is already sliced; slice the original model instead.")

    # ------------------------------------------------------------------ 1. rotation invariance
    @torch.no_grad()
    def make_rotation_invariant(self, model: nn.Module, adapter: ModelAdapter) -> list[str]:
        """Fold every norm's scale (and LayerNorm shift) into the linears that read it; for LayerNorm models, make
        the residual stream mean-zero and let the norms stop centring (SliceGPT's RMSN). Outputs do not change."""
        notes = []
        self.added_bias = []
        head = model.get_output_embeddings()
        if head.weight is model.get_input_embeddings().weight:
            head.weight = nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            notes.append("untied the output head from the input embeddings: they use different rotations")
        layer_norm = any(_is_layernorm(m) for m in _norm_modules(adapter, 0).values())
        if layer_norm:
            for emb in adapter.embeddings():
                emb.weight.copy_(R.center_rows(emb.weight))
        for i in range(adapter.num_blocks):
            refs, norms = adapter.linears(i), _norm_modules(adapter, i)
            for part, norm_role in (("attn", "attn_in"), ("mlp", "mlp_in")):
                self._fold(norms[norm_role], _by_role(refs, READER_ROLES[part]))
                if layer_norm:
                    for w in _by_role(refs, WRITER_ROLES[part]):
                        w.module.weight.copy_(R.center_columns(w.module.weight))
                        if w.module.bias is not None:
                            w.module.bias.sub_(w.module.bias.mean())
        final = get_submodule(model, adapter.spec.final_norm)
        self._fold(final, [LinearRef("lm_head", "head", "", head)])
        if layer_norm:
            block_norms = [
                f"{adapter.block_name(i)}.{p}" for i in range(adapter.num_blocks) for p in adapter.spec.norms.values()
            ]
            for path in [*block_norms, adapter.spec.final_norm]:
                to_rms_layernorm(model, path)
            notes.append("centred the residual stream and turned LayerNorm into RMS normalization (SliceGPT's RMSN)")
        return notes

    added_bias: list[str]

    def _fold(self, norm: nn.Module, readers: list[LinearRef]) -> None:
        gamma = norm.weight.detach().float()
        beta = getattr(norm, "bias", None)
        for ref in readers:
            w = weight_out_in(ref.module)
            if beta is not None:
                new_bias = R.fold_shift_into_bias(w.float(), ref.module.bias, beta.float())
                if ref.module.bias is None:
                    ref.module.bias = nn.Parameter(new_bias.to(w.dtype))
                    self.added_bias.append(ref.name)
                else:
                    ref.module.bias.copy_(new_bias)
            w.copy_(R.fold_scale_into_readers(w.float(), gamma).to(w.dtype))
        norm.weight.fill_(1.0)
        if beta is not None:
            beta.zero_()

    # ------------------------------------------------------------------ 2. bases
    @staticmethod
    def _cov(chunks: list[torch.Tensor]) -> torch.Tensor:
        """X^T X over the chunks (and over the ranks of a data-parallel run): a running sum, one chunk at a time,
        each product in float32 (no float64 copy of any activation), the d x d sum in float64."""
        cov = None
        for chunk in chunks:
            x = chunk.reshape(-1, chunk.shape[-1]).float()
            part = (x.t() @ x).double()
            cov = part if cov is None else cov.add_(part)
        return distributed.all_reduce_sum(cov)

    @torch.no_grad()
    def shared_basis(self, engine: BlockwiseEngine) -> torch.Tensor:
        """One dense pass: the principal basis of the residual stream at every block boundary together."""
        cov = None
        for step in engine.walk(desc="slicegpt: shared PCA"):
            outputs = step.forward()
            c = self._cov(step.inputs) + self._cov(outputs)
            cov = c if cov is None else cov + c
            step.info["outputs"] = outputs
        return R.principal_basis(cov)[0]

    @torch.no_grad()
    def per_block_bases(
        self, engine: BlockwiseEngine, adapter: ModelAdapter, kept: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Block by block on the already sliced model (simulated in full coordinates by projections), as SliceGPT
        does: the stream's basis A_0 from the embeddings; for block l, the MLP-input basis M_l from the stream after
        its attention, and its output basis A_{l+1} from the stream after its MLP. Returns ([A_0..A_L], [M_0..])."""
        streams: list[torch.Tensor] = []
        mlp_inputs: list[torch.Tensor] = []
        mlp_norm_path = adapter.spec.norms["mlp_in"]
        for step in engine.walk(desc="slicegpt: per-block PCA"):
            if step.index == 0:
                streams.append(R.principal_basis(self._cov(step.inputs))[0][:, :kept])
            dtype = step.inputs[0].dtype
            A = streams[-1].to(dtype)
            step.inputs = [x @ A @ A.t() for x in step.inputs]  # the sliced model's stream, in full coordinates
            mlp_norm = get_submodule(step.block, mlp_norm_path)
            seen: list[torch.Tensor] = []
            with hooks([mlp_norm.register_forward_pre_hook(_recorder(seen))]):
                step.forward(keep_outputs=False)
            M = R.principal_basis(self._cov(seen))[0][:, :kept]
            del seen[:]
            P_M = (M @ M.t()).to(dtype)
            with hooks([mlp_norm.register_forward_pre_hook(_projector(P_M))]):
                outputs = step.forward()
            A_next = R.principal_basis(self._cov(outputs))[0][:, :kept]
            P_A = (A_next @ A_next.t()).to(dtype)
            # The sliced block: the residual lives in A_next; the MLP reads its projection onto M.
            with hooks([mlp_norm.register_forward_pre_hook(_projector(P_A @ P_M))]):
                outputs = step.forward()
            step.info["outputs"] = [y @ P_A for y in outputs]
            mlp_inputs.append(M)
            streams.append(A_next)
        return streams, mlp_inputs

    # ------------------------------------------------------------------ 3. rotate and slice
    @torch.no_grad()
    def rotate_and_slice(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        bases: list[torch.Tensor],
        mlp_bases: list[torch.Tensor],
        kept: int,
        shortcuts: bool,
    ) -> dict[str, list[int]]:
        """Apply the bases to every weight (bases[l]: block l's input basis, bases[l + 1]: its output basis,
        mlp_bases[l]: its MLP-input basis) and delete the sliced rows/columns; return the new shapes."""
        hidden = bases[0].shape[0]
        resized: dict[str, list[int]] = {}
        scale = R.norm_scale(hidden, kept)

        def reader(ref: LinearRef, basis: torch.Tensor) -> None:
            new = R.read_in_basis(ref.module.weight.data, basis.to(ref.module.weight.device))
            bias = ref.module.bias.data.clone() if ref.module.bias is not None else None  # readers keep their bias
            resize_module(ref.module, new.shape)
            ref.module.weight.copy_(new)
            if bias is not None:
                ref.module.bias.copy_(bias)
            resized[ref.name] = list(new.shape)

        def writer(ref: LinearRef, basis: torch.Tensor) -> None:
            bias = ref.module.bias.data if ref.module.bias is not None else None
            new_w, new_b = R.write_in_basis(ref.module.weight.data, bias, basis.to(ref.module.weight.device))
            resize_module(ref.module, new_w.shape)
            ref.module.weight.copy_(new_w)
            if new_b is not None:
                ref.module.bias.copy_(new_b)
            resized[ref.name] = list(new_w.shape)

        def norm(path: str) -> None:
            module = get_submodule(model, path)
            resize_module(module, (kept,))
            module.weight.fill_(scale)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            resized[path] = [kept]

        for path in adapter.spec.embeddings:
            emb = get_submodule(model, path)
            new = R.embed_in_basis(emb.weight.data, bases[0].to(emb.weight.device))
            resize_module(emb, new.shape)
            emb.weight.copy_(new)
            resized[path] = list(new.shape)
        for i in range(adapter.num_blocks):
            refs = adapter.linears(i)
            B_in, B_out, B_mlp = bases[i], bases[i + 1], mlp_bases[i]
            for ref in _by_role(refs, READER_ROLES["attn"]):
                reader(ref, B_in)
            for ref in _by_role(refs, WRITER_ROLES["attn"]) + _by_role(refs, WRITER_ROLES["mlp"]):
                writer(ref, B_out)
            for ref in _by_role(refs, READER_ROLES["mlp"]):
                reader(ref, B_mlp)
            for path in adapter.spec.norms.values():
                norm(f"{adapter.block_name(i)}.{path}")
            if shortcuts:
                block = adapter.blocks[i]
                device = next(block.parameters()).device
                add_shortcuts(
                    block,
                    kept,
                    adapter.spec.norms["attn_in"],
                    adapter.spec.norms["mlp_in"],
                    R.shortcut(B_in, B_out).to(device),
                    R.shortcut(B_out, B_mlp).to(device),
                )
        norm(adapter.spec.final_norm)
        head = model.get_output_embeddings()
        reader(LinearRef("lm_head", "head", "", head), bases[-1])
        return resized

    # ------------------------------------------------------------------ run
    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        c = self.config
        model, adapter = ctx.model, ctx.adapter
        report = StepReport(c.method, c.to_dict(), c.non_default_dict())
        params_before = sum(p.numel() for p in model.parameters())
        hidden = model.config.hidden_size
        kept = R.sliced_dim(hidden, c.slicing, c.round_to)
        family = adapter.model_type
        notes = self.make_rotation_invariant(model, adapter)
        rms_paths = [n for n, m in model.named_modules() if type(m).__name__ == "RMSLayerNorm"]
        shortcuts = c.rotation == "per_block"
        plain = not shortcuts and not rms_paths and not self.added_bias and family in PLAIN_WHEN_SHARED
        if plain:
            kept = self.plain_hidden_size(model.config, kept, c.round_to, notes)
        engine = ctx.engine()
        if c.rotation == "shared":
            Q = self.shared_basis(engine)[:, :kept]
            bases, mlp_bases = [Q] * (adapter.num_blocks + 1), [Q] * adapter.num_blocks
        else:
            bases, mlp_bases = self.per_block_bases(engine, adapter, kept)
        resized = self.rotate_and_slice(model, adapter, bases, mlp_bases, kept, shortcuts)
        spec = {
            "hidden": kept,
            "original_hidden": hidden,
            "resize": resized,
            "rms_layernorm": rms_paths,
            "shortcuts": adapter.blocks_path if shortcuts else None,
            "attn_in_norm": adapter.spec.norms["attn_in"],
            "mlp_in_norm": adapter.spec.norms["mlp_in"],
            "add_bias": self.added_bias,
        }
        ctx.model = self.finalize(model, spec, family, plain=plain)
        params_after = sum(p.numel() for p in ctx.model.parameters())
        report.details = {
            "hidden_size": [hidden, kept],
            "rotation": c.rotation,
            "params": [params_before, params_after],
            "saved_as": "modeling file + auto_map (load with trust_remote_code=True)"
            if hasattr(ctx.model.config, "hf_prune_slicing")
            else "plain transformers class",
            "notes": notes,
        }
        logger.info(
            "slicegpt: hidden %d -> %d (%s), parameters %s -> %s",
            hidden,
            kept,
            c.rotation,
            f"{params_before:,}",
            f"{params_after:,}",
        )
        report.time_s = time.perf_counter() - start
        return report

    @staticmethod
    def plain_hidden_size(config: Any, kept: int, round_to: int, notes: list[str]) -> int:
        """The largest hidden size <= ``kept`` (a multiple of ``round_to``) that the model's own config class accepts.

        A shared rotation saves the model as its plain transformers class, whose config may validate the shape (Llama
        in transformers 5 wants hidden_size to be a multiple of num_attention_heads, even with an explicit
        head_dim); slicing a little more is better than a checkpoint that will not load."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        first_error = None
        for size in range(kept, 0, -round_to):
            try:
                type(config).from_dict({**config.to_dict(), "hidden_size": size, "head_dim": head_dim})
            except Exception as err:  # huggingface_hub's StrictDataclass validation errors, or a plain ValueError
                first_error = first_error or err
                continue
            if size != kept:
                notes.append(
                    f"hidden size {size} instead of {kept}: {type(config).__name__} rejects {kept} "
                    f"({str(first_error).strip().splitlines()[-1].strip()})"
                )
                logger.warning("slicegpt: %s", notes[-1])
            return size
        raise RecipeError(
            f"slicegpt: no hidden size <= {kept} (multiple of {round_to}) is accepted by {type(config).__name__}: "
            f"{first_error}. Use rotation: per_block, or a different round_to."
        )

    @staticmethod
    def finalize(model: nn.Module, spec: dict[str, Any], family: str, plain: bool) -> nn.Module:
        """Rebuild the sliced model as a class that save_pretrained / from_pretrained understand."""
        from ...surgery import rebuild_model
        from .remote import rebuild_with_modeling_file

        config = model.config
        config.tie_word_embeddings = False
        if not plain:
            return rebuild_with_modeling_file(model, spec, "slicegpt")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        new_config = type(config).from_dict({**config.to_dict(), "hidden_size": spec["hidden"], "head_dim": head_dim})
        return rebuild_model(model, lambda: type(model)(new_config), "slicegpt")
