"""Agreement statistics against published worked examples and the krippendorff package."""
import math
import random

import pytest

from peftkern.labeling.agreement import agreement_report, cohen_kappa, fleiss_kappa, krippendorff_alpha

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
# values 1-5, missing data. His published results: nominal 0.743, ordinal 0.815, interval 0.849.
KRIPPENDORFF_C = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
                  [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
                  [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
                  [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
# Fleiss (1971) as worked in Wikipedia's "Fleiss' kappa" article: 10 subjects, 14 raters, 5 categories;
# P-bar = 0.378, P_e = 0.213, kappa = 0.210.
FLEISS_TABLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_cohen_kappa_wikipedia_example():
    # Wikipedia's "Cohen's kappa" example: 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15:
    # p_o = 0.7, p_e = 0.5, kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(a, a) == 1.0
    assert math.isnan(cohen_kappa(["x"] * 3, ["x"] * 3))  # one category: undefined
    with pytest.raises(ValueError, match="same units"):
        cohen_kappa([1, 2], [1])


def test_fleiss_kappa_published_example():
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.20993, abs=5e-6)
    assert round(fleiss_kappa(FLEISS_TABLE), 3) == 0.210


def test_fleiss_two_raters_matches_scott_pi():
    # With two raters Fleiss' kappa is Scott's pi: (p_o - p_e) / (1 - p_e), p_e from the pooled shares.
    a, b = [0, 0, 1, 1, 2, 0, 1], [0, 1, 1, 1, 2, 2, 1]
    counts = [[(x == c) + (y == c) for c in range(3)] for x, y in zip(a, b)]
    p_o = sum(x == y for x, y in zip(a, b)) / len(a)
    pooled = [(a.count(c) + b.count(c)) / (2 * len(a)) for c in range(3)]
    p_e = sum(p * p for p in pooled)
    assert fleiss_kappa(counts) == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)


@pytest.mark.parametrize("level, published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_published_example(level, published):
    assert round(krippendorff_alpha(KRIPPENDORFF_C, level), 3) == published


def test_krippendorff_binary_example():
    # Krippendorff (2011), section A: two observers, ten units, binary: alpha = 0.095.
    data = [[0, 1, 0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]]
    assert round(krippendorff_alpha(data, "nominal"), 3) == 0.095


@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_krippendorff_matches_the_package_on_random_data(level):
    krippendorff = pytest.importorskip("krippendorff", reason="the krippendorff package is not installed")
    import numpy as np

    rng = random.Random(7)
    for _ in range(5):
        raters, units = rng.randint(2, 5), rng.randint(4, 15)
        data = [[rng.choice([None, 1, 2, 3, 4, 5]) for _ in range(units)] for _ in range(raters)]
        data[0] = [1 if v is None else v for v in data[0]]
        data[1] = [2 if v is None else v for v in data[1]]  # every unit pairable
        arr = np.array([[np.nan if v is None else v for v in row] for row in data], dtype=float)
        ours = krippendorff_alpha(data, level)
        theirs = krippendorff.alpha(reliability_data=arr, level_of_measurement=level)
        assert ours == pytest.approx(theirs, abs=1e-9)


def test_report_per_rater_and_overall():
    labels = []
    verdicts = {"alice": ["0", "0", "1", "tie"], "bob": ["0", "1", "1", "tie"], "carol": ["0", "0", "1", "1"]}
    for rater, vs in verdicts.items():
        for i, v in enumerate(vs):
            labels.append({"rater": rater, "item_id": f"i{i}", "kind": "pairwise", "value": {"verdict": v}})
    t = agreement_report(labels)["pairwise"]
    assert t["units"] == 4 and t["raters"] == 3 and t["labels"] == 12
    assert t["cohen_kappa"]["alice|bob"]["kappa"] == pytest.approx(
        cohen_kappa(verdicts["alice"], verdicts["bob"]), abs=1e-12)
    assert t["cohen_kappa"]["alice|bob"]["observed"] == 0.75  # all but item 1
    cats = ["0", "1", "tie"]
    counts = [[sum(verdicts[r][i] == c for r in verdicts) for c in cats] for i in range(4)]
    assert t["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts), abs=1e-12)
    assert t["alpha_nominal"] == pytest.approx(krippendorff_alpha(list(verdicts.values()), "nominal"), abs=1e-12)
    # alice agrees with the majority of bob and carol where they agree: items 0 and 2 (1 and 3 split).
    assert t["per_rater"]["alice"]["majority_units"] == 2
    assert t["per_rater"]["alice"]["majority_agreement"] == 1.0
    kab, kac = t["cohen_kappa"]["alice|bob"]["kappa"], t["cohen_kappa"]["alice|carol"]["kappa"]
    assert t["per_rater"]["alice"]["mean_cohen_kappa"] == pytest.approx((kab + kac) / 2)
