"""The fitting driver of ``sglang-er calibrate``: fit, validate on held-out rows, judge.

:func:`fit_and_validate` fits the profile on the whole sweep
(:func:`sglang_er.gamma.robust_fit.fit_bounded`), fits it again without every
:data:`~sglang_er.cli.quality.HOLDOUT_EVERY`-th (batch, seq) configuration and measures that
fit's error on the configurations it did not see, and lists the quality bounds the result misses
(:func:`sglang_er.cli.quality.quality_failures`). Writing or refusing is the command's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sglang_er.cli.quality import evaluate, holdout_configs, mape_without, outlier_rows, quality_failures
from sglang_er.cli.sweep import PHASE_OF, SweepRow


@dataclass
class FitOutcome:
    """What the command reports: the profile, the full-sweep evaluation, the held-out check and
    the bounds missed (empty: the profile may be written)."""

    profile: object
    dropped: int
    held: dict[str, str]
    ev: dict
    holdout: dict = field(default_factory=dict)  # configs, rows, mape (or note when not run)
    failures: list[str] = field(default_factory=list)


def fit_robust(samples: list, *, base, mad_k: float = 3.0, min_rel: float = 0.02, **kw):
    """:func:`~sglang_er.gamma.robust_fit.fit_bounded` as (profile, dropped count, note): the note
    says which parameters were held, and why."""
    from sglang_er.gamma.robust_fit import fit_bounded

    r = fit_bounded(samples, base=base, mad_k=mad_k, min_rel=min_rel, **kw)
    return r.profile, r.dropped, "; ".join(f"{k} {v}" for k, v in r.held.items())


def fit_and_validate(
    samples: list,
    keys: list[tuple[int, int]],
    rows: list[SweepRow],
    cost_of: Callable,
    *,
    base,
    alpha: float,
    **kw,
) -> FitOutcome:
    """Fit ``samples`` (``keys``: the (batch, seq) configuration of each), evaluate against the
    sweep medians ``rows`` with ``cost_of(profile)``, validate on held-out configurations."""
    from sglang_er.gamma.robust_fit import fit_bounded

    full = fit_bounded(samples, base=base, **kw)
    ev = evaluate(cost_of(full.profile), rows, alpha)
    holdout = _holdout(samples, keys, rows, cost_of, outlier_rows(ev), base=base, alpha=alpha, **kw)
    mape = holdout.get("mape")
    known = {k: v for k, v in (mape or {}).items() if v is not None}
    profile = full.profile.model_copy(update={"fit_holdout_mape": known or None})
    failures = list(holdout.get("failures", [])) + quality_failures(ev, mape)
    return FitOutcome(profile, full.dropped, full.held, ev, holdout, failures)


def _holdout(samples, keys, rows, cost_of, drop: list[bool], *, base, alpha: float, **kw) -> dict:
    """Fit without the held-out configurations; per-mode MAPE on their rows (outliers of the full
    fit excluded). ``{"note": ...}`` when the sweep is too small to split."""
    from sglang_er.gamma.robust_fit import fit_bounded

    held = holdout_configs([*keys, *(r.config for r in rows)])
    train = [s for s, k in zip(samples, keys) if k not in held]
    test = [(r, d) for r, d in zip(rows, drop) if r.config in held]
    phases = {s.phase for s in samples}
    if not held or not test or {s.phase for s in train} != phases or len({s.batch for s in train}) < 2:
        return {
            "note": f"{len(set(keys))} (batch, seq) configurations are too few to hold some out; "
            "the bounds apply to the fit's own rows"
        }
    try:
        fit = fit_bounded(train, base=base, **kw)
    except ValueError as e:
        return {"failures": [f"the validation fit (without {len(held)} configurations) failed: {e}"], "mape": {}}
    test_rows = [r for r, _ in test]
    ev = evaluate(cost_of(fit.profile), test_rows, alpha)
    mape = mape_without(ev, [d for _, d in test])
    missing = [m for m, n in ev["rows"].items() if n == 0 and any(PHASE_OF[m] == p for p in phases)]
    return {
        "configs": sorted(held),
        "rows": len(test_rows),
        "mape": mape,
        "note": f"modes without held-out rows: {', '.join(missing)}" if missing else "",
    }
