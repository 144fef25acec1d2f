"""Reports a person would rather look at than read: markdown tables with ratios, PNG plots.

:func:`write_rollout_report` takes the rollouts of :mod:`eval.rollout_bench` (plain first) and
writes ``report.md`` plus ``throughput.png`` (makespan and tokens/s side by side with ratios),
``timeline.png`` (active requests and γ over time, per config), ``latency_cdf.png`` and
``acceptance.png`` (acceptance by draft position).
"""

from __future__ import annotations

import random
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    return plt


def active_over_time(requests: list[dict], t0: float, points: int = 400) -> tuple[list[float], list[int]]:
    """Number of requests in flight at evenly spaced times since ``t0``."""
    end = max(r["t_done"] for r in requests) - t0
    ts = [end * i / (points - 1) for i in range(points)]
    return ts, [sum(1 for r in requests if r["t_send"] - t0 <= t < r["t_done"] - t0) for t in ts]


def tail_share(requests: list[dict], frac: float = 0.25) -> float:
    """Share of the makespan after the requests in flight first drop to ``frac`` of the rollout's:
    the long tail, where a few requests keep the machine busy and speculation can pay."""
    t0, done = min(r["t_send"] for r in requests), sorted(r["t_done"] for r in requests)
    start = done[len(done) - max(1, int(frac * len(done))) - 1] if len(done) > 1 else t0
    return (done[-1] - start) / (done[-1] - t0) if done[-1] > t0 else 0.0


# requests in flight, grouped as the γ choice sees batch sizes (octaves)
BATCH_BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, None))


def time_by_batch(requests: list[dict]) -> dict[tuple[int, int | None], float]:
    """Seconds of the rollout spent with a number of requests in flight in each bucket of
    :data:`BATCH_BUCKETS`: where the makespan goes, head (many requests) or tail (a few)."""
    events = sorted([(r["t_send"], 1) for r in requests] + [(r["t_done"], -1) for r in requests])
    out = dict.fromkeys(BATCH_BUCKETS, 0.0)
    active, prev = 0, events[0][0] if events else 0.0
    for t, step in events:
        if active:
            bucket = next(b for b in BATCH_BUCKETS if active >= b[0] and (b[1] is None or active <= b[1]))
            out[bucket] += t - prev
        active, prev = active + step, t
    return out


def _bucket_name(b: tuple[int, int | None]) -> str:
    return f"{b[0]}" if b[1] == b[0] else f"{b[0]}+" if b[1] is None else f"{b[0]}-{b[1]}"


def length_summary(requests: list[dict]) -> str:
    toks = sorted(r["tokens"] for r in requests)
    pick = lambda q: toks[min(len(toks) - 1, int(q * len(toks)))]  # noqa: E731
    return f"output tokens median {pick(0.5)}, p90 {pick(0.9)}, longest {toks[-1]}"


