"""The risk report shared by synthetic generation and augmentation: how many candidates were dropped
and why, how often they duplicated what exists, how far the kept ones move from their reference set
(diversity against the seeds or the originals), and what share of the outputs failed validation."""
from __future__ import annotations

from collections import Counter

from peftkern.data.diversity import diversity_summary, verb_object
from peftkern.data.inspection import histogram, stats
from peftkern.data.rouge import RougePool


def risk_report(kept: list[str], reference: list[str], candidates: int, rejected: Counter, duplicates: int,
                validation_failures: Counter, validated: int) -> dict:
    """``kept``: the new instructions; ``reference``: what they came from (seeds / originals);
    ``candidates``: how many were produced before filtering; ``rejected``: reason -> count;
    ``duplicates``: candidates that were exact or near (ROUGE-L >= threshold) copies of the pool;
    ``validation_failures``: reason -> count over ``validated`` outputs checked."""
    pool = RougePool(reference)
    nearest = [pool.nearest(t).score for t in kept]
    ref_pairs = {p for p in map(verb_object, reference) if p is not None}
    new_pairs = [p for p in map(verb_object, kept) if p is not None]
    failed = sum(validation_failures.values())
    share = (lambda k: k / candidates) if candidates else (lambda k: 0.0)
    return {
        "candidates": candidates,
        "kept": len(kept),
        "rejected": {reason: {"count": c, "share": share(c)} for reason, c in rejected.most_common()},
        "duplicate_rate": share(duplicates),
        "diversity": {
            "kept": diversity_summary(kept),
            "reference": diversity_summary(reference),
            "rouge_l_to_reference": {**stats(nearest), "histogram": histogram(nearest, bins=10)},
            "verb_object_pairs_not_in_reference": (sum(p not in ref_pairs for p in new_pairs) / len(new_pairs)
                                                   if new_pairs else 0.0),
        },
        "validation": {"checked": validated, "failed": failed, "failed_share": failed / validated if validated else 0.0,
                       "by_reason": dict(validation_failures.most_common())},
    }


def format_risks(report: dict, title: str) -> str:
    d = report["diversity"]
    r = d["rouge_l_to_reference"]
    lines = [f"{title}: {report['kept']} kept of {report['candidates']} candidates",
             f"  duplicate rate              {report['duplicate_rate']:.1%} (exact or ROUGE-L near copies of the pool)"]
    for reason, v in report["rejected"].items():
        lines.append(f"  rejected: {reason:<18} {v['count']} ({v['share']:.1%})")
    lines.append(f"  distinct-2 kept / reference {d['kept']['distinct_2']:.3f} / {d['reference']['distinct_2']:.3f}")
    if r.get("count"):
        lines.append(f"  ROUGE-L to nearest reference mean {r['mean']:.3f}, p50 {r['p50']:.3f}, max {r['max']:.3f}")
    lines.append(f"  verb-object pairs new       {d['verb_object_pairs_not_in_reference']:.1%} not in the reference")
    v = report["validation"]
    lines.append(f"  outputs failing validation  {v['failed']} of {v['checked']} ({v['failed_share']:.1%})"
                 + ("  " + ", ".join(f"{k} {c}" for k, c in v["by_reason"].items()) if v["by_reason"] else ""))
    return "\n".join(lines)
