"""``sglang-er calibrate``: measure this machine's T_T / T_D / T_V, fit a hardware profile, validate one.

Three uses (``sglang-er calibrate --help``):

* measure: ``--model-path M [--out profile.json] [--sweep-csv sweep.csv]`` starts ONE real
  EFFROLLOUT server with ``SGLANG_ER_GAMMA=0,g1,g2,..`` (γ cycles per iteration, 0 = a plain
  decode step, so T_T, T_D and T_V are measured side by side at the same batch), sends B
  concurrent greedy requests of S random tokens per (B, S), reads the per-iteration timeline
  from ``/get_server_info`` and fits the profile (:func:`fit_robust`) on every full-batch
  iteration, with the cost model's own byte/flop accounting and each request's real length;
* fit: ``--csv sweep.csv --model-config config.json [--out profile.json]`` fits a profile from
  an external sweep of medians (another machine or model: shapes from the HF config, no weights);
* validate: ``--validate profile.json --csv sweep.csv`` reports per-component MAPE of the
  profile's uncorrected predictions and toggle-sign accuracy (does the profile put speculation
  on the right side of 1× where the sweep has T_T, T_D and T_V), at an assumed acceptance α.

Sweep CSV columns: ``batch,seq,gamma,mode,median_ms`` with mode ``target_decode`` (one plain
forward; gamma 0 or the γ it was measured next to), ``drafter_decode`` (ONE drafter step of a
γ-step draft) or ``target_verify`` (the verify forward over γ+1 tokens). Optional ``ctx``: the
mean committed length during the measurement (predictions use it instead of ``seq``, the prompt
length); other columns are ignored.

A server started without ``SGLANG_ER_PROFILE`` starts from the built-in conservative profile of
its device (``cpu-2core``, the H100 / A100 public numbers, or the labelled ``generic-gpu``
placeholder on any other GPU) and relies on live correction
(:meth:`sglang_er.gamma.cost_model.CostModel.observe`: per phase, the first measurement sets a multiplier,
later ones move it by EMA 0.2; once a phase has been timed over a spread of batch sizes, lengths
or γ the correction becomes affine, a + b·raw, which also fixes how cost grows; while
speculating, the γ policy times a plain step now and then so both sides stay measured). A built-in
calibration would add a sweep like this one (tens of seconds to minutes) to every server start,
while the corrections converge within tens of decode iterations, well inside one rollout. Run
this command once per machine/model when the first iterations' choices matter.

Imports at module level are stdlib and :mod:`sglang_er.limits` only (``sglang-er`` builds its
parser from here); numpy, pydantic and :mod:`sglang_er.gamma` are imported by the functions that
need them; SGLang only runs in the server process.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sglang_er.limits import MAX_GAMMA as _MAX_GAMMA

MODES = ("target_decode", "drafter_decode", "target_verify")
_PHASE_OF = {"target_decode": "plain", "drafter_decode": "draft", "target_verify": "verify"}
REQUIRED_COLUMNS = ("batch", "seq", "gamma", "mode", "median_ms")
CSV_COLUMNS = (*REQUIRED_COLUMNS, "n", "ctx")
NOISY_RMS = 0.25  # fit error above which the command warns that the sweep is unreliable
_FIX_CSV = (
    f"a sweep CSV needs the header {','.join(REQUIRED_COLUMNS)} (mode one of {', '.join(MODES)}; "
    "median_ms > 0; batch, seq >= 1; gamma >= 1 except for target_decode)"
)


# ====================================================================== sweep rows
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


def read_sweep_csv(path) -> list[SweepRow]:
    """Parse a sweep CSV (data only). Raises ValueError naming the row and the fix."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(
            f"sweep CSV {p}: cannot read ({e.strerror or e}); pass an existing file "
            "(written by `sglang-er calibrate --sweep-csv`)"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"sweep CSV {p}: not UTF-8 text; {_FIX_CSV}") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"sweep CSV {p}: missing column(s) {', '.join(missing)} "
            f"(header: {','.join(header) or '<empty>'}); {_FIX_CSV}"
        )
    rows = []
    for line, rec in enumerate(reader, start=2):  # line 1 is the header
        if not any((v or "").strip() for k, v in rec.items() if k is not None):
            continue  # blank line
        where = f"sweep CSV {p} line {line}"
        vals = {k: (rec.get(k) or "").strip() for k in CSV_COLUMNS}
        mode = vals["mode"]
        if mode not in MODES:
            raise ValueError(f"{where}: unknown mode {mode!r}; use one of {', '.join(MODES)}")
        try:
            batch, seq, gamma = (_as_int(vals[k], k) for k in ("batch", "seq", "gamma"))
            ms = _as_float(vals["median_ms"], "median_ms")
            n = _as_int(vals["n"], "n") if vals["n"] else None
            ctx = _as_float(vals["ctx"], "ctx") if vals["ctx"] else None
        except ValueError as e:
            raise ValueError(f"{where}: {e}; {_FIX_CSV}") from None
        problem = None
        if batch < 1 or seq < 1:
            problem = f"batch {batch} and seq {seq} must be >= 1"
        elif not (ms > 0):
            problem = f"median_ms {ms:g} must be > 0"
        elif mode != "target_decode" and not 1 <= gamma <= _MAX_GAMMA:
            problem = f"{mode} needs gamma in 1..{_MAX_GAMMA}, got {gamma}"
        elif gamma < 0:
            problem = f"gamma {gamma} must be >= 0"
        elif ctx is not None and ctx < 0:
            problem = f"ctx {ctx:g} must be >= 0"
        if problem:
            raise ValueError(f"{where}: {problem}; {_FIX_CSV}")
        rows.append(SweepRow(batch, seq, gamma, mode, ms, n, ctx))
    if not rows:
        raise ValueError(f"sweep CSV {p}: no data rows; {_FIX_CSV}")
    return rows


