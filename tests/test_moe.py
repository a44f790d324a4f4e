"""Mixture-of-experts models: every routed expert pruned as its own matrix, per-expert calibration from the router's
choice, whole-expert removal into a plain checkpoint, and nothing silently left dense. Tiny random models from
transformers' own config classes for every MoE family of the adapter table."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter
from hf_prune.calibration.experts import expert_output, split_expert_call
from hf_prune.errors import RecipeError
from hf_prune.pruning.masks import nm_violations

from .conftest import MOE_FAMILIES, make_tiny_model

IDS = torch.randint(0, 3000, (2, 24), generator=torch.Generator().manual_seed(5))
# Expert count / top-k of the tiny configs (conftest.tiny_moe_config).
EXPERTS = {"mixtral": 4, "gpt_oss": 4, "llama4_text": 4}
TOP_K = {"llama4_text": 1}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _reload(pruner, tmp_path):
    out = pruner.save_pretrained(tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_math_reproduces_the_experts_module(family):
    """Splitting a call by expert and recomputing each expert gives the module's own output (all layouts:
    concatenated / interleaved gate-up, transposed, biases, Llama 4's scaled rows)."""
    model = make_tiny_model(family)
    adapter = ModelAdapter(model)
    index = adapter.moe_blocks()[0]
    spec, experts = adapter.moe_spec(index), adapter.experts_module(index)
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args, kwargs, output))

    handle = experts.register_forward_hook(hook, with_kwargs=True)
    _logits(model)
    handle.remove()
    args, kwargs, output = seen[0]
    n = getattr(experts, spec.layout.down).shape[0]
    call = split_expert_call(spec.layout, n, args, kwargs)
    if spec.layout.call == "scaled_rows":
        rows = output.view(n, -1, output.shape[-1])
        for e in range(n):
            x, weight = call.routed(e)
            hit = args[0].view(n, -1, x.shape[-1])[e].abs().sum(-1) > 0
            assert weight is None and hit.any()
            torch.testing.assert_close(expert_output(experts, spec.layout, e, x), rows[e][hit])
        return
    rebuilt = torch.zeros_like(output)
    for e in range(n):
        x, weight = call.routed(e)
        tokens = (args[1] == e).any(-1).nonzero().squeeze(-1)
        rebuilt.index_add_(0, tokens, expert_output(experts, spec.layout, e, x) * weight[:, None])
    torch.testing.assert_close(rebuilt, output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize(
    "step",
    [
        {"method": "wanda", "sparsity": 0.5},
        {"method": "sparsegpt", "structure": "2:4"},
        {"method": "wanda", "sparsity": 0.5, "moe_calibration": "all", "true_sequential": False},
    ],
)
def test_every_expert_matrix_is_pruned_exactly(family, step, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family)
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    report = pruner.prune()
    adapter = ModelAdapter(model)
    experts = [r for i in adapter.moe_blocks() for r in adapter.experts(i)]
    assert len(experts) == len(adapter.moe_blocks()) * EXPERTS.get(family, 8) * 3
    for ref in experts:
        w = ref.weight()
        if step["method"] == "wanda":  # compared per output row: exactly half of every row
            assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all(), ref.name
        else:  # 2 of every 4 consecutive inputs of the expert's (out, in) matrix
            assert nm_violations(w, 2, 4) == 0 and int((w == 0).sum()) == w.numel() // 2, ref.name
    pruned_names = {m.name for m in report.steps[0].modules}
    assert {r.name for r in experts} <= pruned_names
    coverage = report.steps[0].details["coverage"]
    assert {u["role"] for u in coverage["untouched"]} == {"router"}  # routers only: never default targets
    assert coverage["sparsity_targeted"] >= 0.5 and coverage["sparsity_all_block_weights"] > 0.45
    moe = report.steps[0].details["moe"]
    assert set(moe["tokens_per_expert"]) == set(adapter.moe_blocks())
    reloaded = _reload(pruner, tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_targets_and_coverage_name_what_was_left(tokenizer, tiny_recipe):
    model = make_tiny_model("qwen2_moe")
    report = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5, "targets": ["expert_down"]}))
    report = report.prune()
    adapter = ModelAdapter(model)
    for ref in adapter.experts(0):
        zeros = int((ref.weight() == 0).sum())
        assert zeros == (ref.weight().numel() // 2 if ref.role == "expert_down" else 0), ref.name
    assert float(adapter.linears(0)[0].weight().eq(0).float().mean()) == 0.0
    untouched = {u["name"]: u for u in report.steps[0].details["coverage"]["untouched"]}
    gate = untouched["model.layers.*.mlp.experts.gate_up_proj[*].gate"]
    assert gate["role"] == "expert_gate" and "'expert_gate' to targets" in gate["include_with"]
    assert gate["numel"] == 3 * 8 * 32 * 64 and gate["blocks"] == [0, 1, 2]
    assert untouched["model.layers.*.mlp.experts.gate_up_proj[*].up"]["role"] == "expert_up"
    assert untouched["model.layers.*.self_attn.q_proj"]["role"] == "q"
    assert untouched["model.layers.*.mlp.shared_expert_gate"]["role"] == "router"
    text = report.to_markdown()
    assert "all block weights" in text and "`model.layers.*.mlp.experts.gate_up_proj[*].gate` dense" in text


def test_routers_are_pruned_only_when_named(tokenizer, tiny_recipe):
    model = make_tiny_model("llama4_text")  # its router is an nn.Linear
    HFPruner(model, tokenizer, tiny_recipe({"method": "magnitude", "sparsity": 0.5})).prune()
    assert not bool((model.model.layers[1].feed_forward.router.weight == 0).any())
    HFPruner(model, tokenizer, tiny_recipe({"method": "magnitude", "sparsity": 0.5, "targets": ["router"]})).prune()
    assert float((model.model.layers[1].feed_forward.router.weight == 0).float().mean()) == 0.5


@pytest.mark.parametrize("true_sequential", [True, False])
def test_all_tokens_calibration_changes_statistics_not_outputs(tokenizer, tiny_recipe, true_sequential):
    from hf_prune.calibration.expert_stats import ExpertStatistics
    from hf_prune.calibration.stats import InputNormStats
    from hf_prune.pruning.context import PruneContext

    model = make_tiny_model("qwen3_moe")
    adapter = ModelAdapter(model)
    recipe = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5})).recipe
    ctx = PruneContext(model, tokenizer, adapter, recipe.calibration)
    step = next(iter(ctx.engine().walk()))
    plain = step.forward()
    norms = {}
    for mode in ("routed", "all"):
        collector = ExpertStatistics(
            step, adapter.moe_spec(0), adapter.experts(0), lambda r: InputNormStats(r.in_features, r.device), mode
        )
        outputs = collector.accumulate(keep_outputs=True)
        assert all(torch.equal(a, b) for a, b in zip(outputs, plain))  # statistics only
        norms[mode] = collector.stats[adapter.experts(0)[0].name].sq_sum
        tokens = collector.tokens
    assert sum(tokens) == 4 * 64 * 2  # every token goes to top-2 experts
    assert not torch.allclose(norms["routed"], norms["all"])

    pruned = {}
    for mode in ("routed", "all"):
        model = make_tiny_model("qwen3_moe")
        step_cfg = {"method": "wanda", "sparsity": 0.5, "moe_calibration": mode, "true_sequential": true_sequential}
        report = HFPruner(model, tokenizer, tiny_recipe(step_cfg)).prune()
        assert report.steps[0].details["moe"]["calibration"] == mode
        pruned[mode] = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    assert not torch.equal(pruned["routed"] == 0, pruned["all"] == 0)


