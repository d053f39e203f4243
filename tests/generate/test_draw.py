"""inverse_cdf_draw: the decoding loop's fast categorical draw (one uniform per row)."""
import torch

from peftkern.generate import inverse_cdf_draw


def test_frequencies_match_the_probabilities():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 11, generator=gen) * 2, dim=-1)
    n = 40000
    draws = torch.stack([inverse_cdf_draw(probs, gen) for _ in range(n)])  # [n, 3]
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=11).double() / n
        # 5 standard errors of a binomial share
        bound = 5 * (probs[row].double() * (1 - probs[row].double()) / n).sqrt() + 1e-9
        assert ((freq - probs[row].double()).abs() <= bound).all(), (row, freq, probs[row])


def test_never_draws_a_token_of_probability_zero_and_is_seeded():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(64, 500, generator=gen)
    probs[:, ::3] = 0.0
    probs[:, -7:] = 0.0  # the top end carries nothing: rounding must not land there
    probs[0] = 0.0
    probs[0, 4] = 1.0  # one certain token
    probs = probs / probs.sum(-1, keepdim=True)
    for _ in range(200):
        t = inverse_cdf_draw(probs, gen)
        assert (probs.gather(1, t[:, None]) > 0).all()
        assert t[0] == 4
    a = inverse_cdf_draw(probs, torch.Generator().manual_seed(7))
    b = inverse_cdf_draw(probs, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (64,)