def _as_int(s: str, name: str) -> int:
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"{name} {s!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} {s!r} is not an integer")
    return int(f)


def _as_float(s: str, name: str) -> float:
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"{name} {s!r} is not a number") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} {s!r} is not finite")
    return f


def write_sweep_csv(path, rows: Iterable[SweepRow]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.batch,
                    r.seq,
                    r.gamma,
                    r.mode,
                    f"{r.median_ms:.6g}",
                    "" if r.n is None else r.n,
                    "" if r.ctx is None else f"{r.ctx:.1f}",
                ]
            )
    return p


# ====================================================================== model and profile I/O
def load_model_config(path) -> dict:
    """An HF config.json as a dict: a file, a model directory, or (last resort) a hub id."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model config {p}: not readable JSON ({e}); pass the model's HF config.json") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"model config {p}: expected a JSON object; pass the model's HF config.json")
        return cfg
    if Path(path).exists():
        raise ValueError(f"model config {path}: no config.json there; pass the model's HF config.json or its directory")
    if os.sep in str(path) or str(path).endswith(".json") or str(path).startswith("."):
        raise ValueError(
            f"model config {path}: no such file or directory; pass the model's HF config.json or its directory"
        )
    try:  # a hub id such as Qwen/Qwen2-0.5B
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path)).to_dict()
    except Exception as e:
        raise ValueError(
            f"model config {path}: not a file or directory, and not loadable as a model id "
            f"({type(e).__name__}); pass the model's HF config.json"
        ) from None


def _base_profile(name: str | None):
    from sglang_er.gamma.calibration import builtin_profile, load_profile

    if name:
        if Path(name).suffix == ".json" or Path(name).is_file():
            return load_profile(name)
        return builtin_profile(name)
    return builtin_profile("cpu")


def cost_model(profile, config: dict, attention_backend: str | None = None):
    from sglang_er.gamma import KV_READ_RULE, CostModel, ModelCost

    backend = attention_backend or profile.attention_backend
    return CostModel(
        profile,
        ModelCost.from_config(config),
        attention_backend=backend,
        kv_read_rule=KV_READ_RULE.get(backend, "per_request"),
    )


# ====================================================================== predictions, errors
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
        out.append(cost.calibration_sample(_PHASE_OF[r.mode], st, r.gamma if r.mode != "target_decode" else 0, secs))
    return out


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[L|γ] for a constant per-position acceptance α: (1 − α^(γ+1)) / (1 − α)."""
    from sglang_er.gamma import expected_lengths

    return expected_lengths([alpha] * gamma)[gamma]


