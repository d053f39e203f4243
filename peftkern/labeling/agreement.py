"""Inter-annotator agreement: Cohen's kappa (two raters), Fleiss' kappa (many raters, nominal) and
Krippendorff's alpha (any number of raters, missing values, nominal / ordinal / interval), and the
report ``peftkern label stats`` and the admin page show, per task, per rater and overall.

Definitions (each test checks a published worked example):
* Cohen (1960): kappa = (p_o - p_e) / (1 - p_e), p_e from each rater's own category shares.
* Fleiss (1971): P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)) per item, P-bar their mean,
  P_e = sum_j p_j^2 with p_j the share of all ratings in category j; kappa = (P-bar - P_e) / (1 - P_e).
  Items may have different numbers n_i >= 2 of ratings (the usual generalisation).
* Krippendorff (2011, "Computing Krippendorff's alpha-reliability"): the coincidence matrix
  o_ck = sum_u (pairs of values c, k from different raters in unit u) / (m_u - 1), n_c its margins,
  alpha = 1 - (n - 1) sum o_ck d2(c, k) / sum n_c n_k d2(c, k); d2 nominal = [c != k], interval
  (c - k)^2, ordinal (sum_{g from c to k} n_g - (n_c + n_k) / 2)^2 over the sorted values.

Undefined values (one category only, fewer than two paired ratings) are NaN, shown as "n/a".
"""
from __future__ import annotations

import math
from collections import Counter

from peftkern.labeling.items import preferences

NAN = float("nan")


