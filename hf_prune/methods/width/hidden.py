"""Hidden (residual-stream) channels, as Minitron prunes its embedding channels: where the stream's width lives in a
model, what the width walk records about the stream, which channels stay, and the cut of every tensor that holds
the stream's width, applied to the state dict the surgery path rebuilds the model from.

Removing channels changes what every RMS norm divides by. Each norm's kept weights are rescaled by
``sqrt(E[sum_kept x^2] / k / (E[sum_all x^2] / H))`` of its calibration inputs, which is exact when the removed
channels carry nothing. A family that scales its embeddings by a function of ``hidden_size`` (Gemma: sqrt) starts
the narrowed stream at another scale: every module that writes into the stream is scaled by the same ratio, so the
whole stream is, which the (scale-invariant) pre-norms and the final norm do not see.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import distributed
from ...adapters import ModelAdapter, get_submodule, is_linear, is_transposed
from ...errors import UnsupportedModelError
from ...surgery import materialized_state_dict, parameter_shapes
from ...utils import OffloadedCopy
from .scores import ChannelStats, channel_scores, keep_top, refit_kept_columns

logger = logging.getLogger(__name__)

# block linears (by role) that read the stream through a norm (their input columns go) or write into it (output rows)
READERS = ("q", "k", "v", "qkv", "gate", "up", "gate_up", "shared_gate", "shared_up", "router")
WRITERS = ("o", "down", "shared_down")


@dataclass
class ProjectorNeurons:
    """A projector's inner neurons whose count the config ties to the language model's hidden size (LLaVA's
    ``linear_1 -> act -> linear_2``, all ``hidden_size`` wide): ``reader`` (the linear that reads them and writes
    the stream) keeps ``keep`` of its ``width`` input columns, its producers the same output rows. ``cut``:
    state-dict key -> the dimension holding the neurons. They are scored on the reader's inputs when the
    calibration has images, else by their weights (the producer's row and bias, the reader's kept column)."""

    reader: str
    width: int
    keep: int
    cut: dict[str, int]


@dataclass
class StreamSites:
    """Where the stream's ``width`` channels live. ``cut``: state-dict key -> the dimension holding them (embeddings,
    head, norms, readers' inputs, writers' outputs and biases). ``norms``: every norm over the stream (module name ->
    1 when it multiplies by ``1 + weight`` as Gemma's do, else 0). ``writers``: module names of the block linears
    that write into the stream. ``moe_readers``: MoE module name -> its fused expert and router tensors that read the
    stream (state-dict key, the stream's dimension). ``embedding_scale``: the ratio by which the family's embedding
    scale changes with the narrower ``hidden_size`` (1.0 for most families). ``projector_neurons``: a VLM
    projector's inner neurons that narrow with the stream (LLaVA), if any."""

    width: int
    cut: dict[str, int] = field(default_factory=dict)
    norms: dict[str, int] = field(default_factory=dict)
    writers: list[str] = field(default_factory=list)
    moe_readers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    embedding_scale: float = 1.0
    projector_neurons: ProjectorNeurons | None = None


def _is_stream_norm(module: nn.Module, width: int) -> bool:
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    return (
        not is_linear(module)
        and weight is not None
        and weight.dim() == 1
        and weight.shape[0] == width
        and all(p.dim() == 1 for p in params.values())
    )


def stream_sites(model: nn.Module, adapter: ModelAdapter, narrowed: nn.Module) -> StreamSites:
    """Every place of ``model`` that holds the stream's width; ``narrowed`` is the meta skeleton of the narrowed
    model (for the embedding scale it computes). Raises before any work when a norm is not a
    plain RMS norm (a LayerNorm centres over the channels: removing some changes every output)."""
    width = model.config.get_text_config().hidden_size
    names = {id(m): n for n, m in model.named_modules()}
    sites = StreamSites(width)
    for emb in adapter.embeddings():
        if emb.weight.dim() == 2 and emb.weight.shape[1] == width:
            sites.cut[f"{names[id(emb)]}.weight"] = 1
    head = adapter.lm_head()
    if head is not None and head.weight.shape[-1] == width:
        sites.cut[f"{names[id(head)]}.weight"] = 1
    norm_modules = []
    final = get_submodule(model, adapter.spec.final_norm) if adapter.spec.final_norm else None
    if final is not None:
        norm_modules.append(final)
    for i in range(adapter.num_blocks):
        for path in adapter.spec.norms.values():  # the block's own norms (not q/k norms over the heads' channels)
            module = get_submodule(adapter.blocks[i], path)
            if module is not None:
                norm_modules.append(module)
        for ref in adapter.linears(i):
            transposed = is_transposed(ref.module)
            if ref.role in READERS:
                sites.cut[f"{ref.name}.weight"] = 0 if transposed else 1
            elif ref.role in WRITERS:
                sites.cut[f"{ref.name}.weight"] = 1 if transposed else 0
                if ref.module.bias is not None:
                    sites.cut[f"{ref.name}.bias"] = 0
                sites.writers.append(ref.name)
        if adapter.moe_spec(i) is not None:
            _moe_sites(sites, adapter, i, names[id(adapter.blocks[i])])
    state = None  # read from the offload's weights map only if a norm is offloaded
    for module in norm_modules:
        name = names[id(module)]
        if not _is_stream_norm(module, width):
            raise UnsupportedModelError(
                f"width.hidden: {name} ({type(module).__name__}) has no weight per stream channel to narrow and "
                "rescale; use mlp / heads, or slicegpt."
            )
        weight = module.weight
        if weight.device.type == "meta":
            state = state if state is not None else materialized_state_dict(model)
            weight = state[f"{name}.weight"]
        sites.norms[name] = _norm_offset(module, name, weight.detach())
        for leaf, _ in module.named_parameters(recurse=False):
            sites.cut[f"{name}.{leaf}"] = 0
    if adapter.vlm is not None:
        _projector_sites(sites, model, narrowed, adapter.vlm.projector)
    sites.embedding_scale = _embedding_scale_ratio(model, narrowed)
    if sites.moe_readers and sites.embedding_scale != 1.0:
        raise UnsupportedModelError(
            "width.hidden: this mixture of experts scales its embeddings by hidden_size, and the fused experts' "
            "outputs cannot be rescaled with the stream yet; use mlp / heads."
        )
    return sites


def _moe_sites(sites: StreamSites, adapter: ModelAdapter, index: int, block_name: str) -> None:
    """The fused routed experts of MoE block ``index`` read the stream through their first matrix (gate_up or up)
    and write it through ``down`` (and its bias); the router reads it. Shared experts are block linears (roles)."""
    spec = adapter.moe_spec(index)
    layout, experts = spec.layout, f"{block_name}.{spec.experts}"
    reads, writes = (1, 2) if layout.transposed else (2, 1)  # (E, in, out) with transposed, else (E, out, in)
    moe = experts.rpartition(".")[0]
    readers = sites.moe_readers.setdefault(moe, [])
    for leaf in (layout.gate_up, layout.up):
        if leaf is not None:
            sites.cut[f"{experts}.{leaf}"] = reads
            readers.append((f"{experts}.{leaf}", reads))
    sites.cut[f"{experts}.{layout.down}"] = writes
    if layout.down_bias is not None:
        sites.cut[f"{experts}.{layout.down_bias}"] = 1
    router = get_submodule(adapter.blocks[index], spec.router)
    weight = getattr(router, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.shape[1] == sites.width:
        sites.cut[f"{block_name}.{spec.router}.weight"] = 1
        readers.append((f"{block_name}.{spec.router}.weight", 1))


def _projector_sites(sites: StreamSites, model: nn.Module, narrowed: nn.Module, projector: str) -> None:
    """A vision-language model's projector writes the image features into the stream: the projector tensors that
    the narrowed config describes one stream channel narrower along a single dimension lose the same channels, and
    scale with the stream as the block writers do. A projector whose own inner width is the language model's hidden
    size (LLaVA's two-layer MLP) also loses inner neurons, as many as the narrowed config describes
    (``ProjectorNeurons``); anything else over the stream's width there is refused before any work."""
    new_width = narrowed.config.get_text_config().hidden_size
    old_shapes, new_shapes = parameter_shapes(model), parameter_shapes(narrowed)
    changed = {}
    for key, shape in old_shapes.items():
        if key.startswith(projector + "."):
            dims = [d for d, (a, b) in enumerate(zip(shape, new_shapes.get(key, shape))) if a != b]
            if dims:
                changed[key] = dims
    neurons = _projector_neurons(model, changed, old_shapes, new_shapes, sites.width, new_width)
    found = {}
    for key, dims in changed.items():
        if neurons is not None and key in neurons.cut:
            if key == f"{neurons.reader}.weight":
                found[key] = 0  # its output rows write the stream; its input columns are the inner neurons
            continue
        shape = old_shapes[key]
        if len(dims) > 1 or shape[dims[0]] != sites.width or new_shapes[key][dims[0]] != new_width:
            raise UnsupportedModelError(
                f"width.hidden: the projector's {key} {tuple(shape)} takes the language model's hidden size on more "
                f"than the side that writes the stream (it would be {new_shapes.get(key)}), and hf_prune finds no "
                "inner neurons to narrow with it; use mlp / heads."
            )
        owner = model.get_submodule(key.rpartition(".")[0])
        weight = getattr(owner, "weight", None)
        if len(shape) < 2 and (not isinstance(weight, torch.Tensor) or weight.dim() < 2):  # not a linear's bias
            raise UnsupportedModelError(
                f"width.hidden: the projector's {key} belongs to a {type(owner).__name__} over the stream's width "
                "(a norm), which hf_prune cannot narrow and rescale outside the language model; use mlp / heads."
            )
        found[key] = dims[0]
    for key, dim in found.items():
        sites.cut[key] = dim
        owner = key.rpartition(".")[0]
        if owner not in sites.writers:
            sites.writers.append(owner)
    sites.projector_neurons = neurons


def _projector_neurons(
    model: nn.Module,
    changed: dict[str, list[int]],
    old_shapes: dict[str, tuple],
    new_shapes: dict[str, tuple],
    width: int,
    new_width: int,
) -> ProjectorNeurons | None:
    """The projector's inner neurons whose count the config ties to the hidden size (LLaVA: linear_1's outputs,
    linear_2's inputs), or None when the projector has none. Found from the shapes the narrowed config gives: one
    ``nn.Linear`` that narrows on both sides (the stream on its outputs, the neurons on its inputs) and linears that
    produce those neurons (their output rows and biases)."""
    both = [key for key, dims in changed.items() if len(dims) == 2]
    if not both:
        return None
    key = both[0]
    reader, _, leaf = key.rpartition(".")
    owner = model.get_submodule(reader)
    old, new = old_shapes[key], new_shapes[key]
    if len(both) > 1 or leaf != "weight" or type(owner) is not nn.Linear or (old[0], new[0]) != (width, new_width):
        raise UnsupportedModelError(
            f"width.hidden: the projector's {key} {tuple(old)} takes the language model's hidden size on more than "
            f"the side that writes the stream (it would be {new}), in a layout hf_prune does not narrow; use mlp / "
            "heads."
        )
    cut = {key: 1}
    for other, dims in changed.items():
        producer = other.rpartition(".")[0]
        if producer == reader:
            continue  # the reader's bias is on the stream's side
        if (
            type(model.get_submodule(producer)) is not nn.Linear
            or dims != [0]
            or (old_shapes[other][0], new_shapes[other][0]) != (old[1], new[1])
        ):
            raise UnsupportedModelError(
                f"width.hidden: the projector's {other} {tuple(old_shapes[other])} would be {new_shapes[other]}, "
                f"but only linears producing {reader}'s inputs may narrow with it; use mlp / heads."
            )
        cut[other] = 0
    producers = {other.rpartition(".")[0] for other in cut if other != key}
    if len(producers) != 1:  # two linears narrowing alike: one of them may write the stream, not the neurons
        raise UnsupportedModelError(
            f"width.hidden: the projector's {key} would narrow on its inputs, and "
            f"{'nothing' if not producers else ', '.join(sorted(producers))} in the projector would narrow with "
            "them; hf_prune narrows a single producer of the projector's neurons (LLaVA's linear_1); use mlp / heads."
        )
    return ProjectorNeurons(reader, old[1], new[1], cut)


@torch.no_grad()
def _norm_offset(module: nn.Module, name: str, weight: torch.Tensor) -> int:
    """0 for ``y = w * x / rms(x)``, 1 for Gemma's ``y = (1 + w) * x / rms(x)``; found by running the norm on a
    vector of ones (rms 1). Anything else (a LayerNorm, which centres) is refused."""
    ones = torch.ones(1, 1, weight.shape[0], dtype=weight.dtype, device=weight.device)
    out = module(ones)
    out = (out[0] if isinstance(out, tuple) else out).float().reshape(-1).cpu()
    w = weight.float().cpu()
    for offset in (0, 1):
        if torch.allclose(out, w + offset, rtol=2e-2, atol=1e-3):
            return offset
    raise UnsupportedModelError(
        f"width.hidden: {name} ({type(module).__name__}) is not an RMS norm (it centres or shifts the stream), so "
        "removing hidden channels would change every output it gives; use mlp / heads, or slicegpt."
    )


def _embedding_scale_ratio(model: nn.Module, narrowed: nn.Module) -> float:
    """new / old embedding multiplier, for families whose embedding module scales by a function of hidden_size."""
    old = model.get_input_embeddings()
    new = narrowed.get_input_embeddings()
    old_scale = getattr(old, "scalar_embed_scale", None)
    new_scale = getattr(new, "scalar_embed_scale", None)
    if old_scale is None or new_scale is None or not old_scale:
        return 1.0
    return float(new_scale) / float(old_scale)


class StreamRecorder:
    """Statistics of the stream, recorded by hooks during the width walk's calibration forward of each block: per
    norm its inputs' per-channel squares (for the rescale) and its outputs' sums (for the channel scores), the
    squared column norms of the linears that read each norm's output, and which norms take a writer's output (Gemma's
    post-norms: they, not the writer, put the writer's output into the stream). With ``second_moment`` also each
    read norm's output second moment (channels x channels), for the least-squares refit of its readers: kept
    outside memory once its block is done (``OffloadedCopy``: a temporary file for a big one), so the walk holds one
    block's moments however many blocks the model has (an 8B model's 64 read norms: 4.3 GB)."""

    def __init__(self, sites: StreamSites, second_moment: bool = False):
        self.sites = sites
        self.second_moment = second_moment
        self.grams: dict[str, OffloadedCopy] = {}  # read norm -> sum y y^T over its calibration tokens
        self.reader_norm: dict[str, str] = {}  # reader linear -> the norm whose output it reads
        self._block_grams: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, ChannelStats] = {}
        self.outputs: dict[str, ChannelStats] = {}
        self.reader_columns: dict[str, torch.Tensor] = {}
        self.fed_by_writer: dict[str, str] = {}  # norm -> the writer whose output it takes
        self._readers_seen: set[str] = set()
        self._readers: dict[str, nn.Module] = {}  # the walked block's reader linears
        self._last_norm_output: dict[str, torch.Tensor] = {}
        self._last_writer_output: dict[str, torch.Tensor] = {}
        self.projector_inputs: ChannelStats | None = None

    def hooks(self, model_names: dict[int, str], block: nn.Module, readers: dict[str, nn.Module]) -> list:
        handles = []
        for module in block.modules():
            name = model_names.get(id(module))
            if name in self.sites.norms:
                handles.append(module.register_forward_hook(lambda m, a, out, n=name: self._norm(n, a[0], out)))
            elif name in self.sites.writers:
                handles.append(module.register_forward_hook(lambda m, a, out, n=name: self._writer(n, out)))
            elif name in self.sites.moe_readers:
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._moe_reader(n, m, a[0])))
        self._readers = readers
        for name, module in readers.items():
            hook = lambda m, a, n=name: self._reader(n, m, a[0])  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
        return handles

    def watch_projector(self, model: nn.Module):
        """Record the projector's inner neurons (the reader's inputs) whenever the calibration forward runs the
        projector (on images); the hook handle, or None where the projector has none."""
        neurons = self.sites.projector_neurons
        if neurons is None:
            return None
        self.projector_inputs = None

        def record(module, args):
            if self.projector_inputs is None:  # on the device the projector runs on
                self.projector_inputs = ChannelStats(neurons.width, args[0].device)
            self.projector_inputs.update(args[0].detach())

        return model.get_submodule(neurons.reader).register_forward_pre_hook(record)

    def projector_statistics(self) -> ChannelStats | None:
        """The projector's inner-neuron statistics summed over the ranks (zeros on a rank that saw no image)."""
        neurons = self.sites.projector_neurons
        if neurons is None:
            return None
        local = self.projector_inputs.tokens if self.projector_inputs is not None else 0
        if distributed.all_reduce_numbers(local)[0] == 0:  # no image anywhere: nothing to sum
            return None
        if self.projector_inputs is None:
            self.projector_inputs = ChannelStats(neurons.width, torch.device("cpu"))
        self.projector_inputs.all_reduce()
        return self.projector_inputs

    def _norm(self, name: str, x: torch.Tensor, out) -> None:
        y = out[0] if isinstance(out, tuple) else out
        if name not in self.inputs:
            width = x.shape[-1]
            self.inputs[name] = ChannelStats(width, y.device)
            self.outputs[name] = ChannelStats(width, y.device)
        self.inputs[name].update(x)
        self.outputs[name].update(y)
        if self.second_moment:
            flat = y.reshape(-1, y.shape[-1]).float()
            gram = self._block_grams.get(name)
            if gram is None:
                gram = self._block_grams[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
            gram.addmm_(flat.t(), flat)
        self._last_norm_output[name] = y
        for writer, w in self._last_writer_output.items():
            if x is w:
                self.fed_by_writer[name] = writer

    def _writer(self, name: str, out) -> None:
        self._last_writer_output[name] = out[0] if isinstance(out, tuple) else out

    def _norm_read_by(self, x: torch.Tensor) -> str | None:
        """The norm whose output ``x`` is (the identity of the tensor the block passed on), if any."""
        return next((n for n, y in self._last_norm_output.items() if x is y), None)

    def _add_columns(self, norm: str, columns: torch.Tensor) -> None:
        previous = self.reader_columns.get(norm)
        self.reader_columns[norm] = columns if previous is None else previous + columns.to(previous.device)

    def _reader(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name in self._readers_seen:
            return
        norm = self._norm_read_by(x)
        if norm is not None:
            self._add_reader(norm, name, module)

    def _add_reader(self, norm: str, name: str, module: nn.Module) -> None:
        """Linear ``name`` reads ``norm``'s output: its squared column norms join that norm's, and its kept columns
        may be refit on that norm's second moment."""
        weight = module.weight.t() if is_transposed(module) else module.weight
        self._add_columns(norm, weight.detach().float().pow(2).sum(0).double())
        self._readers_seen.add(name)
        self.reader_norm[name] = norm

    def _moe_reader(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """An MoE module reading a norm's output: its experts' and router's squared column norms over the stream
        (each expert's matrix upcast on its own, summed on its device, one copy to the host), and its shared
        experts' linears (they read a reshaped view of the same output, which the identity match misses)."""
        norm = self._norm_read_by(x)
        if norm is None or name in self._readers_seen:
            return
        columns = None
        for key, dim in self.sites.moe_readers[name]:
            tensor = module.get_parameter(key[len(name) + 1 :]).detach()
            matrices = [tensor] if tensor.dim() == 2 else tensor  # the router (E, H), or one matrix per expert
            axis = 0 if tensor.dim() == 2 else 2 - dim  # the axis of one matrix that is not the stream's
            for matrix in matrices:
                part = matrix.float().pow(2).sum(axis)
                columns = part if columns is None else columns + part.to(columns.device)
        if columns is not None:
            self._add_columns(norm, columns.double().cpu())
        self._readers_seen.add(name)
        for reader, linear in self._readers.items():
            if reader.startswith(name + ".") and reader not in self._readers_seen:
                self._add_reader(norm, reader, linear)

    def release(self) -> None:
        """After a block: drop the references to its activations; its read norms' second moments go to host memory
        (the others are dropped)."""
        self._last_norm_output.clear()
        self._last_writer_output.clear()
        refit = set(self.reader_norm.values())  # norms read by linears (not only by fused experts or a router)
        for name, gram in self._block_grams.items():
            if name in refit:  # a big one to a file (through host slabs), a small one to the host
                self.grams[name] = OffloadedCopy(gram)
        self._block_grams.clear()

    def record_final_norm_inputs(self, final_hidden: list[torch.Tensor], final_norm: str | None) -> None:
        """The final norm's inputs are the last block's outputs (the engine's ``final_hidden``)."""
        if final_norm is None or final_norm not in self.sites.norms:
            return
        for x in final_hidden:
            if final_norm not in self.inputs:
                self.inputs[final_norm] = ChannelStats(x.shape[-1], x.device)
            self.inputs[final_norm].update(x)

    # ------------------------------------------------------------------ after the walk
    def scores(self, criterion: str) -> torch.Tensor:
        """Importance of each stream channel, summed over the norms: activation (Minitron: mean |norm output|),
        fluctuation (variance of the norm output times the squared norm of the columns that read it) or magnitude
        (the norm of those columns: no data)."""
        total = torch.zeros(self.sites.width, dtype=torch.float64)
        for name, stats in self.outputs.items():
            stats.all_reduce()
            columns = self.reader_columns.get(name)
            if criterion == "activation":
                total += stats.mean_abs.double().cpu()
            elif columns is not None:
                columns = columns.cpu()
                total += stats.variance.double().cpu() * columns if criterion == "fluctuation" else columns
        return total.sqrt() if criterion == "magnitude" else total

    def rescale(self, keep: torch.Tensor) -> dict[str, float]:
        """Per norm, the factor that gives its kept channels the scale they had: sqrt of the ratio of the mean square
        over the kept channels to the mean square over all, from its calibration inputs."""
        factors = {}
        for name in self.sites.norms:
            stats = self.inputs.get(name)
            if stats is None:
                raise RuntimeError(f"width.hidden: the calibration never reached {name}; cannot rescale it.")
            stats.all_reduce()
            squares = stats.sq_sum.cpu()
            kept = float(squares[keep.cpu()].sum()) / len(keep)
            every = float(squares.sum()) / squares.numel()
            factors[name] = math.sqrt(kept / every) if every > 0 and kept > 0 else 1.0
        return factors

    def refits(self) -> dict[str, tuple[str, SecondMoments]]:
        """reader linear -> (its norm, the norms' output second moments E[y y^T], read one at a time)."""
        readers = {reader: norm for reader, norm in self.reader_norm.items() if norm in self.grams}
        moments = SecondMoments(self.grams, {name: self.outputs[name].tokens for name in self.grams}, readers)
        self.grams = {}
        return {reader: (norm, moments) for reader, norm in readers.items()}


class SecondMoments:
    """The read norms' output second moments, brought back from where the walk kept them one norm at a time (the
    readers of one norm come together in the cut), summed over the ranks and divided by the tokens; each copy is
    freed after its last reader (``done``)."""

    def __init__(self, grams: dict[str, OffloadedCopy], tokens: dict[str, int], readers: dict[str, str]):
        self.grams, self.tokens = grams, tokens
        self.pending: dict[str, int] = {}
        for norm in readers.values():
            self.pending[norm] = self.pending.get(norm, 0) + 1
        self._current: tuple[str, torch.Tensor] | None = None

    def of(self, norm: str) -> torch.Tensor:
        if self._current is None or self._current[0] != norm:
            self._current = None  # the previous moment goes before the next one is read
            copy = self.grams[norm]
            gram = torch.empty(copy.shape, dtype=copy.dtype)
            copy.restore_into(gram)
            distributed.all_reduce_sum(gram)
            self._current = (norm, gram.div_(max(self.tokens[norm], 1)))
        return self._current[1]

    def close(self) -> None:
        """Free what readers that were never refit left (aliases, refits that raised)."""
        for copy in self.grams.values():
            copy.close()
        self.grams.clear()
        self._current = None

    def done(self, norm: str) -> None:
        """One reader of ``norm`` is refit: after its last, the copy and the moment in memory are freed."""
        self.pending[norm] -= 1
        if self.pending[norm] == 0:
            self.grams.pop(norm).close()
            if self._current is not None and self._current[0] == norm:
                self._current = None


@dataclass
class StreamCut:
    """What the saved model keeps of the stream: its channels, each norm's rescale, the whole stream's scale
    (applied to the norms that put a writer's output into the stream, else to the writers) and, with least squares,
    the readers' kept columns refit on their norm's second moment (where that beats plain slicing)."""

    sites: StreamSites
    keep: torch.Tensor
    norm_factors: dict[str, float]
    fed_by_writer: dict[str, str]  # norm -> writer: the norm puts that writer's output into the stream
    refits: dict[str, tuple[str, SecondMoments]] = field(default_factory=dict)
    errors: dict[str, dict] = field(default_factory=dict)  # reader -> relative output error, plain / refit
    projector_inputs: ChannelStats | None = None  # the projector's inner neurons on the calibration images
    criterion: str = "activation"
    projector_report: dict = field(default_factory=dict)

    def apply(self, state: dict[str, torch.Tensor], live: nn.Module) -> None:
        """Cut ``state`` (the model's materialized state dict) in place; each old tensor of ``live`` is replaced by
        its cut so that only one tensor's copy is alive at a time (tied tensors are cut once)."""
        sites, r = self.sites, self.sites.embedding_scale
        first: dict[tuple[int, int], str] = {}  # tied tensors (one storage): found before anything is freed
        alias = {key: first.setdefault((state[key].data_ptr(), dim), key) for key, dim in sites.cut.items()}
        try:
            for key, dim in sites.cut.items():
                owner, _, leaf = key.rpartition(".")
                if alias[key] != key:
                    state[key] = state[alias[key]]
                    _replace_live(live, owner, leaf, state[key])
                    continue
                old = state[key]
                new = old.index_select(dim, self.keep.to(old.device))
                if owner in self.refits and leaf == "weight" and dim == 1:
                    norm, moments = self.refits[owner]
                    keep = self.keep.to(old.device)
                    refit, self.errors[owner] = refit_kept_columns(old.float(), moments.of(norm).to(old.device), keep)
                    moments.done(norm)
                    if refit is not None:
                        new = refit.to(old.dtype)
                elif owner in sites.norms and leaf == "weight":
                    factor = self.norm_factors[owner] * (r if owner in self.fed_by_writer else 1.0)
                    offset = sites.norms[owner]
                    new = ((new.float() + offset) * factor - offset).to(old.dtype)
                elif owner in sites.writers and r != 1.0 and owner not in self.fed_by_writer.values():
                    new = (new.float() * r).to(old.dtype)
                del old
                state[key] = new
                _replace_live(live, owner, leaf, new)
            self._cut_projector_neurons(state, live)
        finally:
            for moments in {id(m): m for _, m in self.refits.values()}.values():
                moments.close()

    def _cut_projector_neurons(self, state: dict[str, torch.Tensor], live: nn.Module) -> None:
        """After the stream's cut: the projector's inner neurons kept by the width criterion on their activations
        over the calibration images (as MLP neurons are), or, with no image, by their weights alone (the norm of
        the producer's row and bias times that of the reader's kept column: a warning says so); sliced, not refit:
        a least-squares refit of the reader on the calibration images' second moment lowered their error 4x but
        not the error on images it never saw (a tiny LLaVA whose removed neurons copy kept ones, skimage calibration:
        worse than slicing at 16 samples, 0.059 vs 0.064 at 200), as the few distinct images give a poor moment."""
        neurons = self.sites.projector_neurons
        if neurons is None:
            return
        reader_key = f"{neurons.reader}.weight"
        weight = state[reader_key]  # (kept stream channels, neurons)
        stats = self.projector_inputs
        seen = stats is not None and stats.tokens > 0
        by_images = seen and self.criterion != "magnitude"
        if by_images:
            scores = channel_scores(self.criterion, stats, weight.float().to(stats.sum.device)).cpu()
        else:
            if self.criterion != "magnitude":  # it asked for data the calibration did not give
                logger.warning(
                    "width.hidden: the calibration had no image, so the projector's neurons are kept by their "
                    "weights alone; calibrate on images (a processor and an image source) to score them on what they "
                    "do."
                )
            produced = sum(
                state[key].float().pow(2).reshape(state[key].shape[0], -1).sum(1).cpu()
                for key in neurons.cut
                if key != reader_key
            )
            scores = weight.float().pow(2).sum(0).cpu().mul(produced).sqrt()
        keep = keep_top(scores.double(), neurons.keep)
        for key, dim in neurons.cut.items():
            owner, _, leaf = key.rpartition(".")
            old = state[key]
            new = old.index_select(dim, keep.to(old.device))
            del old
            state[key] = new
            _replace_live(live, owner, leaf, new)
        self.projector_report = {
            "before": neurons.width,
            "after": neurons.keep,
            "scored_on": (
                f"{stats.tokens} image tokens ({self.criterion})"
                if by_images
                else "weights" + ("" if seen else " (no image)")
            ),
            **({"image_tokens": stats.tokens} if seen else {}),
        }


def _replace_live(model: nn.Module, owner: str, leaf: str, new: torch.Tensor) -> None:
    module = model.get_submodule(owner) if owner else model
    old = module._parameters.get(leaf)
    if old is not None and old.device.type != "meta":
        module._parameters[leaf] = nn.Parameter(new, requires_grad=False)