def speedup_interval(
    base: list[float], other: list[float], level: float = 0.9, draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of ``sum(base) / sum(other)`` (a makespan speed-up over rollouts).

    Each config's rollouts are resampled with replacement on their own: one rollout's makespan
    follows its longest sample, whose length is random at temperature 1, so a single pair of
    rollouts can differ by 30% with no difference in speed (measured: plain epochs 6.1-8.4 s).
    """
    rng = random.Random(seed)
    ratios = sorted(sum(rng.choices(base, k=len(base))) / sum(rng.choices(other, k=len(other))) for _ in range(draws))
    tail = (1 - level) / 2
    return ratios[int(tail * (draws - 1))], ratios[int((1 - tail) * (draws - 1))]


def mean_at_n(requests: list[dict], z: float = 1.96) -> tuple[float, float, int] | None:
    """(accuracy over every graded sample, half-width of its 95% interval, questions).

    The samples of one question are not independent (they share its difficulty), so the interval
    is over question means: mean ± z·sd(question means)/√Q. None when nothing was graded."""
    by_q: dict = {}
    for q in requests:
        if "correct" in q:
            by_q.setdefault(q.get("question"), []).append(1.0 if q["correct"] else 0.0)
    if not by_q:
        return None
    means = [sum(v) / len(v) for v in by_q.values()]
    allv = [x for v in by_q.values() for x in v]
    mean = sum(allv) / len(allv)
    if len(means) < 2:
        return mean, float("nan"), len(means)
    mu = sum(means) / len(means)
    sd = (sum((m - mu) ** 2 for m in means) / (len(means) - 1)) ** 0.5
    return mean, z * sd / len(means) ** 0.5, len(means)


def _first_steps(rollouts):
    """One rollout per config (step 0), in run order."""
    seen, out = set(), []
    for r in rollouts:
        if r.config not in seen:
            seen.add(r.config)
            out.append(r)
    return out


def config_totals(rollouts) -> dict[str, dict]:
    """Per config (run order): makespan and tokens summed over its rollouts, drafted/accepted
    tokens, iterations (speculating ones too) from the worker's timeline."""
    out: dict[str, dict] = {}
    for r in rollouts:
        t = out.setdefault(
            r.config,
            {"makespan_s": 0.0, "tokens": 0, "drafted": 0, "accepted": 0, "iterations": 0, "spec_iterations": 0},
        )
        t["makespan_s"] += r.makespan_s
        t["tokens"] += r.output_tokens
        t["drafted"] += r.extra.get("drafted", 0)
        t["accepted"] += r.extra.get("accepted", 0)
        t["iterations"] += len(r.timeline)
        t["spec_iterations"] += sum(1 for x in r.timeline if x["gamma"] > 0)
    for t in out.values():
        t["tokens_per_s"] = t["tokens"] / t["makespan_s"] if t["makespan_s"] else 0.0
    return out


def write_rollout_report(rollouts, out: Path, workload: str, meta: dict | None = None) -> str:
    out = Path(out)
    plt = _plt()
    firsts = _first_steps(rollouts)
    base = firsts[0]
    labels = [r.config for r in firsts]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "makespan_s", "makespan (s, lower is better)"),
        (axes[1], "tokens_per_s", "output tokens/s (higher is better)"),
    ):
        vals = [getattr(r, key) for r in firsts]
        bars = ax.bar(labels, vals, color=["#888888"] + ["#1f77b4"] * (len(vals) - 1))
        for b, v in zip(bars, vals):
            ax.annotate(f"{v / getattr(base, key):.2f}x", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title(title)
    fig.suptitle(workload, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(firsts), 1, figsize=(10, 2.6 * len(firsts)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], firsts):
        t0 = min(q["t_send"] for q in r.requests)
        ts, active = active_over_time(r.requests, t0)
        ax.plot(ts, active, color="#444444", label="active requests")
        ax.set_ylabel("active")
        ax.set_title(f"{r.config}: makespan {r.makespan_s:.1f}s", fontsize=9)
        if r.timeline:
            ax2 = ax.twinx()
            ax2.step(
                [x["time"] - t0 for x in r.timeline],
                [x["gamma"] for x in r.timeline],
                where="post",
                color="#d62728",
                alpha=0.7,
                label="γ",
            )
            ax2.set_ylabel("γ", color="#d62728")
    axes[-1, 0].set_xlabel("seconds since the rollout started")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in firsts:
        lat = sorted(q["t_done"] - q["t_send"] for q in r.requests)
        ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=r.config)
    ax.set_xlabel("request latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)

    # per config, its last rollout that speculated at all (cumulative counters of its server)
    with_acc = list({r.config: r for r in rollouts if r.position_acceptance}.values())
    if with_acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in with_acc:
            pa = [a for a in r.position_acceptance if a is not None]
            ax.plot(range(1, len(pa) + 1), pa, marker="o", label=r.config)
        ax.set_xlabel("draft position k")
        ax.set_ylabel("P(draft k accepted)")
        ax.set_ylim(0, 1)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "acceptance.png", dpi=110)
        plt.close(fig)

    totals = config_totals(rollouts)
    b = totals[base.config]
    many = len(rollouts) > len(firsts)
    spans = {}
    for r in rollouts:
        spans.setdefault(r.config, []).append(r.makespan_s)
    ci = min(len(v) for v in spans.values()) >= 3  # an interval from fewer rollouts says little
    from eval.provenance import header

    lines = [
        f"# Rollout benchmark\n\n{header(meta)}\n" if meta else "# Rollout benchmark\n",
        f"Workload: {workload}. Same prompts and seeds."
        + (" Figures are totals over every rollout of a config (table below)." if many else "")
        + "\n",
        f"Plain's first rollout: {length_summary(base.requests)}; the last quarter of its requests (the "
        f"tail) took {tail_share(base.requests):.0%} of its makespan.\n",
        "| config | makespan s | vs plain | tokens | tokens/s | vs plain | acceptance | iterations speculating |"
        + (" makespan speed-up, 90% bootstrap interval over rollouts |" if ci else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if ci else ""),
    ]
    for label, t in totals.items():
        acc = f"{t['accepted'] / t['drafted']:.3f}" if t["drafted"] else "-"
        share = f"{t['spec_iterations'] / t['iterations']:.0%}" if t["iterations"] else "-"
        interval = ""
        if ci:
            lo, hi = speedup_interval(spans[base.config], spans[label])
            interval = f" {lo:.2f}x-{hi:.2f}x |"
        lines.append(
            f"| {label} | {t['makespan_s']:.1f} | {b['makespan_s'] / t['makespan_s']:.2f}x faster | "
            f"{t['tokens']} | {t['tokens_per_s']:.1f} | {t['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
            f"{acc} | {share} |{interval}"
        )
    if many:
        lines += [
            "\n## Every rollout (steps: perturbed weights pushed with update_weights_from_tensor; "
            "epochs: the same prompts again)\n",
            "| config | step | epoch | re-quantization s | acceptance | makespan s | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rollouts:
            rq = f"{r.requantize_s:.2f}" if r.requantize_s else "-"
            acc = f"{r.accept_rate:.3f}" if r.accept_rate is not None else "-"
            lines.append(
                f"| {r.config} | {r.step} | {r.epoch} | {rq} | {acc} | {r.makespan_s:.1f} | {r.tokens_per_s:.1f} |"
            )
    by_batch = {c: dict.fromkeys(BATCH_BUCKETS, 0.0) for c in totals}
    for r in rollouts:
        for bucket, sec in time_by_batch(r.requests).items():
            by_batch[r.config][bucket] += sec
    lines += [
        "\n## Where the makespan goes: seconds with this many requests in flight (all rollouts)\n",
        "| config | " + " | ".join(_bucket_name(b) for b in BATCH_BUCKETS) + " |",
        "|---|" + "---|" * len(BATCH_BUCKETS),
    ]
    for c, secs in by_batch.items():
        cells = []
        for bucket, sec in secs.items():
            base_s = by_batch[base.config][bucket]
            ratio = f" ({base_s / sec:.2f}x)" if c != base.config and sec > 0 and base_s > 0 else ""
            cells.append(f"{sec:.1f}{ratio}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append(
        "\nRatios are plain's seconds in a bucket over the config's: how much faster it got through that "
        "part of the rollout (its own draw of lengths, so a bucket can hold different amounts of work)."
    )
    sourced = [r for r in rollouts if r.extra.get("by_source")]
    if sourced:
        lines += [
            "\n## Drafts by source (history drafts: group, prompt, self)\n",
            "| config | step | source | drafted | accepted | acceptance |",
            "|---|---|---|---|---|---|",
        ]
        for r in sourced:
            for src, c in sorted(r.extra["by_source"].items()):
                if c["drafted"]:
                    lines.append(
                        f"| {r.config} | {r.step}.{r.epoch} | {src} | {c['drafted']} | {c['accepted']} | "
                        f"{c['accepted'] / c['drafted']:.3f} |"
                    )
        for r in sourced:
            if r.extra.get("history_index"):
                h = r.extra["history_index"]
                lines.append(
                    f"\n{r.config} step {r.step} epoch {r.epoch}: history index {h['groups']} prompts, "
                    f"{h['indexed_tokens']} tokens, hit rate {h['hits'] / max(1, h['lookups']):.2f}"
                )
    graded = {c: mean_at_n([q for r in rollouts if r.config == c for q in r.requests]) for c in totals}
    if any(graded.values()):
        lines += [
            "\n## Accuracy (mean@n over every sample; 95% interval over question means)\n",
            "| config | accuracy | 95% interval | questions | samples |",
            "|---|---|---|---|---|",
        ]
        for c, g in graded.items():
            if g:
                k = sum(1 for r in rollouts if r.config == c for q in r.requests if "correct" in q)
                lines.append(f"| {c} | {g[0]:.3f} | ± {g[1]:.3f} | {g[2]} | {k} |")
    beyond = {c: sum(q.get("past_eos") or 0 for r in rollouts if r.config == c for q in r.requests) for c in totals}
    if any(r.extra.get("lengths") == "replayed" for r in rollouts):
        lines += [
            "\n## Tokens past each config's own EOS (replayed lengths)\n",
            "| config | tokens past EOS | of tokens |",
            "|---|---|---|",
        ]
        lines += [f"| {c} | {beyond[c]} | {totals[c]['tokens']} |" for c in totals]
    lines.append(
        "\nPlots: throughput.png, timeline.png (active requests and γ), latency_cdf.png"
        + (", acceptance.png" if with_acc else "")
        + "."
    )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