def test_rarely_routed_experts_fall_back_to_all_tokens_and_are_reported(tokenizer, tiny_recipe):
    model = make_tiny_model("olmoe")
    step = {"method": "sparsegpt", "sparsity": 0.5, "moe_min_tokens": 100}
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    moe = report.steps[0].details["moe"]
    for block, counts in moe["tokens_per_expert"].items():
        expected = [e for e, n in enumerate(counts) if n < 100]
        assert moe["fallback_experts"].get(block, []) == expected
    assert any(moe["fallback_experts"].values())


def test_owl_profile_covers_experts(tokenizer, tiny_recipe):
    model = make_tiny_model("mixtral", layers=4)
    report = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5, "sparsity_profile": "owl"}))
    report = report.prune()
    sparsities = report.steps[0].details["block_sparsity"]
    assert abs(sum(sparsities.values()) / len(sparsities) - 0.5) < 1e-6
    for i, s in sparsities.items():
        w = ModelAdapter(model).experts(i)[0].weight()
        assert int((w == 0).sum(dim=1)[0]) == int(w.shape[1] * s + 1e-9)


def test_unknown_moe_family_is_covered_through_the_fallback(tokenizer, tiny_recipe):
    model = make_tiny_model("qwen3_moe")
    model.config.model_type = "my_new_moe"  # not in the table: blocks from _no_split_modules, experts discovered
    adapter = ModelAdapter(model)
    assert adapter.family.startswith("fallback") and adapter.moe_blocks() == [0, 1, 2]
    report = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5})).prune()
    assert {u["role"] for u in report.steps[0].details["coverage"]["untouched"]} == {"router"}
    assert float((model.model.layers[2].mlp.experts.down_proj == 0).float().mean()) == 0.5


