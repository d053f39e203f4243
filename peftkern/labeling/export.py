"""Labels out as training data.

``pairs`` (TRL's preference format, what ``peftkern rm`` / ``dpo`` read): one
``{"prompt", "chosen", "rejected"}`` line per pair of answers the raters preferred one of, pooled
over every rater and label kind: a pairwise verdict is one vote, a K-way ranking votes on all its
K (K - 1) / 2 implied pairs, a rating on every pair it rates differently; ties and "both bad" are
votes for neither. Each line also carries ``agreement`` (votes for the winner / all votes on the
pair), ``votes``, ``item_id`` and the two answers' indices in the candidates file.
``per_rater=True`` writes one line per rater's preference instead (no pooling; ``rater`` field).

``rankings`` (for rank losses): one ``{"prompt", "completions": [best, ..., worst]}`` line per
ranked or rated item, the consensus order by mean rank (Borda) over its raters, with ``agreement``
(share of the raters' pair votes that agree with the consensus order), ``raters`` and ``order``
(the file indices in that order).
"""
from __future__ import annotations

from collections import defaultdict

from peftkern.labeling.db import LabelDB
from peftkern.labeling.items import preferences


def pair_votes(labels: list[dict]) -> dict:
    """``{(item_id, i, j): {"i": votes for i, "j": votes for j, "none": tie / both bad, "raters": [...]}}``."""
    votes: dict = defaultdict(lambda: {"i": 0, "j": 0, "none": 0, "raters": []})
    for lab in labels:
        if lab["kind"] == "flag":
            continue
        for (i, j), pref in preferences(lab["kind"], lab["value"]).items():
            v = votes[(lab["item_id"], i, j)]
            v["i" if pref > 0 else "j" if pref < 0 else "none"] += 1
            v["raters"].append(lab["rater"])
    return dict(votes)


def export_pairs(db: LabelDB, min_agreement: float = 0.0, per_rater: bool = False,
                 kinds: tuple[str, ...] = ("pairwise", "ranking", "rating")) -> list[dict]:
    """TRL preference rows (see the module docstring), in item order then answer order."""
    items = {it.id: it for it in db.items()}
    labels = [lab for lab in db.labels() if lab["kind"] in kinds]
    rows = []
    if per_rater:
        for lab in labels:
            item = items[lab["item_id"]]
            for (i, j), pref in preferences(lab["kind"], lab["value"]).items():
                if pref:
                    win, lose = (i, j) if pref > 0 else (j, i)
                    rows.append(_row(item, win, lose, 1.0, 1) | {"rater": lab["rater"], "kind": lab["kind"]})
        return sorted(rows, key=lambda r: (items[r["item_id"]].position, r["chosen_index"], r["rejected_index"]))
    for (item_id, i, j), v in sorted(pair_votes(labels).items(), key=lambda kv: (items[kv[0][0]].position, kv[0][1:])):
        if v["i"] == v["j"]:
            continue
        total = v["i"] + v["j"] + v["none"]
        agreement = max(v["i"], v["j"]) / total
        if agreement < min_agreement:
            continue
        win, lose = (i, j) if v["i"] > v["j"] else (j, i)
        rows.append(_row(items[item_id], win, lose, agreement, total))
    return rows


def _row(item, win: int, lose: int, agreement: float, votes: int) -> dict:
    return {"prompt": item.prompt, "chosen": item.completions[win], "rejected": item.completions[lose],
            "agreement": round(agreement, 6), "votes": votes, "item_id": item.id, "chosen_index": win,
            "rejected_index": lose}


def export_rankings(db: LabelDB, min_agreement: float = 0.0) -> list[dict]:
    """Consensus rankings of ranked or rated items (see the module docstring)."""
    items = {it.id: it for it in db.items()}
    by_item: dict = defaultdict(list)
    for lab in db.labels():
        if lab["kind"] in ("ranking", "rating"):
            by_item[lab["item_id"]].append(lab)
    rows = []
    for item_id in sorted(by_item, key=lambda i: items[i].position):
        item, labs = items[item_id], by_item[item_id]
        k = item.k
        mean_rank = [0.0] * k
        for lab in labs:
            ranks = lab["value"]["ranks"] if lab["kind"] == "ranking" else _ranks_of_ratings(lab["value"]["ratings"])
            for a in range(k):
                mean_rank[a] += ranks[a] / len(labs)
        order = sorted(range(k), key=lambda a: (mean_rank[a], a))
        place = {a: p for p, a in enumerate(order)}
        agree = total = 0
        for lab in labs:
            for (i, j), pref in preferences(lab["kind"], lab["value"]).items():
                total += 1
                agree += pref != 0 and (pref > 0) == (place[i] < place[j])
        agreement = agree / total if total else 0.0
        if agreement < min_agreement:
            continue
        rows.append({"prompt": item.prompt, "completions": [item.completions[a] for a in order], "order": order,
                     "mean_rank": [round(mean_rank[a], 6) for a in order], "agreement": round(agreement, 6),
                     "raters": len(labs), "item_id": item.id})
    return rows


def _ranks_of_ratings(ratings: list[int]) -> list[float]:
    """Ranks (1 = best) from ratings, equal ratings sharing the mean of their ranks."""
    out = [0.0] * len(ratings)
    for a, r in enumerate(ratings):
        higher = sum(x > r for x in ratings)
        same = sum(x == r for x in ratings)
        out[a] = higher + (same + 1) / 2
    return out