def cohen_kappa(a: list, b: list) -> float:
    """Cohen's kappa of two raters' nominal labels of the same units (``a[i]``, ``b[i]``: unit i)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} labels from one rater and {len(b)} from the other; give the same "
                         "units in the same order")
    n = len(a)
    if n == 0:
        return NAN
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in ca) / (n * n)
    return NAN if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: list[list[int]]) -> float:
    """Fleiss' kappa from ``counts[i][j]``: raters who put item i in category j (items with fewer than
    two ratings are left out)."""
    rows = [r for r in counts if sum(r) >= 2]
    if not rows:
        return NAN
    total = sum(sum(r) for r in rows)
    categories = len(rows[0])
    p = [sum(r[j] for r in rows) / total for j in range(categories)]
    p_bar = sum((sum(x * x for x in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows) / len(rows)
    p_e = sum(x * x for x in p)
    return NAN if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(data: list[list], level: str = "nominal") -> float:
    """Krippendorff's alpha of ``data[rater][unit]`` (None: missing). ``level``: nominal, ordinal
    (values must sort) or interval (numbers)."""
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be nominal, ordinal or interval, got {level!r}")
    units = len(data[0]) if data else 0
    if any(len(r) != units for r in data):
        raise ValueError("krippendorff_alpha: every rater's row must cover the same units (None where missing)")
    values = sorted({v for r in data for v in r if v is not None})
    index = {v: i for i, v in enumerate(values)}
    size = len(values)
    o = [[0.0] * size for _ in range(size)]
    for u in range(units):
        here = [index[r[u]] for r in data if r[u] is not None]
        m = len(here)
        if m < 2:
            continue
        for x in range(m):
            for y in range(m):
                if x != y:
                    o[here[x]][here[y]] += 1.0 / (m - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)
    if n < 2 or size < 2:
        return NAN

    def d2(c: int, k: int) -> float:
        if level == "nominal":
            return float(c != k)
        if level == "interval":
            return float(values[c] - values[k]) ** 2
        lo, hi = min(c, k), max(c, k)
        return (sum(n_c[lo:hi + 1]) - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c][k] * d2(c, k) for c in range(size) for k in range(size))
    expected = sum(n_c[c] * n_c[k] * d2(c, k) for c in range(size) for k in range(size))
    return NAN if expected == 0 else 1.0 - (n - 1) * observed / expected


# -- from stored labels ---------------------------------------------------------------------------
def units_of(labels: list[dict], kind: str, view: str) -> dict:
    """``{unit: {rater: value}}`` for the labels of one kind. Views: ``verdict`` (pairwise: the
    verdict), ``pairs`` (ranking / rating: +1/0/-1 per implied pair (item, i, j)), ``scores`` (ranking:
    the rank of each answer, rating: its rating; unit (item, i))."""
    units: dict = {}
    for lab in labels:
        if lab["kind"] != kind:
            continue
        rater, value = lab["rater"], lab["value"]
        if view == "verdict":
            units.setdefault(lab["item_id"], {})[rater] = value["verdict"]
        elif view == "pairs":
            for (i, j), pref in preferences(kind, value).items():
                units.setdefault((lab["item_id"], i, j), {})[rater] = pref
        elif view == "scores":
            for i, v in enumerate(value["ranks" if kind == "ranking" else "ratings"]):
                units.setdefault((lab["item_id"], i), {})[rater] = v
        else:
            raise ValueError(f"unknown view {view!r}")
    return units


def table_stats(units: dict, ordinal: bool) -> dict:
    """Agreement over ``{unit: {rater: value}}``: Cohen's kappa and the observed agreement per pair of
    raters (on the units both labelled), Fleiss' kappa, Krippendorff's alpha (nominal, and ordinal when ``ordinal``), and per
    rater: labels, mean Cohen's kappa with the others, share agreeing with the others' majority."""
    raters = sorted({r for by in units.values() for r in by})
    keys = list(units)
    categories = sorted({v for by in units.values() for v in by.values()}, key=repr)
    out: dict = {"units": len(keys), "raters": len(raters), "labels": sum(len(by) for by in units.values()),
                 "units_with_2_or_more": sum(len(by) >= 2 for by in units.values())}
    pairs = {}
    for x in range(len(raters)):
        for y in range(x + 1, len(raters)):
            shared = [u for u in keys if raters[x] in units[u] and raters[y] in units[u]]
            if shared:
                a, b = [units[u][raters[x]] for u in shared], [units[u][raters[y]] for u in shared]
                pairs[f"{raters[x]}|{raters[y]}"] = {"units": len(shared), "kappa": cohen_kappa(a, b),
                                                     "observed": sum(p == q for p, q in zip(a, b)) / len(shared)}
    out["cohen_kappa"] = pairs
    kappas = [p["kappa"] for p in pairs.values() if not math.isnan(p["kappa"])]
    out["mean_cohen_kappa"] = sum(kappas) / len(kappas) if kappas else NAN
    out["fleiss_kappa"] = fleiss_kappa([[sum(v == c for v in by.values()) for c in categories]
                                        for by in units.values()])
    data = [[units[u].get(r) for u in keys] for r in raters]
    out["alpha_nominal"] = krippendorff_alpha(data, "nominal") if data else NAN
    if ordinal:
        out["alpha_ordinal"] = krippendorff_alpha(data, "ordinal") if data else NAN
    per_rater = {}
    for r in raters:
        mine = [k for name, k in ((n, p["kappa"]) for n, p in pairs.items()) if r in name.split("|")
                and not math.isnan(k)]
        agree = judged = 0
        for by in units.values():
            if r not in by:
                continue
            others = Counter(v for name, v in by.items() if name != r).most_common()
            if not others or (len(others) > 1 and others[0][1] == others[1][1]):
                continue
            judged += 1
            agree += by[r] == others[0][0]
        per_rater[r] = {"labels": sum(r in by for by in units.values()),
                        "mean_cohen_kappa": sum(mine) / len(mine) if mine else NAN,
                        "majority_agreement": agree / judged if judged else NAN, "majority_units": judged}
    out["per_rater"] = per_rater
    return out


def agreement_report(labels: list[dict]) -> dict:
    """Per kind of label present: the agreement tables (see table_stats). Pairwise: the verdicts
    (A better / B better / tie / both bad, in the file's order). Rankings: the implied pair
    preferences (nominal) and the ranks (ordinal alpha). Ratings: the ratings (nominal and ordinal)
    and the implied pair preferences."""
    kinds = {lab["kind"] for lab in labels}
    report = {}
    if "pairwise" in kinds:
        report["pairwise"] = table_stats(units_of(labels, "pairwise", "verdict"), ordinal=False)
    if "ranking" in kinds:
        report["ranking_pairs"] = table_stats(units_of(labels, "ranking", "pairs"), ordinal=False)
        report["ranking_ranks"] = table_stats(units_of(labels, "ranking", "scores"), ordinal=True)
    if "rating" in kinds:
        report["rating"] = table_stats(units_of(labels, "rating", "scores"), ordinal=True)
        report["rating_pairs"] = table_stats(units_of(labels, "rating", "pairs"), ordinal=False)
    return report


def without_nan(obj):
    """``obj`` with every NaN as None (JSON has no NaN; browsers reject it)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: without_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [without_nan(v) for v in obj]
    return obj


def fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_report(report: dict) -> str:
    """The report as text tables."""
    if not report:
        return "no labels yet"
    lines = []
    for name, t in report.items():
        lines.append(f"[{name}] units {t['units']} ({t['units_with_2_or_more']} with 2+ raters), raters {t['raters']}, "
                     f"labels {t['labels']}")
        alpha = f"alpha nominal {fmt(t['alpha_nominal'])}"
        if "alpha_ordinal" in t:
            alpha += f", ordinal {fmt(t['alpha_ordinal'])}"
        lines.append(f"  overall: Fleiss kappa {fmt(t['fleiss_kappa'])}, {alpha}, mean Cohen kappa "
                     f"{fmt(t['mean_cohen_kappa'])}")
        for pair, p in t["cohen_kappa"].items():
            lines.append(f"  Cohen kappa {pair.replace('|', ' vs ')}: {fmt(p['kappa'])} on {p['units']} units "
                         f"(observed agreement {fmt(p['observed'])})")
        for r, p in t["per_rater"].items():
            lines.append(f"  rater {r}: {p['labels']} labels, mean Cohen kappa {fmt(p['mean_cohen_kappa'])}, agrees "
                         f"with the others' majority {fmt(p['majority_agreement'])} ({p['majority_units']} units)")
    return "\n".join(lines)
