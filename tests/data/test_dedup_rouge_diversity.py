"""MinHash dedup, ROUGE-L (against a hand computation and rouge-score) and the diversity measures."""
import random

import numpy as np
import pytest

from peftkern.data.dedup import MinHasher, choose_bands, exact_groups, jaccard, near_duplicate_pairs, shingles
from peftkern.data.diversity import distinct_n, verb_object
from peftkern.data.rouge import RougePool, lcs_length, rouge_l, rouge_tokens


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    universe = [f"s{i}" for i in range(400)]
    hasher = MinHasher(256, seed=3)
    for _ in range(5):
        a = frozenset(rng.sample(universe, 150))
        b = frozenset(sorted(a)[:100] + rng.sample(universe, 60))  # sorted: set order follows PYTHONHASHSEED
        est = float(np.mean(hasher.signature(a) == hasher.signature(b)))
        assert abs(est - jaccard(a, b)) < 0.1  # 4 standard errors at 256 permutations


def test_bands_catch_pairs_at_the_threshold():
    for threshold in (0.5, 0.8, 0.95):
        bands, rows = choose_bands(128, threshold)
        assert bands * rows <= 128 and 1 - (1 - threshold ** rows) ** bands >= 0.995


def test_near_pairs_within_and_across():
    base = "the quick brown fox jumps over the lazy dog near the river bank"
    texts = [base, base.replace("lazy", "sleepy"), "something else entirely, about cooking rice", base.upper()]
    pairs = near_duplicate_pairs(texts, threshold=0.7)
    got = {(p.i, p.j): p.similarity for p in pairs}
    assert got == {(1, 0): pytest.approx(jaccard(shingles(texts[0]), shingles(texts[1]))), (3, 0): 1.0}
    skip_exact = near_duplicate_pairs(texts, threshold=0.7, exclude=lambda i, j: texts[i].lower() == texts[j].lower())
    assert [(p.i, p.j) for p in skip_exact] == [(1, 0), (3, 1)]
    across = near_duplicate_pairs(["cooking rice: something else entirely"], texts, threshold=0.3)
    assert [(p.i, p.j) for p in across] == [(0, 2)]
    assert exact_groups(["A  b", "a b", "c", "a B "]) == [[0, 1, 3]]
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(texts, threshold=0)


def test_near_pairs_against_brute_force():
    """Every text with a match >= threshold among the earlier ones is found, with its best match."""
    rng = random.Random(2)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(60)]
    texts += [t.replace(t.split()[rng.randrange(8)], "omega", 1) for t in texts[:40]]
    sets = [shingles(t) for t in texts]
    for threshold in (0.6, 0.8):
        want = {}
        for i in range(len(texts)):
            sims = [(jaccard(sets[i], sets[j]), -j) for j in range(i)]
            if sims and max(sims)[0] >= threshold:
                want[i] = -max(sims)[1]
        got = {p.i: p.j for p in near_duplicate_pairs(texts, threshold=threshold)}
        assert got == want and len(want) >= 5


def test_rouge_l_hand_computation():
    # tokens: [the cat sat on the mat] vs [the cat on a mat]; LCS = the cat on mat = 4
    # P = 4/5, R = 4/6, F = 2PR/(P+R) = 8/11
    assert rouge_tokens("The cat, on a MAT!") == ["the", "cat", "on", "a", "mat"]
    assert lcs_length("the cat sat on the mat".split(), "the cat on a mat".split()) == 4
    assert rouge_l("the cat sat on the mat", "The cat on a mat.") == pytest.approx(8 / 11, abs=1e-15)
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "a b") == 1.0 and rouge_l("a b", "c d") == 0.0


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    words = "the a cat dog sat on mat, x-ray 42 Über naïve y z".split()
    for _ in range(300):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)


def test_pool_nearest_and_the_0_7_boundary():
    pool = RougePool(["a b c d e f g h i j", "completely different words here"])
    exactly = pool.nearest("a b c d e f g x y z")  # LCS 7 of 10 and 10: F = 14/20
    assert exactly.index == 0 and exactly.score == 0.7
    assert pool.nearest("a b c d e f x y z w").score == pytest.approx(0.6)
    assert pool.nearest("").index == -1 and len(pool) == 2


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]  # unigrams: a b a b a c -> 3 unique / 6; bigrams: ab ba ab ac -> 3 / 4
    assert distinct_n(texts, 1) == 0.5 and distinct_n(texts, 2) == 0.75 and distinct_n([], 2) == 0.0


@pytest.mark.parametrize("text, pair", [
    ("Give three tips for staying healthy.", ("give", "tip")),
    ("Please write a short poem about the sea.", ("write", "poem")),
    ("Can you summarize the following article?", ("summarize", "article")),
    ("Classify the animals as mammals or birds.", ("classify", "animal")),
    ("Reverse 'kel'.", ("reverse", None)),
    ("What is the capital of France?", None),
    ("How do birds fly?", None),
    ("", None),
])
def test_verb_object(text, pair):
    assert verb_object(text) == pair
