"""Prune checkpoints bigger than memory: the model is a skeleton on the meta device; each decoder block is loaded
from the safetensors shards when the engine reaches it, pruned, written to the output checkpoint, and dropped.

Peak memory is one block's weights + its statistics + one block's calibration activations (optionally stored in
bf16/fp16, or on disk); the input embeddings are read only while the calibration inputs are captured, and they and
the output head are copied tensor by tensor at the end, never held with a block. The output is the checkpoint the
in-memory path writes: the same tensors, to the bit, for the same recipe and seed.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import ModelAdapter
from .checkpoint import atomic_write_folder, check_model_source, check_output_dir, read_safetensors_header
from .checkpoint_layout import to_checkpoint_layout, to_model_layout
from .errors import HFPruneError, PruningCheckError, RecipeError
from .placement import Placement, compute_dtype_for, model_dtype, resolve_device
from .pruning.context import PruneContext
from .recipe import Recipe
from .registry import get_method
from .report import PruningReport
from .resume import WorkFolder, fingerprint, work_folder_for
from .utils import all_finite, logger, peak_rss_bytes
from .version import __version__

STREAMABLE = ("magnitude", "wanda", "sparsegpt", "width")
INDEX = "model.safetensors.index.json"


def read_tensors(
    path: Path, names: list[str] | None, device: torch.device | str, copy: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file. On the CPU a tensor read is a view of the file's mapping, whose pages count
    in the resident size once touched, beside the copies pruning writes into: with ``copy`` each is copied and its
    mapping let go before the next is read (without, only the pages read become resident: embedding lookups)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = list(f.keys()) if names is None else names
    out = {}
    for name in names:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(name)
        out[name] = tensor.clone() if copy and tensor.device.type == "cpu" else tensor
        del tensor
    return out


def copy_tensor_file(src: Path, name: str, dst: Path, chunk: int = 64 << 20) -> None:
    """Write tensor ``name`` of the safetensors file ``src`` as the only tensor of ``dst``, its bytes copied in
    chunks through ordinary reads and writes: nothing of it is mapped into (or held in) this process."""
    start, header = read_safetensors_header(src)
    entry = header[name]
    begin, end = entry["data_offsets"]
    meta = {name: {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [0, end - begin]}}
    meta["__metadata__"] = {"format": "pt"}
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(len(text).to_bytes(8, "little"))
        fout.write(text)
        fin.seek(start + begin)
        left = end - begin
        while left:
            data = fin.read(min(chunk, left))
            if not data:
                raise HFPruneError(f"{src} ends inside {name}: the shard is truncated.")
            fout.write(data)
            left -= len(data)


class ShardedCheckpoint:
    """Read tensors by name from a folder of safetensors shards (``model.safetensors`` or an index)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").exists():
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise HFPruneError(f"{self.folder} holds no model.safetensors nor {INDEX}: streaming reads safetensors.")
        missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).exists()})
        if missing:
            raise HFPruneError(
                f"The checkpoint at {self.folder} is incomplete: {len(missing)} shard file(s) listed in {INDEX} are "
                f"missing ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}). Download it again."
            )

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def load(self, keys: list[str], device: torch.device | str = "cpu", copy: bool = True) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        out = {}
        for file, names in by_file.items():
            out.update(read_tensors(self.folder / file, names, device, copy))
        return out

    def copy_tensor(self, key: str, dst: Path) -> None:
        copy_tensor_file(self.folder / self.weight_map[key], key, dst)

    def size_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))