# ------------------------------------------------------------------ expert removal
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_removal_saves_a_plain_checkpoint(family, tokenizer, tiny_recipe, tmp_path):
    total = EXPERTS.get(family, 8)
    remove = 2 if family != "llama4_text" else 1
    model = make_tiny_model(family)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "experts", "criterion": "reap", "num_experts": remove}))
    report = pruner.prune()
    details = report.steps[0].details
    assert details["experts_after"] == total - remove
    adapter = ModelAdapter(model)
    for i in adapter.moe_blocks():
        assert len(details["removed_experts"][i]) == remove
        assert adapter.experts_module(i).down_proj.shape[0] == total - remove
        assert adapter.router_module(i).weight.shape[0] == total - remove
    reloaded = _reload(pruner, tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))
    prompt = IDS[:1, :8]
    cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    uncached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("criterion", ["reap", "frequency", "random"])
def test_expert_criteria(criterion, tokenizer, tiny_recipe):
    model = make_tiny_model("qwen3_moe")
    before = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    step = {"method": "experts", "criterion": criterion, "ratio": 0.25, "seed": 1}
    details = HFPruner(model, tokenizer, tiny_recipe(step)).prune().steps[0].details
    removed = details["removed_experts"][0]
    assert len(removed) == 2 and model.config.num_experts == 6
    kept = [e for e in range(8) if e not in removed]
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, before[kept])
    if criterion != "random":
        scores = details["scores"][criterion][0]
        assert max(scores[e] for e in removed) <= min(scores[e] for e in kept)
    if criterion == "frequency":
        tokens = details["tokens_per_expert"][0]
        assert max(tokens[e] for e in removed) <= min(tokens[e] for e in kept)


def test_expert_removal_refuses_bad_requests_before_any_work(tokenizer, tiny_recipe):
    model = make_tiny_model("llama4_text")  # top-1 of 4
    for step, message in [
        ({"method": "experts", "num_experts": 4}, "would leave none"),
        ({"method": "experts", "num_experts": 2, "ratio": 0.5}, "exactly one of"),
    ]:
        with pytest.raises(RecipeError, match=message):
            HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    with pytest.raises(RecipeError, match="no mixture-of-experts block"):
        HFPruner(make_tiny_model("llama"), tokenizer, tiny_recipe({"method": "experts", "num_experts": 1})).prune()
    with pytest.raises(RecipeError, match="equal groups"):  # DeepSeek routes over 2 groups of 4
        HFPruner(
            make_tiny_model("deepseek_v3"), tokenizer, tiny_recipe({"method": "experts", "num_experts": 1})
        ).prune()
    assert model.model.layers[1].feed_forward.experts.down_proj.shape[0] == 4


