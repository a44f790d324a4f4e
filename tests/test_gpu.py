"""The accelerator lane: every method on CUDA in bf16 against the CPU float32 result (skipped without a GPU).

    pytest -m gpu                                  # on a machine with one or more NVIDIA GPUs
    HF_PRUNE_TEST_DEVICE=cpu pytest -m gpu         # the same lane with the CPU standing in (a dry run)

What a CPU cannot show: device mismatches (tensors made in method code on the wrong device), bf16 kernels, sequential
onloading from host memory onto the GPU, structural rebuilds that keep the placement, nccl under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner

from .conftest import make_tiny_model
from .method_matrix import DENSE, MOE, zeros_of

DEVICE = os.environ.get("HF_PRUNE_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TYPE = torch.device(DEVICE).type

IDS = torch.randint(0, 3000, (2, 32), generator=torch.Generator().manual_seed(3))


def _prune(family, step, tiny_recipe, tokenizer, dtype, device, **recipe):
    model = make_tiny_model(family).to(dtype)
    pruner = HFPruner(model, tokenizer, tiny_recipe(step, device=device, **recipe))
    report = pruner.prune()
    return pruner, report


@pytest.mark.parametrize("name", list(DENSE) + list(MOE))
def test_every_method_on_cuda_in_bf16(name, tiny_recipe, tokenizer, tmp_path):
    family, step = ("qwen3_moe", MOE[name]) if name in MOE else ("llama", DENSE[name])
    ref, _ = _prune(family, step, tiny_recipe, tokenizer, torch.float32, "cpu")
    gpu, report = _prune(family, step, tiny_recipe, tokenizer, torch.bfloat16, DEVICE)
    assert report.placement["device"].startswith(DEVICE)
    assert all(p.dtype == torch.bfloat16 for p in gpu.model.parameters() if p.is_floating_point())
    assert all(p.device.type == TYPE for p in gpu.model.parameters())
    with torch.no_grad():
        logits = gpu.model(input_ids=IDS.to(DEVICE)).logits
    assert torch.isfinite(logits).all()
    a, b = zeros_of(ref.model), zeros_of(gpu.model)
    if a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a):
        agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())
        assert agree > 0.9, agree  # bf16 statistics vs float32: most decisions agree
    out = gpu.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=name in ("width-per-block", "slicegpt")).to(
        DEVICE
    )
    assert next(reloaded.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["sparsegpt-2of4", "width-ls", "depth"])
def test_onloading_from_host_memory_equals_the_model_on_the_gpu(name, tiny_recipe, tokenizer):
    moved, _ = _prune("llama", DENSE[name], tiny_recipe, tokenizer, torch.bfloat16, DEVICE)
    onloaded, report = _prune("llama", DENSE[name], tiny_recipe, tokenizer, torch.bfloat16, DEVICE, onload=True)
    assert report.placement["mode"] == "onloaded"
    with torch.no_grad():
        x = IDS.to(DEVICE)
        assert torch.allclose(moved.model(input_ids=x).logits, onloaded.model(input_ids=x).logits, atol=1e-2)


def test_masks_do_not_depend_on_the_batch_size_on_cuda(tiny_recipe, tokenizer):
    masks = []
    for batch_size in (0, 1):
        recipe = tiny_recipe({"method": "sparsegpt", "sparsity": 0.5}, nsamples=6, device=DEVICE)
        recipe["calibration"]["batch_size"] = batch_size
        model = make_tiny_model("llama")
        HFPruner(model, tokenizer, recipe).prune()
        masks.append(zeros_of(model))
    total = sum(v.numel() for v in masks[0].values())
    assert sum(int((masks[0][k] == masks[1][k]).sum()) for k in masks[0]) / total >= 0.999


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_visual_tokens_generate_on_cuda(family):
    from hf_prune.vlm import enable_visual_token_pruning

    from .vlm_models import tiny_vlm

    model, ids, extra = tiny_vlm(family)
    model = model.to(DEVICE)
    ids, extra = ids.to(DEVICE), {k: v.to(DEVICE) for k, v in extra.items()}
    enable_visual_token_pruning(model, "fastv", keep=0.25)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, **extra, use_cache=True, **gen)
        plain = model.generate(input_ids=ids, **extra, use_cache=False, **gen)
    assert torch.equal(cached, plain)


def test_heal_on_cuda(tiny_recipe, tokenizer, calib_texts):
    pruner, _ = _prune("llama", DENSE["wanda-2of4"], tiny_recipe, tokenizer, torch.bfloat16, DEVICE)
    summary = pruner.heal(
        max_steps=3, batch_size=2, seqlen=32, lora_r=4, warmup_steps=1, distill=False, source=calib_texts
    )
    assert summary["steps"] == 3
    for name, p in pruner.model.named_parameters():
        if "mlp" in name and p.dim() == 2:
            assert int((p == 0).sum()) == p.numel() // 2, name


def test_streaming_onto_cuda(tmp_path, tiny_recipe, tokenizer):
    from hf_prune import prune_streaming

    src = tmp_path / "src"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    tokenizer.save_pretrained(src)
    report = prune_streaming(src, tiny_recipe(DENSE["wanda-50"], device=DEVICE), tmp_path / "out")
    assert report.placement["device"].startswith(DEVICE)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs two GPUs")
def test_torchrun_nccl_on_two_gpus(tmp_path, tokenizer):
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "calibration: {source: wikipedia-tail, nsamples: 4, seqlen: 64}\nsteps: [{method: sparsegpt, sparsity: 0.5}]\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hf_prune.cli"]
    cmd += ["run", str(recipe), "--model", str(src), "--output", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=600)
    assert (tmp_path / "out" / "config.json").exists()
