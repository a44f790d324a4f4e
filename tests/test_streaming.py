"""Streaming: the checkpoint is pruned block by block from its shards and comes out identical to the in-memory path."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_prune import HFPruner, prune_streaming
from hf_prune.cli import main
from hf_prune.errors import HFPruneError, RecipeError
from hf_prune.streaming import ShardedCheckpoint

from .conftest import make_tiny_model


def _tensors(folder):
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def sharded(tmp_path, tokenizer):
    def build(family="llama", layers=3, shard="1MB"):
        src = tmp_path / f"src-{family}"
        make_tiny_model(family, layers=layers).save_pretrained(src, max_shard_size=shard)
        tokenizer.save_pretrained(src)
        return src

    return build


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma: tied embeddings, per-layer rotary tables
@pytest.mark.parametrize(
    "step",
    [
        {"method": "wanda", "structure": "2:4"},
        {"method": "sparsegpt", "sparsity": 0.5},
        {"method": "magnitude", "sparsity": 0.4},
        {"method": "wanda", "sparsity": 0.6, "sparsity_profile": "owl"},
    ],
)
def test_streaming_equals_in_memory(family, step, sharded, tmp_path, tiny_recipe):
    src = sharded(family)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    block0 = {f for k, f in index.items() if k.startswith("model.layers.0.")}
    recipe = tiny_recipe(step)
    pruner = HFPruner.from_pretrained(str(src), recipe=recipe)
    pruner.prune()
    pruner.save_pretrained(tmp_path / "memory")
    report = prune_streaming(src, recipe, tmp_path / "stream")
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert set(memory) == set(stream)
    assert all(torch.equal(memory[k], stream[k]) for k in memory)
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config["pruning_config"]["streaming"] and config["pruning_config"]["method"] == step["method"]
    assert report.peak_rss_bytes > 0 and len(report.steps[0].modules) > 0
    if family == "llama":
        assert len(block0) >= 1  # shards small enough that blocks span files


def test_a_block_spanning_shards_is_read_whole(sharded, tmp_path, tiny_recipe):
    src = sharded("llama", shard="200KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({f for k, f in index.items() if k.startswith("model.layers.1.")}) > 1
    prune_streaming(src, tiny_recipe({"method": "wanda", "sparsity": 0.5}), tmp_path / "out")
    assert len(_tensors(tmp_path / "out")) == len(index)


def test_missing_shard_is_named(sharded, tmp_path, tiny_recipe):
    src = sharded("llama")
    victim = sorted(glob.glob(str(src / "model-*.safetensors")))[1]
    os.remove(victim)
    with pytest.raises(HFPruneError, match="incomplete.*missing") as err:
        prune_streaming(src, tiny_recipe({"method": "wanda", "sparsity": 0.5}), tmp_path / "out")
    assert os.path.basename(victim) in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(HFPruneError, match="safetensors"):
        ShardedCheckpoint(tmp_path)


def test_activations_on_disk_give_the_same_result(sharded, tmp_path, tiny_recipe):
    src = sharded("llama")
    recipe = tiny_recipe({"method": "sparsegpt", "sparsity": 0.5, "true_sequential": False})
    recipe["calibration"]["batch_size"] = 2
    prune_streaming(src, recipe, tmp_path / "a")
    recipe["calibration"]["activation_dir"] = str(tmp_path / "acts")
    prune_streaming(src, recipe, tmp_path / "b")
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any((tmp_path / "acts").rglob("*.pt"))  # activation files are removed as the walk moves on


def test_bf16_activation_storage(sharded, tmp_path, tiny_recipe):
    src = sharded("llama")
    recipe = tiny_recipe({"method": "wanda", "sparsity": 0.5})
    recipe["calibration"]["activation_dtype"] = "bfloat16"
    prune_streaming(src, recipe, tmp_path / "bf16")
    w = _tensors(tmp_path / "bf16")["model.layers.2.mlp.down_proj.weight"]
    assert w.dtype == torch.float32 and int((w == 0).sum()) == w.numel() // 2


def test_streaming_refuses_structural_steps_and_its_own_input(sharded, tmp_path, tiny_recipe):
    src = sharded("llama")
    with pytest.raises(RecipeError, match="weight pruning"):
        prune_streaming(src, {"steps": [{"method": "depth", "num_blocks": 1}]}, tmp_path / "x")
    from hf_prune.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        prune_streaming(src, tiny_recipe({"method": "wanda", "sparsity": 0.5}), src, overwrite=True)


def test_cli_streaming(sharded, tmp_path, calib_texts):
    src = sharded("llama")
    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in calib_texts) + "\n")
    assert (
        main(
            [
                "prune",
                "--model",
                str(src),
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--nsamples",
                "4",
                "--seqlen",
                "64",
                "--calib",
                str(text),
                "--output",
                str(tmp_path / "cli"),
                "--streaming",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "model.safetensors.index.json").exists()


def test_a_multi_step_recipe_streams_like_in_memory(sharded, tmp_path, tiny_recipe):
    """Each step reads the blocks as the previous step left them (not the source checkpoint again)."""
    src = sharded("llama")
    recipe = tiny_recipe({"method": "wanda", "sparsity": 0.5, "targets": ["q"]})
    recipe["steps"].append({"method": "magnitude", "sparsity": 0.5, "targets": ["k"]})
    pruner = HFPruner.from_pretrained(str(src), recipe=recipe)
    pruner.prune()
    pruner.save_pretrained(tmp_path / "memory")
    prune_streaming(src, recipe, tmp_path / "stream")
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert float((stream["model.layers.0.self_attn.q_proj.weight"] == 0).float().mean()) == 0.5
    assert float((stream["model.layers.0.self_attn.k_proj.weight"] == 0).float().mean()) == 0.5
    assert set(memory) == set(stream) and all(torch.equal(memory[k], stream[k]) for k in memory)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma: the head tied to the embeddings
def test_the_embeddings_are_in_memory_only_while_the_inputs_are_captured(family, sharded, tmp_path, tiny_recipe):
    """No block is pruned or written while the input embeddings (or a head tied to them) hold memory; they are
    copied into the output from the source, unchanged."""
    from hf_prune.streaming import StreamingBlocks

    src = sharded(family)
    seen = []
    original = StreamingBlocks.write

    def write(self, i, block):
        model = self.adapter.model
        seen.append({model.get_input_embeddings().weight.device.type, model.lm_head.weight.device.type})
        return original(self, i, block)

    recipe = tiny_recipe({"method": "wanda", "sparsity": 0.5})
    recipe["steps"].append({"method": "magnitude", "sparsity": 0.6, "targets": ["k"]})  # a second capture
    with pytest.MonkeyPatch.context() as m:
        m.setattr(StreamingBlocks, "write", write)
        prune_streaming(src, recipe, tmp_path / "out")
    assert len(seen) == 6 and all(s == {"meta"} for s in seen)
    source, out = _tensors(src), _tensors(tmp_path / "out")
    assert torch.equal(out["model.embed_tokens.weight"], source["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "steps",
    [
        [{"method": "width", "mlp": 0.5, "heads": 0.5}],
        [{"method": "width", "mlp": 0.25, "compensate": "none"}, {"method": "wanda", "sparsity": 0.5}],
    ],
    ids=["mlp+heads", "width-then-wanda"],
)
def test_width_streams_block_by_block_like_in_memory(steps, sharded, tmp_path, tiny_recipe):
    """Each block is narrowed where it is pruned and written narrowed; the config is updated at the end and later
    steps read the narrowed blocks: the same checkpoint as in memory, a plain reload."""
    from transformers import AutoModelForCausalLM

    src = sharded("llama")
    recipe = tiny_recipe(steps[0])
    recipe["steps"] = steps
    pruner = HFPruner.from_pretrained(str(src), recipe=recipe)
    pruner.prune()
    pruner.save_pretrained(tmp_path / "memory")
    prune_streaming(src, recipe, tmp_path / "stream")
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert set(memory) == set(stream) and all(torch.equal(memory[k], stream[k]) for k in memory)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert reloaded.config.intermediate_size < make_tiny_model("llama").config.intermediate_size
    ids = torch.randint(0, 3000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, pruner.model(input_ids=ids).logits, atol=1e-5)


def test_width_steps_streaming_cannot_run_are_refused_before_any_work(sharded, tmp_path, tiny_recipe):
    src = sharded("llama")
    for step, message in (
        ({"method": "width", "hidden": 0.25}, "width.hidden is not available"),
        ({"method": "width", "mlp": 0.5, "compensate": "bias"}, "compensate: bias"),
    ):
        with pytest.raises(RecipeError, match=message):
            prune_streaming(src, tiny_recipe(step), tmp_path / "x")
        assert not (tmp_path / "x").exists()
    with pytest.raises(RecipeError, match="--resume with a width step"):
        prune_streaming(src, tiny_recipe({"method": "width", "mlp": 0.5}), tmp_path / "x", resume=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.work").exists()
