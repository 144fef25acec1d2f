"""Sweep CSVs as users have them: medians of T_T, T_D and T_V per (batch, seq, γ).

Columns ``batch,seq,gamma,mode,median_ms`` are needed; ``ctx`` (the mean committed length during
the measurement) and ``n`` are read when present; every other column (``model``, ``mean_ms``,
percentiles, ...) is ignored. Modes: ``target_decode`` (one plain forward; gamma 0 or the γ it was
measured next to), ``drafter_decode`` (ONE drafter step of a γ-step draft), ``target_verify`` (the
verify forward over γ+1 tokens).

Rows the fit cannot use are skipped and counted by reason, not refused: warm-up rows (batch or seq
0), modes it does not model, rows without a timing, γ outside 1..16 for a speculative mode, another
model's rows. A value that is not a number is refused (the file is corrupt, not merely wider), and
so is a file with no usable row left. Stdlib only: the ``sglang-er`` parser imports it.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sglang_er.limits import MAX_GAMMA as _MAX_GAMMA

MODES = ("target_decode", "drafter_decode", "target_verify")
PHASE_OF = {"target_decode": "plain", "drafter_decode": "draft", "target_verify": "verify"}
REQUIRED_COLUMNS = ("batch", "seq", "gamma", "mode", "median_ms")
CSV_COLUMNS = (*REQUIRED_COLUMNS, "n", "ctx")
FIX_CSV = (
    f"a sweep CSV needs the header {','.join(REQUIRED_COLUMNS)} (mode one of {', '.join(MODES)}; "
    "median_ms > 0; batch, seq >= 1; gamma >= 1 except for target_decode)"
)


@dataclass(frozen=True)
class SweepRow:
    """One median: ``mode`` at batch ``batch``, prompt length ``seq``, draft length ``gamma``.
    drafter_decode is per drafter step. ``ctx``: mean committed length (None: use seq)."""

    batch: int
    seq: int
    gamma: int
    mode: str
    median_ms: float
    n: int | None = None
    ctx: float | None = None

    @property
    def context(self) -> int:
        return max(0, round(self.ctx)) if self.ctx is not None else self.seq

    @property
    def config(self) -> tuple[int, int]:
        """The (batch, seq) configuration: one server run measures all modes of it together."""
        return self.batch, self.seq


@dataclass
class Sweep:
    """The usable rows of a sweep CSV, and the rows skipped (reason -> count; first line of each)."""

    rows: list[SweepRow]
    skipped: Counter = field(default_factory=Counter)
    first_line: dict[str, int] = field(default_factory=dict)

    def skipped_text(self) -> str:
        """``skipped N rows: 3 warm-up (batch or seq 0) (first at line 2), ...`` or ''."""
        n = sum(self.skipped.values())
        if not n:
            return ""
        parts = [f"{c} {why} (first at line {self.first_line[why]})" for why, c in self.skipped.most_common()]
        return f"skipped {n} row{'s' if n != 1 else ''}: " + "; ".join(parts)


def load_sweep(path, *, model: str | None = None) -> Sweep:
    """Read a sweep CSV (data only), skipping the rows the fit cannot use. ``model``: keep only the
    rows whose ``model`` column equals it. Raises ValueError naming the file, the line and the fix."""
    p = Path(path)
    reader = csv.DictReader(_read_text(p).splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"sweep CSV {p}: missing column(s) {', '.join(missing)} "
            f"(header: {','.join(header) or '<empty>'}); {FIX_CSV}"
        )
    records = list(reader)
    _check_one_model(p, records, header, model)
    sweep, data_lines = Sweep([]), 0
    for line, rec in enumerate(records, start=2):  # line 1 is the header
        if not any(isinstance(v, str) and v.strip() for k, v in rec.items() if k is not None):
            continue  # blank line
        data_lines += 1
        row, why = _parse_row(rec, model, f"sweep CSV {p} line {line}")
        if row is None:
            sweep.skipped[why] += 1
            sweep.first_line.setdefault(why, line)
        else:
            sweep.rows.append(row)
    if not sweep.rows:
        if not data_lines:
            raise ValueError(f"sweep CSV {p}: no data rows; {FIX_CSV}")
        first = min(sweep.first_line, key=sweep.first_line.get)
        raise ValueError(
            f"sweep CSV {p}: no usable rows ({sweep.skipped_text()}; "
            f"line {sweep.first_line[first]}: {first}); {FIX_CSV}"
        )
    return sweep


def read_sweep_csv(path) -> list[SweepRow]:
    """The usable rows of a sweep CSV (:func:`load_sweep` without the skip counts)."""
    return load_sweep(path).rows


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(
            f"sweep CSV {p}: cannot read ({e.strerror or e}); pass an existing file "
            "(written by `sglang-er calibrate --sweep-csv`)"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"sweep CSV {p}: not UTF-8 text; {FIX_CSV}") from None


def _check_one_model(p: Path, records: list[dict], header: list[str], model: str | None) -> None:
    """A file that holds several models' sweeps needs --sweep-model: fitting them together is wrong."""
    names = sorted({(r.get("model") or "").strip() for r in records} - {""}) if "model" in header else []
    if model is None and len(names) > 1:
        raise ValueError(
            f"sweep CSV {p} holds sweeps of {len(names)} models ({', '.join(names)}); pick one with --sweep-model"
        )
    if model is not None and model not in names:
        known = ", ".join(names) or "none"
        raise ValueError(f"sweep CSV {p}: no rows of model {model!r} (models in the file: {known})")


