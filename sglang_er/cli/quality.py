"""How well a profile predicts a sweep, and the bounds a fitted profile must meet to be written.

:func:`evaluate` gives per-mode MAPE of a profile's uncorrected predictions and toggle-sign
accuracy: does the profile put speculation on the right side of 1x where the sweep has T_T, T_D
and T_V, at an assumed per-position acceptance α. :func:`quality_failures` turns those numbers
into the reasons a fit is refused, each with what to measure; the bounds are the goals a profile
is for (:data:`MAX_MAPE`, :data:`MIN_TOGGLE_ACCURACY`), checked on rows the fit did not see
(:func:`holdout_configs`), so a fit that only memorises its sweep does not pass.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable

from sglang_er.cli.sweep import MODES, PHASE_OF, SweepRow

# A fitted profile is written only when it meets these (``--force`` writes it anyway, labelled).
MAX_MAPE = {"target_decode": 0.03, "drafter_decode": 0.05, "target_verify": 0.05}
MIN_TOGGLE_ACCURACY = 0.97
# A measured gain within 5% of 1x is too close to call (not counted by the bound): the γ chooser
# itself speculates only above a predicted 1.05x (SGLANG_ER_MIN_GAIN), and three medians with a
# couple of percent of noise each move a gain by that much.
TOGGLE_MARGIN = 0.05
MAX_OUTLIER_FRACTION = 0.1  # rows > 3 MADs off the fit: a few are glitches, more is a noisy machine
HOLDOUT_EVERY = 4  # one (batch, seq) configuration in 4 is held out of the validation fit
_MEASURE = {
    "target_decode": "re-measure T_T (target_decode) on an idle GPU, more iterations per config, at "
    "several batch sizes and contexts",
    "drafter_decode": "check that drafter_decode is ONE drafter step (a γ-step draft's time / γ) and "
    "re-measure it at several batch sizes and contexts",
    "target_verify": "re-measure T_V (target_verify) at several γ and batch sizes on an idle GPU",
}


# ---------------------------------------------------------------------- predictions
def cost_model(profile, config: dict, attention_backend: str | None = None):
    """The cost model of ``profile`` for the HF ``config``'s shapes."""
    from sglang_er.gamma import KV_READ_RULE, CostModel, ModelCost

    backend = attention_backend or profile.attention_backend
    return CostModel(
        profile,
        ModelCost.from_config(config),
        attention_backend=backend,
        kv_read_rule=KV_READ_RULE.get(backend, "per_request"),
    )


def predict_ms(cost, row: SweepRow) -> float:
    """The profile's uncorrected prediction for ``row`` (uniform lengths = row.context)."""
    from sglang_er.gamma import BatchStats

    st = BatchStats.uniform(row.batch, row.context)
    if row.mode == "target_decode":
        t = cost.t_plain(st, corrected=False)
    elif row.mode == "drafter_decode":
        t = cost.t_draft(st, row.gamma, corrected=False) / row.gamma
    else:
        t = cost.t_verify(st, row.gamma, corrected=False)
    return t * 1e3


