"""Plackett-Luce and all-pairs Bradley-Terry reward losses over K ranked completions."""
import itertools
import math

import pytest
import torch

from peftkern.losses.ranking import (all_pairs_bradley_terry_loss, pairwise_accuracy, plackett_luce_loss,
                                     rank_loss, ranked_scores)
from peftkern.losses.reward import reward_model_loss


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_k2_plackett_luce_is_bradley_terry_exactly(seed):
    scores = torch.randn(37, 2) * 3
    margin = torch.rand(37)
    for m in (None, margin):
        pl = plackett_luce_loss(scores, margin=m, reduction="none")
        bt = all_pairs_bradley_terry_loss(scores, margin=m, reduction="none")
        assert torch.equal(pl, bt)  # bit for bit
        pairwise = reward_model_loss(scores[:, 0], scores[:, 1], margin=m)
        assert torch.allclose(pl.mean(), pairwise, rtol=1e-6, atol=0), (pl.mean(), pairwise)
    s64 = scores.double().requires_grad_(True)
    g_pl, = torch.autograd.grad(plackett_luce_loss(s64), s64)
    g_bt, = torch.autograd.grad(all_pairs_bradley_terry_loss(s64), s64)
    assert torch.allclose(g_pl, g_bt, rtol=1e-12, atol=1e-15)  # logcumsumexp's backward rounds differently


def test_hand_computed_k3():
    s = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    pl = math.log(math.exp(2) + math.exp(1) + 1) - 2 + math.log(math.exp(1) + 1) - 1
    bt = (_softplus(1 - 2) + _softplus(0 - 2) + _softplus(0 - 1)) / 3
    assert plackett_luce_loss(s).item() == pytest.approx(pl, rel=1e-14)
    assert all_pairs_bradley_terry_loss(s).item() == pytest.approx(bt, rel=1e-14)
    # the worst ranking of the same scores costs more
    assert plackett_luce_loss(s.flip(-1)).item() > pl
    # margin 0.5: every stage / pair difference is shifted by 0.5
    pl_m = _softplus(math.log(math.exp(1) + 1) - 2 + 0.5) + _softplus(0 - 1 + 0.5)
    assert plackett_luce_loss(s, margin=0.5).item() == pytest.approx(pl_m, rel=1e-14)
    bt_m = (_softplus(1 - 2 + 0.5) + _softplus(0 - 2 + 0.5) + _softplus(0 - 1 + 0.5)) / 3
    assert all_pairs_bradley_terry_loss(s, margin=0.5).item() == pytest.approx(bt_m, rel=1e-14)
    assert pairwise_accuracy(torch.tensor([[2.0, 3.0, 0.0]])).item() == pytest.approx(2 / 3)


def test_plackett_luce_is_a_distribution_over_rankings(seed):
    """exp(-loss) over the K! orderings of one list sums to 1."""
    s = torch.randn(4, dtype=torch.float64)
    total = sum(math.exp(-plackett_luce_loss(s[list(p)][None]).item()) for p in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("fn", [plackett_luce_loss, all_pairs_bradley_terry_loss])
def test_padded_lists_equal_unpadded(fn, seed):
    lengths = [2, 5, 3, 4]
    rows = [torch.randn(n, dtype=torch.float64) for n in lengths]
    scores = torch.randn(len(rows), 5, dtype=torch.float64) * 100  # padding holds junk
    mask = torch.zeros(len(rows), 5, dtype=torch.bool)
    for i, r in enumerate(rows):
        scores[i, :len(r)], mask[i, :len(r)] = r, True
    scores.requires_grad_(True)
    got = fn(scores, mask, reduction="none")
    expected = torch.stack([fn(r[None], reduction="none")[0] for r in rows])
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    grad, = torch.autograd.grad(got.sum(), scores)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert torch.autograd.gradcheck(lambda x: fn(x, mask), (scores.detach().requires_grad_(True),))


def test_ranked_scores_and_names(seed):
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    ranking = torch.tensor([[1, 2, 0]])
    assert ranked_scores(scores, ranking).tolist() == [[pytest.approx(0.9), pytest.approx(0.5), pytest.approx(0.1)]]
    ranked = ranked_scores(scores, ranking)
    assert torch.equal(rank_loss(ranked, loss_type="plackett_luce"), plackett_luce_loss(ranked))
    assert torch.equal(rank_loss(ranked), all_pairs_bradley_terry_loss(ranked))
    assert rank_loss(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type 'listnet'"):
        rank_loss(torch.randn(2, 3), loss_type="listnet")
    with pytest.raises(ValueError, match=r"K >= 2"):
        plackett_luce_loss(torch.randn(4, 1))
    with pytest.raises(ValueError, match="list 1 has 1"):
        plackett_luce_loss(torch.randn(2, 3), torch.tensor([[True, True, False], [True, False, False]]))
    with pytest.raises(ValueError, match="prefix"):
        all_pairs_bradley_terry_loss(torch.randn(1, 3), torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="3 values for 2 lists"):
        all_pairs_bradley_terry_loss(torch.randn(2, 3), margin=torch.zeros(3))