def test_expert_removal_then_weight_pruning(tokenizer, calib_texts, tmp_path):
    recipe = {
        "calibration": {"source": calib_texts, "nsamples": 4, "seqlen": 64, "seed": 0},
        "steps": [{"method": "experts", "ratio": 0.25}, {"method": "sparsegpt", "structure": "2:4"}],
    }
    model = make_tiny_model("mixtral")
    pruner = HFPruner(model, tokenizer, recipe)
    pruner.prune()
    reloaded = _reload(pruner, tmp_path)
    assert reloaded.config.num_local_experts == 3
    assert reloaded.config.pruning_config["steps"][0]["removed_experts"]
    for ref in ModelAdapter(reloaded).experts(0):
        assert nm_violations(ref.weight(), 2, 4) == 0
    assert torch.equal(_logits(reloaded), _logits(model))


# ------------------------------------------------------------------ big-model paths
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_streaming_and_offloaded_device_map_prune_experts_like_in_memory(family, tmp_path, tokenizer, tiny_recipe):
    import glob

    from safetensors.torch import load_file

    from hf_prune import prune_streaming

    src = tmp_path / "src"
    make_tiny_model(family).save_pretrained(src, max_shard_size="300KB")
    tokenizer.save_pretrained(src)
    recipe = tiny_recipe({"method": "sparsegpt", "structure": "2:4"})
    memory = HFPruner.from_pretrained(str(src), recipe=recipe)
    memory.prune()
    memory.save_pretrained(tmp_path / "memory")
    report = prune_streaming(src, recipe, tmp_path / "stream")
    assert report.steps[0].details["coverage"]["sparsity_targeted"] == 0.5

    def tensors(folder):
        return {k: v for f in glob.glob(str(folder / "*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "stream")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    offloaded = AutoModelForCausalLM.from_pretrained(src, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert offloaded.model.layers[2].mlp.experts.down_proj.device.type == "meta"
    HFPruner(offloaded, tokenizer, recipe).prune()
    assert torch.equal(_logits(offloaded), _logits(memory.model))


def test_top_k_follows_when_fewer_experts_remain(tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model("qwen3_moe")  # top-2 of 8
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "experts", "criterion": "frequency", "num_experts": 7}))
    details = pruner.prune().steps[0].details
    assert details["config_changes"] == {"num_experts": [8, 1], "num_experts_per_tok": [2, 1]}
    reloaded = _reload(pruner, tmp_path)
    assert reloaded.config.num_experts_per_tok == 1
    assert torch.equal(_logits(reloaded), _logits(model))


# ------------------------------------------------------------------ per-expert linears (ModuleList layout)
class _ExpertMLP(torch.nn.Module):
    def __init__(self, gate_up, down, act):
        super().__init__()
        width = down.shape[1]
        self.gate_proj = torch.nn.Linear(gate_up.shape[1], width, bias=False)
        self.up_proj = torch.nn.Linear(gate_up.shape[1], width, bias=False)
        self.down_proj = torch.nn.Linear(width, down.shape[0], bias=False)
        self.gate_proj.weight.data, self.up_proj.weight.data = gate_up[:width].clone(), gate_up[width:].clone()
        self.down_proj.weight.data = down.clone()
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _LoopExperts(torch.nn.ModuleList):
    """The layout of remote-code MoEs: one MLP module per expert, each called on its routed tokens."""

    skip: tuple[int, ...] = ()  # experts treated as never chosen

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e, mlp in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if len(tokens) and e not in self.skip:
                out.index_add_(0, tokens, mlp(hidden[tokens]) * top_k_weights[tokens, slot, None])
        return out


def _per_expert_model():
    model = make_tiny_model("qwen3_moe")
    for layer in model.model.layers:
        fused = layer.mlp.experts
        mlps = [_ExpertMLP(fused.gate_up_proj[e].data, fused.down_proj[e].data, fused.act_fn) for e in range(8)]
        layer.mlp.experts = _LoopExperts(mlps)
    return model


@pytest.mark.parametrize("true_sequential", [True, False])
def test_per_expert_linears_are_pruned_from_their_routed_tokens(true_sequential, tokenizer, tiny_recipe):
    fused_model = make_tiny_model("qwen3_moe")
    model = _per_expert_model()
    assert torch.allclose(_logits(model), _logits(fused_model), atol=1e-5)
    adapter = ModelAdapter(model)
    refs = adapter.experts(0)
    assert len(refs) == 24 and {r.role for r in refs} == {"expert_gate", "expert_up", "expert_down"}
    assert not any(".experts." in r.name for r in adapter.linears(0))
    step = {"method": "wanda", "sparsity": 0.5, "true_sequential": true_sequential, "moe_min_tokens": 0}
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    for ref in ModelAdapter(model).all_weight_targets():
        if ref.role != "router":
            assert ((ref.weight() == 0).sum(dim=1) == ref.in_features // 2).all(), ref.name
    # the same per-expert statistics as the fused layout: identical masks
    HFPruner(fused_model, tokenizer, tiny_recipe(step)).prune()
    for i, layer in enumerate(model.model.layers):
        for e, mlp in enumerate(layer.mlp.experts):
            fused = fused_model.model.layers[i].mlp.experts
            assert torch.equal(mlp.down_proj.weight == 0, fused.down_proj[e] == 0)
            assert torch.equal(mlp.gate_proj.weight == 0, fused.gate_up_proj[e][:32] == 0)
    assert report.steps[0].details["moe"]["tokens_per_expert"]


def test_per_expert_linears_never_routed_fall_back_to_all_tokens(tokenizer, tiny_recipe):
    model = _per_expert_model()
    model.model.layers[1].mlp.experts.skip = (3,)  # expert 3 of block 1 is never called
    report = HFPruner(model, tokenizer, tiny_recipe({"method": "sparsegpt", "sparsity": 0.5})).prune()
    moe = report.steps[0].details["moe"]
    assert moe["tokens_per_expert"][1][3] == 0 and 3 in moe["fallback_experts"][1]
    w = model.model.layers[1].mlp.experts[3].down_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2
    with pytest.raises(RecipeError, match="ModuleList"):
        HFPruner(model, tokenizer, tiny_recipe({"method": "experts", "num_experts": 2})).prune()


def test_shipped_moe_recipe_parses():
    from hf_prune import Recipe

    recipe = Recipe.from_yaml("configs/moe_experts_wanda.yaml")
    assert [s.method for s in recipe.steps] == ["experts", "wanda"] and recipe.steps[1].moe_calibration == "routed"


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("order", ["staged", "two_pass"])
def test_experts_calibrated_in_groups_that_fit_the_memory_give_the_same_weights(layout, order, tokenizer, tiny_recipe):
    """Where the experts' statistics are collected before pruning (several calibration chunks, or parallel order),
    they are collected and pruned a group of experts at a time within moe_stats_memory: one expert per pass here,
    and every weight equals the run that holds them all at once."""
    step = {"method": "sparsegpt", "sparsity": 0.5, "true_sequential": order == "staged"}
    batch = {"batch_size": 1} if order == "staged" else {}
    models = []
    for memory in (None, 1e-9):  # default (a quarter of the free memory), then one expert per group
        model = _per_expert_model() if layout == "per_expert" else make_tiny_model("qwen3_moe")
        recipe = tiny_recipe({**step, **({"moe_stats_memory": memory} if memory else {})})
        recipe["calibration"].update(batch)
        details = HFPruner(model, tokenizer, recipe).prune().steps[0].details
        models.append(model)
        if memory:
            assert details["moe_stats_passes"] == {i: 8 for i in ModelAdapter(model).moe_blocks()}
        else:
            assert "moe_stats_passes" not in details
    dense, grouped = (dict(m.named_parameters()) for m in models)
    for name, p in grouped.items():
        assert torch.equal(p, dense[name]), name
    with pytest.raises(RecipeError, match="moe_stats_memory"):
        HFPruner(make_tiny_model("qwen3_moe"), tokenizer, tiny_recipe({**step, "moe_stats_memory": 0})).prune()
