"""Models dispatched by accelerate (device_map, CPU/disk offload) prune to the same weights as in-memory models."""

import pytest
import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner

from .conftest import DISK_OFFLOAD_MAP, make_tiny_model

IDS = torch.randint(0, 3000, (1, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def recipe(tiny_recipe):
    return tiny_recipe({"method": "wanda", "sparsity": 0.5})


@pytest.fixture
def expected_logits(tokenizer, recipe):
    model = make_tiny_model("llama")
    HFPruner(model, tokenizer, recipe).prune()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_cpu_offloaded_model(tokenizer, recipe, expected_logits):
    model = cpu_offload(make_tiny_model("llama"), execution_device="cpu")
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    HFPruner(model, tokenizer, recipe).prune()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected_logits)


@pytest.mark.parametrize("magnitude", [False, True])
def test_disk_offloaded_device_map_prunes_saves_and_leaves_offload_files_alone(
    tmp_path, tokenizer, tiny_recipe, expected_logits, magnitude
):
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, device_map=DISK_OFFLOAD_MAP, offload_folder=str(tmp_path / "off")
    )
    assert model.model.layers[2].mlp.up_proj.weight.device.type == "meta"
    before = {p.name: p.read_bytes() for p in (tmp_path / "off").rglob("*") if p.is_file()}
    source_bytes = (src / "model.safetensors").read_bytes()
    step = {"method": "magnitude", "sparsity": 0.5} if magnitude else {"method": "wanda", "sparsity": 0.5}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    pruner.prune()
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        assert torch.equal(reloaded(input_ids=IDS).logits, got)
    if not magnitude:
        assert torch.equal(got, expected_logits)
    assert int((reloaded.model.layers[2].mlp.up_proj.weight == 0).sum()) == 128 * 64 // 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "off").rglob("*") if p.is_file()} == before
    assert (src / "model.safetensors").read_bytes() == source_bytes


def test_device_map_auto_on_this_machine(tmp_path, tokenizer, recipe, expected_logits):
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, device_map="auto")
    HFPruner(model, tokenizer, recipe).prune()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected_logits)