def evaluate(cost, rows: list[SweepRow], alpha: float) -> dict:
    """Per-component MAPE and toggle-sign accuracy of ``cost`` (uncorrected) against ``rows``."""
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    preds = []
    for r in rows:
        pred = predict_ms(cost, r)
        per_mode[r.mode].append(abs(pred - r.median_ms) / r.median_ms)
        preds.append(
            {
                "batch": r.batch,
                "seq": r.seq,
                "gamma": r.gamma,
                "mode": r.mode,
                "measured_ms": r.median_ms,
                "predicted_ms": pred,
            }
        )
    mape = {m: (sum(v) / len(v) if v else None) for m, v in per_mode.items()}
    counts = {m: len(v) for m, v in per_mode.items()}

    # toggle sign: gain = E[L|γ]·T_T / (γ·T_D + T_V), measured vs predicted
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r, p in zip(rows, preds):
        groups[(r.batch, r.seq, r.gamma, r.mode)].append((r.median_ms, p["predicted_ms"]))

    def med(key):
        v = groups.get(key)
        if not v:
            return None
        return statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)

    cases = []
    for b, s, g, mode in sorted(groups):
        if mode != "target_verify":
            continue
        tt = med((b, s, g, "target_decode")) or med((b, s, 0, "target_decode"))
        td, tv = med((b, s, g, "drafter_decode")), med((b, s, g, "target_verify"))
        if tt is None or td is None:
            continue
        e = expected_tokens(alpha, g)
        gm = e * tt[0] / (g * td[0] + tv[0])
        gp = e * tt[1] / (g * td[1] + tv[1])
        cases.append(
            {
                "batch": b,
                "seq": s,
                "gamma": g,
                "measured_gain": gm,
                "predicted_gain": gp,
                "match": _sign(gm - 1.0) == _sign(gp - 1.0),
            }
        )
    ok = sum(c["match"] for c in cases)
    return {
        "mape": mape,
        "rows": counts,
        "toggle": {
            "alpha": alpha,
            "cases": len(cases),
            "correct": ok,
            "accuracy": ok / len(cases) if cases else None,
            "detail": cases,
        },
        "predictions": preds,
    }


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


# ====================================================================== robust fit
def fit_chain(samples: list, *, base, **kw):
    """fit_profile in three forms, keeping the plausible one with the lowest relative RMS error on
    the original samples: (1) everything; (2) bandwidth + overheads (compute rates from ``base``);
    (3) overheads only, after subtracting ``base``'s roofline time. (1) alone is not enough for a
    model so small that fixed overheads dominate every forward: it may fit a bandwidth/compute
    pair the profile's plausibility check refuses, or leave the roofline at zero while the
    profile keeps ``base``'s, which then adds to the fitted overheads.
    Returns (profile, note); the profile's fit_rel_rms is over ``samples``."""
    from sglang_er.gamma.calibration import compute_seconds, fit_profile, phase_seconds, sample_seconds

    def roofline_only(s) -> float:  # the memory/compute term alone: no overheads (forwards=0)
        return phase_seconds(base, s.phase, s.bytes, compute_seconds(base, s.flops), s.batch, forwards=0)

    variants = [
        ("", lambda s: s),
        ("compute rates kept from the base profile", lambda s: s.model_copy(update={"flops": {}})),
        (
            "overhead-bound: bandwidth and compute rates kept from the base profile",
            lambda s: s.model_copy(
                update={"bytes": 0.0, "flops": {}, "seconds": max(s.seconds - roofline_only(s), 0.05 * s.seconds)}
            ),
        ),
    ]
    best, errors = None, []
    for note, tf in variants:
        try:
            prof = fit_profile([tf(s) for s in samples], base=base, **kw)
        except ValueError as e:
            errors.append(str(e))
            continue
        rms = math.sqrt(sum(((sample_seconds(prof, s) - s.seconds) / s.seconds) ** 2 for s in samples) / len(samples))
        if best is None or rms < best[0] * (1 - 1e-6):
            best = (rms, prof.model_copy(update={"fit_rel_rms": rms}), note)
    if best is None:
        raise ValueError(
            f"no plausible profile fits the samples ({errors[-1]}); timings this far off "
            "usually mean other work on the machine: recalibrate on an idle machine"
        )
    return best[1], best[2]