def rows_to_samples(cost, rows: Iterable[SweepRow]) -> list:
    """Calibration samples (the cost model's byte/flop accounting) from sweep medians."""
    from sglang_er.gamma import BatchStats

    out = []
    for r in rows:
        st = BatchStats.uniform(r.batch, r.context)
        secs = r.median_ms / 1e3 * (r.gamma if r.mode == "drafter_decode" else 1)
        out.append(cost.calibration_sample(PHASE_OF[r.mode], st, r.gamma if r.mode != "target_decode" else 0, secs))
    return out


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[L|γ] for a constant per-position acceptance α: (1 − α^(γ+1)) / (1 − α)."""
    from sglang_er.gamma import expected_lengths

    return expected_lengths([alpha] * gamma)[gamma]


# ---------------------------------------------------------------------- errors
def evaluate(cost, rows: list[SweepRow], alpha: float) -> dict:
    """Per-component MAPE and toggle-sign accuracy of ``cost`` (uncorrected) against ``rows``."""
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    preds = []
    for r in rows:
        pred = predict_ms(cost, r)
        per_mode[r.mode].append(abs(pred - r.median_ms) / r.median_ms)
        preds.append(
            {"batch": r.batch, "seq": r.seq, "gamma": r.gamma, "mode": r.mode, "measured_ms": r.median_ms}
            | {"predicted_ms": pred}
        )
    return {
        "mape": {m: (sum(v) / len(v) if v else None) for m, v in per_mode.items()},
        "rows": {m: len(v) for m, v in per_mode.items()},
        "toggle": _toggle(rows, preds, alpha),
        "predictions": preds,
    }


def _toggle(rows: list[SweepRow], preds: list[dict], alpha: float) -> dict:
    """gain = E[L|γ]·T_T / (γ·T_D + T_V), measured vs predicted, where all three were measured."""
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r, p in zip(rows, preds):
        groups[(r.batch, r.seq, r.gamma, r.mode)].append((r.median_ms, p["predicted_ms"]))

    def med(key):
        v = groups.get(key)
        return (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) if v else None

    cases = []
    for b, s, g, mode in sorted(groups):
        if mode != "target_verify":
            continue
        tt = med((b, s, g, "target_decode")) or med((b, s, 0, "target_decode"))
        td, tv = med((b, s, g, "drafter_decode")), med((b, s, g, "target_verify"))
        if tt is None or td is None:
            continue
        e = expected_tokens(alpha, g)
        gm, gp = (e * tt[i] / (g * td[i] + tv[i]) for i in (0, 1))
        cases.append(
            {"batch": b, "seq": s, "gamma": g, "measured_gain": gm, "predicted_gain": gp}
            | {"match": _sign(gm - 1.0) == _sign(gp - 1.0)}
        )
    ok = sum(c["match"] for c in cases)
    clear = [c for c in cases if abs(c["measured_gain"] - 1.0) > TOGGLE_MARGIN]
    clear_ok = sum(c["match"] for c in clear)
    return {
        "alpha": alpha,
        "cases": len(cases),
        "correct": ok,
        "accuracy": ok / len(cases) if cases else None,
        "clear_cases": len(clear),
        "clear_accuracy": clear_ok / len(clear) if clear else None,
        "detail": cases,
    }


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def outlier_rows(ev: dict, mad_k: float = 3.0, min_rel: float = 0.02) -> list[bool]:
    """Rows whose relative error is more than ``mad_k`` scaled MADs (and ``min_rel``) off the median."""
    res = [(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"] for p in ev["predictions"]]
    if not res:
        return []
    med = statistics.median(res)
    lim = max(mad_k * 1.4826 * statistics.median(abs(r - med) for r in res), min_rel)
    return [abs(r - med) > lim for r in res]


def mape_without(ev: dict, drop: list[bool]) -> dict[str, float | None]:
    """Per-mode MAPE over the rows not in ``drop`` (the outliers)."""
    errs: dict[str, list[float]] = {m: [] for m in MODES}
    for p, d in zip(ev["predictions"], drop):
        if not d:
            errs[p["mode"]].append(abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"])
    return {m: (sum(v) / len(v) if v else None) for m, v in errs.items()}


# ---------------------------------------------------------------------- the bounds
def holdout_configs(configs: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (batch, seq) configurations the validation fit does not see: every
    :data:`HOLDOUT_EVERY`-th in sorted order among those of an interior batch size (neither the
    smallest nor the largest: the check is of interpolation, the validation fit still spans the
    sweep). Empty when fewer than :data:`HOLDOUT_EVERY` qualify: no split."""
    cs = sorted(set(configs))
    batches = sorted({b for b, _ in cs})
    inner = [c for c in cs if batches[0] < c[0] < batches[-1]]
    if len(inner) < HOLDOUT_EVERY:
        return set()
    return {c for i, c in enumerate(inner) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2}


def quality_failures(ev: dict, holdout_mape: dict | None) -> list[str]:
    """Why a fit may not be written (empty: it meets the bounds). ``ev``: the profile against the
    whole sweep; ``holdout_mape``: per-mode MAPE of the validation fit on the held-out rows (None:
    the sweep was too small to split; the bounds then apply to ``ev``'s own rows)."""
    out = []
    drop = outlier_rows(ev)
    if drop and sum(drop) > MAX_OUTLIER_FRACTION * len(drop):
        out.append(
            f"{sum(drop)} of {len(drop)} rows are more than 3 MADs off the fit (> {MAX_OUTLIER_FRACTION:.0%}): "
            "the timings are noisy; re-measure on an idle machine"
        )
    mape, where = (holdout_mape, "held-out") if holdout_mape is not None else (mape_without(ev, drop), "in-sample")
    for m in MODES:
        v = mape.get(m)
        if v is not None and v > MAX_MAPE[m]:
            out.append(f"{where} {m} MAPE {100 * v:.1f}% > {100 * MAX_MAPE[m]:.0f}%: {_MEASURE[m]}")
    t = ev["toggle"]
    if t["clear_accuracy"] is not None and t["clear_accuracy"] < MIN_TOGGLE_ACCURACY:
        out.append(
            f"toggle-sign accuracy {t['clear_accuracy']:.2f} < {MIN_TOGGLE_ACCURACY} at α = {t['alpha']:g} "
            f"({t['clear_cases']} cases with a measured gain beyond 1 ± {TOGGLE_MARGIN}): the profile would "
            "speculate on the wrong side; measure all three modes at the same (batch, seq, γ)"
        )
    return out


def format_report(ev: dict, title: str) -> str:
    lines = [title, f"  {'component':<16}{'rows':>6}{'MAPE':>9}"]
    for m in MODES:
        v = ev["mape"][m]
        lines.append(f"  {m:<16}{ev['rows'][m]:>6}{'—' if v is None else f'{100 * v:8.1f}%':>9}")
    t = ev["toggle"]
    if t["cases"]:
        lines.append(f"  toggle-sign accuracy (α = {t['alpha']:g}): {t['correct']}/{t['cases']} = {t['accuracy']:.2f}")
        for c in [c for c in t["detail"] if not c["match"]][:8]:
            lines.append(
                f"    wrong side: B={c['batch']} S={c['seq']} γ={c['gamma']}: measured gain "
                f"{c['measured_gain']:.3f}×, predicted {c['predicted_gain']:.3f}×"
            )
    else:
        lines.append("  toggle-sign accuracy: no (batch, seq, γ) has all three modes")
    return "\n".join(lines)