def _materialize_outside_blocks(model: nn.Module, adapter: ModelAdapter, ckpt: ShardedCheckpoint) -> None:
    """Give every parameter outside the decoder blocks real memory and its checkpoint value (buffers were built
    for real by the skeleton: rotary tables, embedding scales)."""
    prefix = adapter.blocks_path + "."
    head = _untied_head_keys(model)  # never read by calibration (it stops at the last block): copied at the end
    state = {k for k in model.state_dict() if not k.startswith(prefix) and k not in head}
    missing_in_ckpt = [k for k in state if k not in ckpt.weight_map]
    values = ckpt.load([k for k in state if k in ckpt.weight_map], copy=False)  # views: read as they are used
    for name, module in model.named_modules():
        if name.startswith(prefix) or name == adapter.blocks_path:
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if p.device.type == "meta" and full in values:
                module._parameters[pname] = nn.Parameter(values[full], requires_grad=False)
        needs_rebuild = any(
            b.device.type == "meta" and (f"{name}.{bn}" if name else bn) not in values
            for bn, b in module.named_buffers(recurse=False)
        )
        if needs_rebuild:
            rebuilt = type(module)(config=model.config.get_text_config())
            for bn, buffer in rebuilt.named_buffers(recurse=False):
                module._buffers[bn] = buffer
        for bname in [n for n, _ in module.named_buffers(recurse=False)]:
            full = f"{name}.{bname}" if name else bname
            if full in values:
                module._buffers[bname] = values[full]
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [
        n
        for n, p in model.named_parameters()
        if not n.startswith(prefix) and p.device.type == "meta" and n not in head
    ]
    if still_meta:
        raise HFPruneError(f"Streaming could not find {still_meta[:3]} in the checkpoint ({missing_in_ckpt[:3]}).")


HEAP_MMAP_THRESHOLD = 4 << 20  # allocations from 4 MiB up get their own mapping, returned to the OS when freed


def bound_heap_growth() -> None:
    """Keep glibc from holding freed memory in its heap. By default glibc raises its mmap threshold to the size of
    every large chunk freed (up to 32 MiB), so from the first block on the big temporaries of pruning (scores, masks,
    checks) come from the heap and stay resident after they are freed; a fixed threshold gives each its own mapping,
    unmapped when freed (measured on a Llama-3.2-1B-shape streaming Wanda prune: peak RSS 0.89 -> 0.73 GB, same
    time). A process-wide allocator setting (it stays for the rest of the process), made once and logged; left alone
    when the user set glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_; a no-op outside glibc."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(-3, HEAP_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (setting it turns the dynamic threshold off)
    libc.mallopt(-1, 2 * HEAP_MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: free heap tops above this go back at once
    logger.info(
        "streaming: glibc's mmap threshold fixed at %d MiB (freed temporaries leave memory).",
        HEAP_MMAP_THRESHOLD >> 20,
    )


def _glibc():
    """glibc's allocator controls (mallopt, malloc_trim), or None where the C library is another."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the freed block back to the OS (glibc keeps large freed chunks in its heap, so without this the resident
    size grows block after block)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _untied_head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of an output head that is not tied to the input embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(model.config, "tie_word_embeddings", False):
        return set()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


class StreamedEmbeddings:
    """The input embeddings (and a head tied to them) in memory only while the calibration inputs are captured: read
    from the checkpoint on entry, back on the meta device on exit (an 8B model's are 1 GiB of the peak otherwise)."""

    def __init__(self, model: nn.Module, ckpt: ShardedCheckpoint):
        self.model, self.ckpt = model, ckpt
        emb = model.get_input_embeddings()
        self.key = next(f"{n}.weight" for n, m in model.named_modules() if m is emb)
        head = model.get_output_embeddings()
        self.tied = head is not None and head.weight is emb.weight

    @contextmanager
    def __call__(self):
        weight = self.model.get_input_embeddings().weight
        if weight.device.type == "meta":  # a view of the file: only the rows the calibration looks up are read
            loaded = self.ckpt.load([self.key], copy=False)[self.key].to(weight.dtype)
            self._assign(nn.Parameter(loaded, requires_grad=False))
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        weight = self.model.get_input_embeddings().weight
        self._assign(nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False))
        gc.collect()
        release_freed_memory()

    def _assign(self, param: nn.Parameter) -> None:
        self.model.get_input_embeddings().weight = param
        if self.tied:
            self.model.get_output_embeddings().weight = param


