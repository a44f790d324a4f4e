"""Pure mask math: exact counts, N:M patterns, structure parsing."""

import pytest
import torch

from hf_prune.pruning.masks import (
    Structure,
    expected_pruned,
    layer_mask,
    nm_mask,
    nm_violations,
    parse_structure,
    row_mask,
    select_mask,
)


def test_row_mask_prunes_lowest_scores_of_each_row_exactly():
    torch.manual_seed(0)
    scores = torch.rand(7, 40)
    mask = row_mask(scores, 0.5)
    assert mask.sum(dim=1).tolist() == [20] * 7
    for r in range(7):
        assert scores[r][mask[r]].max() < scores[r][~mask[r]].min()


def test_layer_mask_prunes_lowest_scores_of_whole_matrix():
    torch.manual_seed(0)
    scores = torch.rand(6, 10)
    mask = layer_mask(scores, 0.3)
    assert int(mask.sum()) == 18
    assert scores[mask].max() < scores[~mask].min()
    assert mask.sum(dim=1).tolist() != [3] * 6  # not per row


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_largest_in_every_group(n, m):
    torch.manual_seed(0)
    scores = torch.rand(5, 32)
    mask = nm_mask(scores, n, m)
    groups = mask.view(5, 32 // m, m)
    assert (groups.sum(dim=2) == m - n).all()
    weight = torch.where(mask, torch.zeros_like(scores), scores)
    assert nm_violations(weight, n, m) == 0
    kept = scores.view(5, -1, m)[~groups].view(5, -1, n)
    dropped = scores.view(5, -1, m)[groups].view(5, -1, m - n)
    assert (kept.min(dim=2).values >= dropped.max(dim=2).values).all()


def test_nm_violations_detects_dense_groups():
    w = torch.ones(2, 8)
    assert nm_violations(w, 2, 4) == 4


def test_parse_structure():
    assert parse_structure("unstructured") == Structure()
    assert parse_structure("2:4") == Structure(2, 4)
    assert parse_structure(" 4 : 8 ").sparsity == 0.5
    for bad in ["4:4", "5:4", "0:4", "2-4", "half"]:
        with pytest.raises(ValueError):
            parse_structure(bad)


@pytest.mark.parametrize("structure,group", [(Structure(), "row"), (Structure(), "layer"), (Structure(2, 4), "row")])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_expected_pruned_matches_select_mask(structure, group, sparsity):
    scores = torch.rand(12, 24)
    s = structure.sparsity if structure.is_nm else sparsity
    assert int(select_mask(scores, s, structure, group).sum()) == expected_pruned((12, 24), s, structure, group)