def fit_robust(samples: list, *, base, mad_k: float = 3.0, min_rel: float = 0.02, **kw):
    """:func:`fit_chain`, then drop samples whose relative residual is more than ``mad_k`` scaled
    MADs (and ``min_rel``) from the median residual, and refit once.
    Returns (profile, dropped count, note)."""
    from sglang_er.gamma.calibration import sample_seconds

    prof, note = fit_chain(samples, base=base, **kw)
    res = [(sample_seconds(prof, s) - s.seconds) / s.seconds for s in samples]
    med = statistics.median(res)
    mad = 1.4826 * statistics.median(abs(r - med) for r in res)
    lim = max(mad_k * mad, min_rel)
    keep = [s for s, r in zip(samples, res) if abs(r - med) <= lim]
    dropped = len(samples) - len(keep)
    if dropped and len(keep) >= 2 and {s.phase for s in keep} == {s.phase for s in samples}:
        prof, note = fit_chain(keep, base=base, **kw)
        return prof, dropped, note
    return prof, 0, note


# ====================================================================== measurement
@dataclass
class Measurement:
    """Full-batch timeline records per (batch, seq) config, after warm-up."""

    records: dict[tuple[int, int], list[dict]] = field(default_factory=dict)
    attention_backend: str | None = None
    device: str = ""
    base_name: str = "cpu"
    dropped_records: int = 0  # records the server's timeline buffer lost (should be 0)


def _device_and_base() -> tuple[str, str]:
    """This machine's device name and its built-in profile (the base of what a sweep cannot fit)."""
    from sglang_er.engine.cpu.platform import accelerator_present
    from sglang_er.gamma.calibration import builtin_profile_for_device

    if accelerator_present() == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        return name, builtin_profile_for_device(name, warn=False).name
    return f"cpu-{os.cpu_count()}core", "cpu"


def _timeline(srv) -> tuple[list[dict], dict]:
    import requests

    r = requests.get(srv.url + "/get_server_info", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"GET /get_server_info -> {r.status_code}: {r.text[:300]}")
    info = r.json()
    try:
        states = info["internal_states"]
        tl = next(s["effrollout"]["timeline"] for s in states if isinstance(s, dict) and "effrollout" in s)
    except (KeyError, TypeError, StopIteration):
        raise RuntimeError(
            "the server's /get_server_info has no internal_states[..].effrollout.timeline; "
            "is it an EFFROLLOUT server of this sglang-er version?"
        ) from None
    return tl, info


