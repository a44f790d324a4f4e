"""Every shipped recipe parses and names only registered methods and known keys."""

from pathlib import Path

import pytest

from hf_prune import Recipe

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_parses(path):
    recipe = Recipe.from_yaml(str(path))
    assert recipe.steps and recipe.model
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_required_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "wanda_2of4.yaml"} <= names
