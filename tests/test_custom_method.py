"""A method written outside the package, PEFT-style: a config dataclass and the math, registered by name, then used
from a recipe like the built-ins. The example is RIA (Zhang et al., "Plug-and-Play", ICLR 2024): relative importance
|W_ij| / sum_row |W| + |W_ij| / sum_col |W|, times ||X_j||^a."""

from dataclasses import dataclass

import pytest

from hf_prune import HFPruner, available_methods, get_method, register_method
from hf_prune.calibration.stats import InputNormStats
from hf_prune.pruning.masks import nm_violations, select_mask
from hf_prune.pruning.weight_pruning import WeightPruningConfig, WeightPruningMethod

from .conftest import make_tiny_model


@dataclass
class RIAConfig(WeightPruningConfig):
    method: str = "ria"
    alpha: float = 0.5


class RIAMethod(WeightPruningMethod):
    comparison_group = "row"

    def make_stats(self, ref):
        return InputNormStats(ref.in_features, ref.device)

    def prune_weight(self, weight, stats, sparsity, structure, name):
        w = weight.abs()
        relative = w / w.sum(dim=1, keepdim=True) + w / w.sum(dim=0, keepdim=True)
        scores = relative * stats.norms.float().pow(self.config.alpha).unsqueeze(0)
        return None, select_mask(scores, sparsity, structure, "row")


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_method("ria", RIAConfig, RIAMethod)


@pytest.mark.parametrize("step", [{"sparsity": 0.5}, {"structure": "2:4"}])
def test_a_registered_method_prunes_from_a_recipe_like_the_built_ins(step, tokenizer, tiny_recipe):
    assert "ria" in available_methods() and "wanda" in available_methods()
    assert get_method("ria").method_cls is RIAMethod
    model = make_tiny_model("llama")
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "ria", "alpha": 0.5, **step}))
    report = pruner.prune()
    assert report.steps[0].config["alpha"] == 0.5
    for ref in pruner.adapter.all_linears():
        weight = ref.module.weight
        assert int((weight == 0).sum()) == weight.numel() // 2
        if "structure" in step:
            assert nm_violations(weight, 2, 4) == 0


def test_a_registered_name_cannot_be_taken_by_another_method():
    with pytest.raises(ValueError, match="already registered"):
        register_method("wanda", RIAConfig, RIAMethod)