def measure(
    model_path,
    config: dict,
    *,
    batch_sizes: list[int],
    seq_lens: list[int],
    gammas: list[int],
    max_new_tokens: int,
    kv_tokens: int | None = None,
    warmup: int = 2,
    seed: int = 0,
    server_args: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> Measurement:
    """Run the sweep against one real EFFROLLOUT server (always stopped on return)."""
    from sglang_er.gamma.calibration import GENERIC_GPU
    from sglang_er.launcher import DEFAULT_MAX_TOTAL_TOKENS, Server

    device, base_name = _device_and_base()
    if base_name == GENERIC_GPU:
        log(
            f"note: no built-in profile for {device}: what the sweep cannot determine comes from the "
            "uncalibrated generic-gpu placeholder"
        )
    gmax = max(gammas)
    need = max(batch_sizes) * (max(seq_lens) + max_new_tokens + gmax + 8)
    kv = kv_tokens or max(DEFAULT_MAX_TOTAL_TOKENS, int(need * 1.25))
    if kv < need:
        raise ValueError(f"--kv-tokens {kv} is below the {need} KV tokens the largest config needs; raise it")
    vocab = int(config.get("vocab_size") or 0)
    if vocab < 2:
        raise ValueError("model config has no usable vocab_size")
    cycle = ",".join(str(g) for g in [0, *gammas])
    env = {"SGLANG_ER_GAMMA": cycle, "SGLANG_ER_TIMELINE": str(max(1024, 4 * max_new_tokens + 64))}
    args = [
        "--speculative-algorithm",
        "EFFROLLOUT",
        "--speculative-num-steps",
        str(gmax),
        "--max-running-requests",
        str(max(max(batch_sizes), 8)),
        *server_args,
    ]
    rng = random.Random(seed)
    out = Measurement(device=device, base_name=base_name)
    log(f"starting an EFFROLLOUT server on {model_path} (γ cycle {cycle}, KV {kv} tokens) ...")
    t0 = time.monotonic()
    with Server(model_path, args, env=env, max_total_tokens=kv, stop_grace=1.0) as srv:
        log(f"server up in {time.monotonic() - t0:.0f}s; log {srv.log_path}")

        def run(B: int, S: int) -> None:
            ids = [[rng.randrange(vocab) for _ in range(S)] for _ in range(B)]
            srv.post(
                "/generate",
                {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
                },
                timeout=1800,
            )

        run(1, min(seq_lens))  # warm-up (not recorded): first-call allocations, lazy imports
        tl, info = _timeline(srv)
        out.attention_backend = info.get("decode_attention_backend") or info.get("attention_backend")
        last = max((r["iteration"] for r in tl), default=0)
        for B in batch_sizes:
            for S in seq_lens:
                run(B, S)
                tl, _ = _timeline(srv)
                new = {r["iteration"]: r for r in tl if r["iteration"] > last}
                if new:
                    lo, hi = min(new), max(new)
                    out.dropped_records += lo - last - 1
                    last = hi
                full = [new[i] for i in sorted(new) if new[i]["batch_size"] == B][warmup:]
                out.records[(B, S)] = full
                by_g = defaultdict(int)
                for r in full:
                    by_g[r["gamma"]] += 1
                log(
                    f"  B={B:<3} S={S:<5} {len(full):3d} full-batch iterations "
                    + " ".join(f"γ{g}:{by_g[g]}" for g in [0, *gammas])
                )
    if out.dropped_records:
        log(f"warning: the server's timeline dropped {out.dropped_records} iteration records")
    return out


def _pos(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else None


def measurement_samples(cost, m: Measurement, gammas: list[int]) -> list:
    """Per-iteration calibration samples with each request's committed length."""
    out = []
    for recs in m.records.values():
        for r in recs:
            g, lens = r["gamma"], r["seq_lens"]
            if g == 0:
                if _pos(r.get("plain_s")):
                    out.append(cost.calibration_sample("plain", lens, 0, r["plain_s"]))
            elif g in gammas:
                if _pos(r.get("draft_s")):
                    out.append(cost.calibration_sample("draft", lens, g, r["draft_s"]))
                if _pos(r.get("verify_s")):
                    out.append(cost.calibration_sample("verify", lens, g, r["verify_s"]))
    return out


def measurement_rows(m: Measurement, gammas: list[int]) -> list[SweepRow]:
    """Medians per (batch, seq, γ, mode); drafter_decode per drafter step."""
    rows = []
    for (B, S), recs in sorted(m.records.items()):
        vals: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
        for r in recs:
            g, lens = r["gamma"], r["seq_lens"]
            ctx = sum(lens) / len(lens)
            if g == 0 and _pos(r.get("plain_s")):
                vals[(0, "target_decode")].append((r["plain_s"], ctx))
            elif g in gammas:
                if _pos(r.get("draft_s")):
                    vals[(g, "drafter_decode")].append((r["draft_s"] / g, ctx))
                if _pos(r.get("verify_s")):
                    vals[(g, "target_verify")].append((r["verify_s"], ctx))
        for (g, mode), v in sorted(vals.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
            rows.append(
                SweepRow(B, S, g, mode, statistics.median(x[0] for x in v) * 1e3, len(v), sum(x[1] for x in v) / len(v))
            )
    return rows


# ====================================================================== reporting
def format_report(ev: dict, title: str) -> str:
    lines = [title, f"  {'component':<16}{'rows':>6}{'MAPE':>9}"]
    for m in MODES:
        v = ev["mape"][m]
        lines.append(f"  {m:<16}{ev['rows'][m]:>6}{'—' if v is None else f'{100 * v:8.1f}%':>9}")
    t = ev["toggle"]
    if t["cases"]:
        lines.append(f"  toggle-sign accuracy (α = {t['alpha']:g}): {t['correct']}/{t['cases']} = {t['accuracy']:.2f}")
        bad = [c for c in t["detail"] if not c["match"]]
        for c in bad[:8]:
            lines.append(
                f"    wrong side: B={c['batch']} S={c['seq']} γ={c['gamma']}: measured gain "
                f"{c['measured_gain']:.3f}×, predicted {c['predicted_gain']:.3f}×"
            )
    else:
        lines.append("  toggle-sign accuracy: no (batch, seq, γ) has all three modes")
    return "\n".join(lines)


def format_profile(p) -> str:
    fl = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in p.flops_per_s.items())
    return (
        f"  bandwidth {p.bandwidth_bytes_per_s / 1e9:.3g} GB/s; GFLOP/s {fl}\n"
        f"  fixed plain {p.fixed_plain_s * 1e3:.3g} ms, draft step {p.fixed_draft_step_s * 1e3:.3g} ms, "
        f"verify {p.fixed_verify_s * 1e3:.3g} ms; per seq {p.per_seq_s * 1e3:.3g} ms, "
        f"per seq (draft) {p.per_seq_draft_s * 1e3:.3g} ms\n"
        f"  fit relative RMS {p.fit_rel_rms if p.fit_rel_rms is not None else float('nan'):.3f}; "
        f"fitted: {', '.join(p.fitted) or 'nothing'}"
    )


def _json_ready(ev: dict, **extra) -> dict:
    return {**extra, "mape": ev["mape"], "rows": ev["rows"], "toggle": ev["toggle"], "predictions": ev["predictions"]}


# ====================================================================== command
def _int_list(name: str, lo: int, hi: int):
    def parse(s: str) -> list[int]:
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {s!r} is not a comma list of integers (e.g. 1,2,4)") from None
        if not v or any(not lo <= x <= hi for x in v):
            raise argparse.ArgumentTypeError(f"{name}: values must lie in {lo}..{hi}, got {s!r}")
        return sorted(set(v))

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0] + " See the module docstring of sglang_er.cli.calibrate."
    g = p.add_argument_group("measure (real SGLang server on this machine)")
    g.add_argument("--model-path", help="model directory (HF layout) to run; with --validate/--csv: its config")
    g.add_argument(
        "--batch-sizes",
        type=_int_list("--batch-sizes", 1, 4096),
        default=[1, 2, 4, 8, 16, 32],
        help="concurrent requests per config (default 1,2,4,8,16,32)",
    )
    g.add_argument(
        "--seq-lens",
        type=_int_list("--seq-lens", 1, 1 << 20),
        default=[64, 512],
        help="prompt lengths, random token ids (default 64,512)",
    )
    g.add_argument(
        "--gammas",
        type=_int_list("--gammas", 1, _MAX_GAMMA),
        default=[1, 3, 5, 7],
        help="draft lengths cycled with γ=0 (default 1,3,5,7)",
    )
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request and config (default 128)")
    g.add_argument("--kv-tokens", type=int, default=None, help="server KV pool (default: enough for the grid)")
    g.add_argument("--sweep-csv", help="also write the medians (batch,seq,gamma,mode,median_ms,n,ctx)")
    g = p.add_argument_group("fit from / validate against a sweep CSV")
    g.add_argument("--csv", help="sweep CSV (batch,seq,gamma,mode,median_ms) to fit from or validate against")
    g.add_argument("--validate", metavar="PROFILE", help="profile JSON to validate against --csv")
    g.add_argument("--model-config", help="HF config.json (or model directory) for the sweep's model")
    g.add_argument(
        "--alpha",
        type=float,
        default=0.8,
        help="assumed per-position acceptance for toggle-sign accuracy (default 0.8)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", help="profile JSON to write (measure: default profile.json)")
    g.add_argument(
        "--base",
        help="built-in profile (cpu, h100, a100) or profile JSON for the parameters a "
        "sweep cannot determine (default: this machine's built-in)",
    )
    g.add_argument("--name", help="profile name (default calibrated-<model>)")
    g.add_argument("--device", help="device name recorded in the profile (default: this machine / --base)")
    g.add_argument("--json", action="store_true", help="print machine-readable numbers instead of tables")


def run(args) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha {args.alpha} must lie in [0, 1]")
    if args.validate:
        return _cmd_validate(args)
    if args.csv:
        return _cmd_fit_csv(args)
    if args.model_path:
        return _cmd_measure(args)
    raise ValueError(
        "nothing to do: pass --model-path M (measure on this machine), "
        "--csv sweep.csv --model-config config.json (fit), or --validate profile.json --csv sweep.csv"
    )


def _config_arg(args) -> dict:
    src = args.model_config or args.model_path
    if not src:
        raise ValueError("the sweep's model shapes are needed: pass --model-config config.json (or --model-path M)")
    return load_model_config(src)


def _cmd_validate(args) -> int:
    if not args.csv:
        raise ValueError("--validate needs --csv sweep.csv (columns batch,seq,gamma,mode,median_ms)")
    from sglang_er.gamma.calibration import load_profile

    profile = load_profile(args.validate)
    rows = read_sweep_csv(args.csv)
    cost = cost_model(profile, _config_arg(args))
    ev = evaluate(cost, rows, args.alpha)
    if args.json:
        print(json.dumps(_json_ready(ev, profile=str(args.validate), csv=str(args.csv)), indent=2))
    else:
        print(format_report(ev, f"profile {profile.name} ({args.validate}) vs {args.csv}, uncorrected predictions:"))
    return 0


def _fit_and_report(
    args, cost_of, samples, rows, base, *, device, name, measured_with, backend, extra_json: dict
) -> int:
    prof, dropped, note = fit_robust(
        samples, base=base, name=name, device=device, measured_with=measured_with, attention_backend=backend
    )
    if dropped:
        measured_with += f"; robust refit without {dropped} of {len(samples)} samples (> 3 MAD)"
    if note:
        measured_with += f"; {note}"
    prof = prof.model_copy(update={"measured_with": measured_with[:2000]})
    ev = evaluate(cost_of(prof), rows, args.alpha)
    out = None
    if args.out:
        out = prof.save(args.out)
    if args.json:
        print(
            json.dumps(
                _json_ready(
                    ev,
                    **extra_json,
                    profile=str(out) if out else None,
                    samples=len(samples),
                    dropped=dropped,
                    note=note or None,
                    fitted_profile=json.loads(prof.to_json()),
                ),
                indent=2,
            )
        )
        return 0
    print(
        f"fitted profile {prof.name!r} from {len(samples)} samples"
        + (f" ({dropped} outliers > 3 MAD dropped)" if dropped else "")
        + ":"
    )
    if note:
        print(f"  note: {note} ({base.name})")
    print(format_profile(prof))
    print(format_report(ev, "uncorrected predictions vs the sweep medians:"))
    if prof.fit_rel_rms is not None and prof.fit_rel_rms > NOISY_RMS:
        print(
            f"warning: relative RMS error {prof.fit_rel_rms:.2f} > {NOISY_RMS}: the timings are noisy (other "
            "work on this machine?) or do not follow the roofline form; inspect the sweep medians and "
            "recalibrate on an idle machine",
            file=sys.stderr,
        )
    if out:
        print(f"profile written to {out}  (use: SGLANG_ER_PROFILE={out})")
    else:
        print("no --out given; profile JSON:")
        print(prof.to_json())
    return 0


def _cmd_fit_csv(args) -> int:
    rows = read_sweep_csv(args.csv)
    config = _config_arg(args)
    base = _base_profile(args.base)
    cost = cost_model(base, config)  # accounting only: samples carry bytes/flops, not times
    samples = rows_to_samples(cost, rows)
    return _fit_and_report(
        args,
        lambda p: cost_model(p, config),
        samples,
        rows,
        base,
        device=args.device or base.device,
        name=args.name or f"calibrated-{Path(args.csv).stem}",
        measured_with=f"sglang-er calibrate --csv {Path(args.csv).name} (sweep medians)",
        backend=None,
        extra_json={"csv": str(args.csv)},
    )


def _cmd_measure(args) -> int:
    if args.max_new_tokens < 4:
        raise ValueError("--max-new-tokens must be >= 4 (the warm-up iterations are dropped)")
    config = load_model_config(args.model_path)
    from sglang_er.gamma import ModelCost

    ModelCost.from_config(config)  # fail before starting a server if the shapes are unsupported
    m = measure(
        args.model_path,
        config,
        batch_sizes=args.batch_sizes,
        seq_lens=args.seq_lens,
        gammas=args.gammas,
        max_new_tokens=args.max_new_tokens,
        kv_tokens=args.kv_tokens,
        log=(lambda s: print(s, file=sys.stderr)) if args.json else print,
    )
    base = _base_profile(args.base or m.base_name)
    backend = m.attention_backend or base.attention_backend
    cost = cost_model(base, config, backend)
    samples = measurement_samples(cost, m, args.gammas)
    rows = measurement_rows(m, args.gammas)
    if len({s.phase for s in samples}) < 3:
        raise RuntimeError(
            f"the sweep produced too few full-batch iterations ({len(samples)} samples over "
            f"phases {sorted({s.phase for s in samples})}); raise --max-new-tokens"
        )
    if args.sweep_csv:
        write_sweep_csv(args.sweep_csv, rows)
    args.out = args.out or "profile.json"
    grid = (
        f"batch {','.join(map(str, args.batch_sizes))} seq {','.join(map(str, args.seq_lens))} "
        f"γ {','.join(map(str, args.gammas))} new {args.max_new_tokens}"
    )
    rc = _fit_and_report(
        args,
        lambda p: cost_model(p, config, backend),
        samples,
        rows,
        base,
        device=args.device or m.device,
        name=args.name or f"calibrated-{Path(str(args.model_path)).name}",
        measured_with=f"sglang-er calibrate on {Path(str(args.model_path)).name}: {grid}; "
        f"{len(samples)} per-iteration samples",
        backend=backend,
        extra_json={"model_path": str(args.model_path), "sweep_csv": args.sweep_csv},
    )
    if args.sweep_csv and not args.json:
        print(f"sweep medians written to {args.sweep_csv}")
    return rc
