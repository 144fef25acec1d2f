"""Scores and statistics over sample records: latency percentiles, speculative acceptance, and
mean@n / pass@k / maj@k."""

from __future__ import annotations

import math

from sglang_er.evaluation import grading
from sglang_er.evaluation.records import AcceptanceStats, LatencyStats, SampleRecord


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_stats(xs: list[float]) -> LatencyStats:
    if not xs:
        return LatencyStats()
    return LatencyStats(
        count=len(xs),
        mean=sum(xs) / len(xs),
        p50=percentile(xs, 50),
        p90=percentile(xs, 90),
        p99=percentile(xs, 99),
        max=max(xs),
    )


def acceptance_stats(records: list[SampleRecord]) -> AcceptanceStats | None:
    with_spec = [r for r in records if r.spec and r.spec.get("spec_verify_ct")]
    if not with_spec:
        return None
    verify = sum(int(r.spec["spec_verify_ct"]) for r in with_spec)
    correct = sum(int(r.spec.get("spec_num_correct_drafts") or 0) for r in with_spec)
    proposed = sum(int(r.spec.get("spec_num_proposed_drafts") or 0) for r in with_spec)
    toks = sum(int(r.completion_tokens or 0) for r in with_spec)
    per = [float(r.spec["spec_accept_length"]) for r in with_spec if r.spec.get("spec_accept_length") is not None]
    hist: list[int] = []
    for r in with_spec:
        h = r.spec.get("spec_correct_drafts_histogram") or []
        if len(h) > len(hist):
            hist += [0] * (len(h) - len(hist))
        for i, v in enumerate(h):
            hist[i] += int(v)
    return AcceptanceStats(
        samples=len(with_spec),
        verify_ct=verify,
        num_correct_drafts=correct,
        num_proposed_drafts=proposed,
        accept_rate=correct / proposed if proposed else None,
        accept_length=toks / verify if verify else None,
        mean_sample_accept_length=sum(per) / len(per) if per else None,
        correct_drafts_histogram=hist,
    )


def score(records: list[SampleRecord], ks: list[int], seed: int = 0) -> tuple[float, dict, dict]:
    """mean@n, pass@k and maj@k over problems; samples that errored count as wrong."""
    by_problem: dict[int, list[SampleRecord]] = {}
    for r in records:
        by_problem.setdefault(r.problem_idx, []).append(r)
    if not by_problem:
        return 0.0, {}, {}
    acc = sum(r.correct for r in records) / len(records)
    pass_k = {f"pass@{k}": 0.0 for k in ks}
    maj_k = {f"maj@{k}": 0.0 for k in ks}
    for pidx, rs in by_problem.items():
        rs = sorted(rs, key=lambda r: r.sample_idx)
        c = sum(r.correct for r in rs)
        clusters = grading.answer_clusters([r.extracted for r in rs])
        correct = [r.correct for r in rs]
        for k in ks:
            kk = min(k, len(rs))
            pass_k[f"pass@{k}"] += grading.pass_at_k(len(rs), c, kk)
            maj_k[f"maj@{k}"] += grading.maj_at_k(clusters, correct, kk, seed=seed + pidx)
    m = len(by_problem)
    return acc, {k: v / m for k, v in pass_k.items()}, {k: v / m for k, v in maj_k.items()}