def _parse_row(rec: dict, model: str | None, where: str) -> tuple[SweepRow | None, str]:
    """(row, '') or (None, why it is skipped). Raises ValueError for a value that is not a number."""
    vals = {k: (rec.get(k) or "").strip() for k in (*CSV_COLUMNS, "model")}
    if model is not None and vals["model"] != model:
        return None, "of another model"
    mode = vals["mode"]
    if mode not in MODES:
        return None, f"unknown mode {mode!r}; use one of {', '.join(MODES)}"
    try:
        batch, seq, gamma = (_as_int(vals[k], k) for k in ("batch", "seq", "gamma"))
        ms = _as_float(vals["median_ms"], "median_ms") if vals["median_ms"] else math.nan
        n = _as_int(vals["n"], "n") if vals["n"] else None
        ctx = _as_float(vals["ctx"], "ctx", finite=True) if vals["ctx"] else None
    except ValueError as e:
        raise ValueError(f"{where}: {e}; {FIX_CSV}") from None
    if batch < 1 or seq < 1:
        return None, "warm-up (batch or seq 0)"
    if not (math.isfinite(ms) and ms > 0):  # empty, NaN (a failed config), inf or <= 0
        return None, "without a timing (median_ms empty, NaN or <= 0)"
    if mode != "target_decode" and not 1 <= gamma <= _MAX_GAMMA:
        return None, f"{mode} needs gamma in 1..{_MAX_GAMMA}"
    if gamma < 0 or (ctx is not None and ctx < 0):
        return None, "with a negative gamma or ctx"
    return SweepRow(batch, seq, gamma, mode, ms, n, ctx), ""


def _as_int(s: str, name: str) -> int:
    f = _as_float(s, name, finite=True)
    if f != int(f):
        raise ValueError(f"{name} {s!r} is not an integer")
    return int(f)


def _as_float(s: str, name: str, *, finite: bool = False) -> float:
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"{name} {s!r} is not a number") from None
    if finite and not math.isfinite(f):
        raise ValueError(f"{name} {s!r} is not finite")
    return f


def missing_for_fit(rows: list[SweepRow]) -> list[str]:
    """What a sweep lacks to determine a profile (empty: enough). Each phase's fixed cost needs its
    mode; the per-request costs need two batch sizes."""
    out = []
    for mode, what in zip(MODES, ("T_T (plain decode)", "T_D (one drafter step)", "T_V (verify)")):
        if not any(r.mode == mode for r in rows):
            out.append(f"no {mode} rows ({what}): measure it at the sweep's (batch, seq, γ)")
    if len({r.batch for r in rows}) < 2:
        out.append("a single batch size: measure at least two (e.g. 1, 4, 16, 64) to tell per-request from fixed costs")
    return out


def write_sweep_csv(path, rows: Iterable[SweepRow]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            ctx = "" if r.ctx is None else f"{r.ctx:.1f}"
            w.writerow([r.batch, r.seq, r.gamma, r.mode, f"{r.median_ms:.6g}", "" if r.n is None else r.n, ctx])
    return p