class StreamingBlocks:
    """Loads block i from the checkpoint on entry, writes it to the output shard on exit, then frees it."""

    def __init__(
        self,
        adapter: ModelAdapter,
        ckpt: ShardedCheckpoint,
        out: Path,
        n_shards: int,
        device: torch.device,
        work: WorkFolder | None = None,
    ):
        self.adapter, self.ckpt, self.out, self.n_shards = adapter, ckpt, out, n_shards
        self.device = device  # the execution device: shards are read straight onto it
        self.work = work  # a resumed prune: blocks a killed run committed are read from its work folder
        self.written: dict[int, list[str]] = {}
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}  # each written block's tensors (the model's layout)
        for block in adapter.blocks:
            buffers = {n for n, _ in block.named_buffers()}
            saved = set(block.state_dict())
            if buffers - saved:
                raise HFPruneError(
                    f"Streaming does not support blocks with unsaved buffers ({sorted(buffers - saved)})."
                )

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n_shards:05d}.safetensors"

    @contextmanager
    def __call__(self, block: nn.Module):
        i = next(j for j, b in enumerate(self.adapter.blocks) if b is block)
        prefix = f"{self.adapter.block_name(i)}."
        committed = self.work.block_file(i) if self.work is not None and i not in self.written else None
        if committed is not None:  # block-local keys in the model's layout, as the killed run committed it
            tensors = {prefix + k: v for k, v in read_tensors(committed, None, self.device).items()}
        else:
            tensors = to_model_layout(self.adapter.model, self._read(i, prefix))
        dtypes = {k: v.dtype for k, v in block.state_dict().items()}
        local = {k[len(prefix) :]: v for k, v in tensors.items()}
        local = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in local.items()}  # the skeleton's dtype
        # assign: the tensors read onto the device become the block's (no second copy of the block)
        missing, unexpected = block.load_state_dict(local, strict=False, assign=True)
        if missing or unexpected:
            raise HFPruneError(
                f"Block {i} does not match the checkpoint: missing {missing[:3]}, extra {unexpected[:3]}"
            )
        del tensors
        try:
            yield block
            self.write(i, block)
        finally:
            block.to("meta")
            gc.collect()
            release_freed_memory()

    def _read(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Block i as the previous step left it (its output shard), or from the source checkpoint the first time."""
        if i not in self.written:
            return self.ckpt.load(self.ckpt.keys(prefix), device=self.device)
        return read_tensors(self.out / self.shard_name(i), None, self.device)

    def write(self, i: int, block: nn.Module) -> None:
        prefix = f"{self.adapter.block_name(i)}."
        local = block.state_dict()
        state = {prefix + k: v.detach().to("cpu").contiguous() for k, v in local.items()}
        state = {k: v.contiguous() for k, v in to_checkpoint_layout(self.adapter.model, state).items()}
        for name, value in state.items():
            if value.is_floating_point() and not all_finite(value):
                raise PruningCheckError(f"{name} holds NaN or inf after pruning; nothing is saved.")
        save_file(state, str(self.out / self.shard_name(i)), metadata={"format": "pt"})
        self.written[i] = list(state)
        self.shapes[i] = {k: tuple(v.shape) for k, v in local.items()}

    def check_against(self, adapter: ModelAdapter) -> None:
        """Every written block has the shapes the (rebuilt) skeleton's config describes, so the saved folder
        reloads as written; raises before anything is saved otherwise."""
        for i, shapes in self.shapes.items():
            want = {k: tuple(v.shape) for k, v in adapter.blocks[i].state_dict().items()}
            if want != shapes:
                diff = sorted(set(want.items()) ^ set(shapes.items()))[:3]
                raise PruningCheckError(f"Block {i} as written does not match the new config: {diff}; nothing saved.")


def _check_streamable_width(recipe: Recipe, resume: bool) -> None:
    """Width streams block by block (each block narrowed where it is pruned, the config updated at the end) for MLP
    neurons and heads with least-squares or no compensation; what needs the whole model at once is refused."""
    for step in recipe.steps:
        if step.method != "width":
            continue
        for key, why in (
            ("hidden", "hidden channels are cut in the embeddings, the head and every block at once"),
            ("per_block", "per-block widths are saved with a modeling file"),
        ):
            if getattr(step, key):
                raise RecipeError(f"Streaming: width.{key} is not available ({why}); prune in memory or offloaded.")
        if step.compensate == "bias":
            raise RecipeError(
                "Streaming: width.compensate: bias turns on a bias in every sibling projection of every block; use "
                "least_squares (the default) or none."
            )
        if resume:
            raise RecipeError("Streaming: --resume with a width step is not available yet; drop one of them.")


def _restructured(model: nn.Module, ckpt: ShardedCheckpoint):
    """What a structural step calls with the config updates it made (narrower MLPs, fewer heads): the skeleton of the
    model they describe, with the tensors outside the blocks as before; the narrowed blocks are in the output
    shards already."""

    def rebuild(updates: dict[str, Any]) -> nn.Module:
        from accelerate import init_empty_weights

        from .surgery import updated_config

        config = updated_config(model.config, updates)
        with init_empty_weights(include_buffers=False):
            narrowed = type(model)(config)
        narrowed.eval()
        _materialize_outside_blocks(narrowed, ModelAdapter(narrowed), ckpt)
        return narrowed

    return rebuild


def prune_streaming(
    model_path: str | os.PathLike,
    recipe: Recipe | dict | str,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    resume: bool = False,
) -> PruningReport:
    """Prune a safetensors checkpoint block by block without loading the model, writing the result to
    ``output_dir`` (a normal sharded HF checkpoint with ``pruning_config``).

    Args:
        model_path: a local checkpoint folder (``hf download`` a Hub model first).
        recipe: weight pruning (magnitude, wanda, sparsegpt; OWL included) and width (mlp, heads).
        output_dir: the new checkpoint folder (never the input one).
        overwrite: replace a non-empty output folder.
        tokenizer: default the checkpoint's own.
        device: where each block is pruned (default the recipe's ``device``: ``auto``, the accelerator if any).
        resume: keep a work folder beside the output (``.NAME.work``) with every finished block; called again
            after a kill with the same arguments, continue from the last finished block (see ``hf_prune.resume``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import distributed

    if distributed.init_from_env():
        raise RecipeError(
            "Streaming writes the output shards as it goes and runs in one process; launch it without torchrun "
            "(data-parallel calibration works with the in-memory path and device_map)."
        )
    start = time.perf_counter()
    recipe = Recipe.load(recipe)
    bad = [s.method for s in recipe.steps if s.method not in STREAMABLE]
    if bad or not recipe.steps:
        raise RecipeError(
            f"Streaming runs weight pruning and width ({', '.join(STREAMABLE)}); not {bad or 'an empty recipe'}."
        )
    _check_streamable_width(recipe, resume)
    folder = Path(model_path)
    if not folder.is_dir():
        raise HFPruneError(f"Streaming needs a local checkpoint folder; {model_path} is not one.")
    check_model_source(str(folder))  # config, index and every shard's header, before any work
    check_output_dir(output_dir, overwrite, [str(folder)])
    ckpt = ShardedCheckpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    from accelerate import init_empty_weights

    bound_heap_growth()
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) built for real
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    adapter = ModelAdapter(model)
    _materialize_outside_blocks(model, adapter, ckpt)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    methods = [get_method(s.method).method_cls(s) for s in recipe.steps]
    execution = resolve_device(device if device is not None else recipe.device)
    storage = model_dtype(model)
    place = Placement(
        execution, "streaming", storage, compute_dtype_for(execution, storage), "blocks read from the shards"
    )
    embeddings = StreamedEmbeddings(model, ckpt)
    ctx = PruneContext(model, tokenizer, adapter, recipe.calibration, placement=place, capture_context=embeddings)
    for method in methods:
        method.preflight(ctx)
    place.log()
    head_keys = sorted(_untied_head_keys(model))
    if any(k not in ckpt.weight_map for k in head_keys):
        raise HFPruneError(f"Streaming could not find the output head {head_keys} in the checkpoint {folder}.")
    copied_keys = [embeddings.key, *head_keys]  # copied from the source one tensor at a time at the end
    n_shards = adapter.num_blocks + 1 + len(copied_keys)  # blocks, the rest, then each copied tensor on its own
    report = PruningReport(
        model=str(folder), family=adapter.family, num_blocks=adapter.num_blocks, placement=place.to_dict()
    )
    work = None
    if resume:
        windows = ctx.calibration_ids()
        work = WorkFolder.open(
            work_folder_for(output_dir), fingerprint(recipe.to_dict(), windows, model, place.to_dict())
        )
        work.fixed_batch_size(ctx, model, execution)
    embeddings.release()  # read again for each capture
    step_configs: list[dict] = []

    def write(tmp: Path) -> None:
        nonlocal model, adapter, config
        blocks = StreamingBlocks(adapter, ckpt, tmp, n_shards, execution, work)
        ctx.block_context = blocks
        for index, method in enumerate(methods):
            ctx.restructure = _restructured(ctx.model, ckpt)
            finished = work.finished_step(index) if work is not None else None
            if finished is not None:  # finished before the kill: its blocks are read from the work folder
                report.steps.append(finished[0])
                step_configs.append(finished[1])
                continue
            ctx.work = (work, index) if work is not None else None
            step_report = method.run(ctx)
            step_report.details["ran_on"] = place.describe()
            report.steps.append(step_report)
            step_configs.append(method.pruning_config())
            if ctx.model is not model:  # a structural step: later steps read its blocks into the new skeleton
                model, config = ctx.model, ctx.model.config
                adapter = ctx.adapter = blocks.adapter = ModelAdapter(model)
                blocks.check_against(adapter)
                embeddings.model = model
                embeddings.release()
            if work is not None:
                work.commit_step(index, step_report, step_configs[-1])
        for i in range(adapter.num_blocks):  # blocks no step touched are copied as they are
            if i not in blocks.written:
                with blocks(adapter.blocks[i]):
                    pass
        prefix = adapter.blocks_path + "."
        rest = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith(prefix) and v.device.type != "meta" and k not in copied_keys
        }
        if getattr(config, "tie_word_embeddings", False):
            rest.pop("lm_head.weight", None)
        rest = {k: v for k, v in rest.items() if k in ckpt.weight_map}
        rest_file = f"model-{adapter.num_blocks + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(rest, str(tmp / rest_file), metadata={"format": "pt"})
        copied_files = {}
        for j, key in enumerate(copied_keys):  # bytes copied file to file, never in memory
            copied_files[key] = f"model-{adapter.num_blocks + 2 + j:05d}-of-{n_shards:05d}.safetensors"
            ckpt.copy_tensor(key, tmp / copied_files[key])
        weight_map = {k: blocks.shard_name(i) for i, keys in blocks.written.items() for k in keys}
        weight_map.update({k: rest_file for k in rest})
        weight_map.update(copied_files)
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        steps = step_configs
        config.pruning_config = {
            "method": "+".join(s["method"] for s in steps),
            "sparsity": steps[0].get("sparsity"),
            "structure": steps[0].get("structure"),
            "steps": steps,
            "calibration": ctx.calibration_info,
            "hf_prune_version": __version__,
            "base_model": str(folder),
            "streaming": True,
        }
        config.save_pretrained(str(tmp))
        for extra in ("generation_config.json",):
            if (folder / extra).exists():
                shutil.copy(folder / extra, tmp / extra)
        tokenizer.save_pretrained(str(tmp))
        report.calibration = ctx.calibration_info
        report.time_s = time.perf_counter() - start
        report.peak_rss_bytes = peak_rss_bytes()
        report.notes.append(
            f"streaming: checkpoint {ckpt.size_bytes() / 2**20:.0f} MiB, peak RSS "
            f"{report.peak_rss_bytes / 2**20:.0f} MiB"
        )
        report.to_json(str(tmp / "pruning_report.json"))

    out = atomic_write_folder(output_dir, write, overwrite)
    if work is not None:  # the work is in the saved checkpoint now
        work.remove()
    logger.info("Streaming: wrote %s (peak RSS %.0f MiB)", out, report.peak_rss_bytes / 2**20)
    return report
