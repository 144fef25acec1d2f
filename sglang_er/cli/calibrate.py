"""``sglang-er calibrate``: measure this machine's T_T / T_D / T_V, fit a hardware profile, validate one.

Three uses (``sglang-er calibrate --help``):

* measure: ``--model-path M [--out profile.json] [--sweep-csv sweep.csv]`` runs ONE real
  EFFROLLOUT server over a grid of batch sizes, prompt lengths and γ (:mod:`sglang_er.cli.measure`)
  and fits the profile on every full-batch iteration, with the cost model's own byte/flop
  accounting and each request's real length;
* fit: ``--csv sweep.csv --model-config config.json [--out profile.json]`` fits a profile from
  an external sweep of medians (another machine or model: shapes from the HF config, no weights;
  the CSV layout and which rows are skipped: :mod:`sglang_er.cli.sweep`);
* validate: ``--validate profile.json --csv sweep.csv`` reports per-component MAPE of the
  profile's uncorrected predictions and toggle-sign accuracy at an assumed acceptance α.

A fit (:mod:`sglang_er.cli.fit`) keeps every rate within what real devices reach, says which
parameters the sweep could not determine and the value they were held at, and checks itself on
(batch, seq) configurations it did not see. A profile that misses the quality bounds of
:mod:`sglang_er.cli.quality` is refused: the command exits with :data:`REFUSED_EXIT`, says what went
wrong and what to measure, and writes nothing; ``--force`` writes it anyway, named ``…-forced``
with ``"forced": true``.

A server started without ``SGLANG_ER_PROFILE`` starts from the built-in profile of its device
(``cpu-2core``, datasheet numbers for A100, H100, H200 and L40S, or the labelled ``generic-gpu``
placeholder on any other GPU, with a log line naming this command) and relies on live correction
(:meth:`sglang_er.gamma.cost_model.CostModel.observe`, :mod:`sglang_er.gamma.correction`), which
converges within tens of decode iterations. Run this command once per machine/model when the first
iterations' choices matter.

Imports at module level are stdlib and sglang-er's stdlib-only modules (``sglang-er`` builds its
parser from here); numpy, scipy, pydantic and :mod:`sglang_er.gamma` are imported by the functions
that need them; SGLang only runs in the server process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sglang_er.cli.fit import FitOutcome, fit_and_validate, fit_robust
from sglang_er.cli.measure import measure, measurement_rows, measurement_samples
from sglang_er.cli.quality import (
    MAX_MAPE,
    MIN_TOGGLE_ACCURACY,
    cost_model,
    evaluate,
    expected_tokens,
    format_report,
    predict_ms,
    rows_to_samples,
)
from sglang_er.cli.sweep import (
    CSV_COLUMNS,
    MODES,
    REQUIRED_COLUMNS,
    SweepRow,
    load_sweep,
    missing_for_fit,
    read_sweep_csv,
    write_sweep_csv,
)
from sglang_er.limits import MAX_GAMMA as _MAX_GAMMA

__all__ = [
    "CSV_COLUMNS",
    "MAX_MAPE",
    "MIN_TOGGLE_ACCURACY",
    "MODES",
    "REFUSED_EXIT",
    "REQUIRED_COLUMNS",
    "SweepRow",
    "add_arguments",
    "cost_model",
    "evaluate",
    "expected_tokens",
    "fit_robust",
    "load_model_config",
    "predict_ms",
    "read_sweep_csv",
    "rows_to_samples",
    "run",
    "write_sweep_csv",
]

REFUSED_EXIT = 3  # the fit missed the quality bounds; nothing was written


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


def _base_profile(name: str | None, device: str | None = None):
    """The profile a sweep's undetermined parameters start from: ``--base`` (a built-in name or a
    JSON file), else the built-in profile of ``device`` (a GPU name: its datasheet profile or the
    generic one), else the CPU's."""
    from sglang_er.gamma.builtin_profiles import builtin_profile, builtin_profile_for_device
    from sglang_er.gamma.hardware_profile import load_profile

    if name:
        if Path(name).suffix == ".json" or Path(name).is_file():
            return load_profile(name)
        return builtin_profile(name)
    if device and not device.lower().startswith("cpu"):
        return builtin_profile_for_device(device, warn=False)
    return builtin_profile("cpu")


# ====================================================================== reporting
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


def format_outcome(o: FitOutcome, base_name: str) -> str:
    """Held parameters, the held-out check and the bounds missed, one line each."""
    lines = [f"  held (the sweep does not determine it): {k} {v}" for k, v in o.held.items()]
    if o.held:
        lines.append(f"  (base profile for held values: {base_name})")
    h = o.holdout
    if h.get("mape"):
        vals = ", ".join(f"{m} {'—' if v is None else f'{100 * v:.1f}%'}" for m, v in h["mape"].items())
        lines.append(f"  held-out check ({len(h['configs'])} configurations, {h['rows']} rows): MAPE {vals}")
    if h.get("note"):
        lines.append(f"  held-out check: {h['note']}")
    bounds = ", ".join(f"{m} MAPE <= {100 * v:.0f}%" for m, v in MAX_MAPE.items())
    lines.append(f"  quality bounds: {bounds}; toggle-sign accuracy >= {MIN_TOGGLE_ACCURACY}")
    lines += [f"  FAILED: {f}" for f in o.failures]
    return "\n".join(lines)


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
    g.add_argument("--sweep-model", help="with a 'model' column: use only this model's rows")
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
        help="built-in profile (cpu, a100, h100, h200, l40s, generic, ...) or profile JSON for the "
        "parameters a sweep cannot determine (default: this machine's built-in, or --device's)",
    )
    g.add_argument("--name", help="profile name (default calibrated-<model>)")
    g.add_argument("--device", help="device name recorded in the profile (default: this machine / --base)")
    g.add_argument("--json", action="store_true", help="print machine-readable numbers instead of tables")
    g.add_argument(
        "--force",
        action="store_true",
        help='write a fitted profile that misses the quality bounds (named ...-forced, marked "forced": true)',
    )


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
    from sglang_er.gamma.hardware_profile import load_profile

    profile = load_profile(args.validate)
    sweep = load_sweep(args.csv, model=args.sweep_model)
    ev = evaluate(cost_model(profile, _config_arg(args)), sweep.rows, args.alpha)
    if args.json:
        report = _json_ready(ev, profile=str(args.validate), csv=str(args.csv), skipped=dict(sweep.skipped))
        print(json.dumps(report, indent=2))
        return 0
    if sweep.skipped:
        print(sweep.skipped_text())
    print(format_report(ev, f"profile {profile.name} ({args.validate}) vs {args.csv}, uncorrected predictions:"))
    return 0


def _fit_and_report(args, outcome: FitOutcome, *, base, measured_with: str, extra_json: dict) -> int:
    """Print the fit, then write it, or refuse it (exit :data:`REFUSED_EXIT`, nothing written)."""
    o = outcome
    notes = [f"{k} {v}" for k, v in o.held.items()]
    if o.dropped:
        measured_with += f"; robust refit without {o.dropped} samples (> 3 MAD)"
    if notes:
        measured_with += "; " + "; ".join(notes)
    prof = o.profile
    refused = bool(o.failures) and not args.force
    if o.failures and args.force:
        measured_with += "; FORCED past the quality bounds: " + "; ".join(o.failures)
        prof = prof.model_copy(update={"name": f"{prof.name}-forced"[:200], "forced": True})
    prof = prof.model_copy(update={"measured_with": measured_with[:2000]})
    out = prof.save(args.out) if args.out and not refused else None
    if args.json:
        report = _json_ready(
            o.ev,
            **extra_json,
            profile=str(out) if out else None,
            dropped=o.dropped,
            held=o.held,
            holdout=o.holdout,
            failures=o.failures,
            refused=refused,
            forced=prof.forced,
            fitted_profile=json.loads(prof.to_json()),
        )
        print(json.dumps(report, indent=2))
        return REFUSED_EXIT if refused else 0
    drop = f" ({o.dropped} outliers > 3 MAD dropped)" if o.dropped else ""
    print(f"fitted profile {prof.name!r} from {extra_json.get('samples')} samples{drop}:")
    print(format_profile(prof))
    print(format_outcome(o, base.name))
    print(format_report(o.ev, "uncorrected predictions vs the sweep medians:"))
    if refused:
        print(
            "error: the fit misses the quality bounds, so no profile was written:\n  "
            + "\n  ".join(o.failures)
            + "\n  (--force writes it anyway, named ...-forced)",
            file=sys.stderr,
        )
        return REFUSED_EXIT
    if prof.forced:
        print(f"warning: FORCED: {prof.name!r} misses the quality bounds; its predictions are not trustworthy")
    if out:
        print(f"profile written to {out}  (use: SGLANG_ER_PROFILE={out})")
    else:
        print("no --out given; profile JSON:")
        print(prof.to_json())
    return 0


def _cmd_fit_csv(args) -> int:
    sweep = load_sweep(args.csv, model=args.sweep_model)
    missing = missing_for_fit(sweep.rows)
    if missing:
        skipped = f" ({sweep.skipped_text()})" if sweep.skipped else ""
        raise ValueError(f"sweep CSV {args.csv} cannot determine a profile{skipped}: " + "; ".join(missing))
    if sweep.skipped and not args.json:
        print(sweep.skipped_text())
    config = _config_arg(args)
    base = _base_profile(args.base, args.device)
    samples = rows_to_samples(cost_model(base, config), sweep.rows)  # accounting only: bytes/flops
    outcome = fit_and_validate(
        samples,
        [r.config for r in sweep.rows],
        sweep.rows,
        lambda p: cost_model(p, config),
        base=base,
        alpha=args.alpha,
        name=args.name or f"calibrated-{Path(args.csv).stem}",
        device=args.device or base.device,
        measured_with="",
    )
    return _fit_and_report(
        args,
        outcome,
        base=base,
        measured_with=f"sglang-er calibrate --csv {Path(args.csv).name} (sweep medians)",
        extra_json={"csv": str(args.csv), "samples": len(samples), "skipped": dict(sweep.skipped)},
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
    samples, keys = measurement_samples(cost_model(base, config, backend), m, args.gammas)
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
    outcome = fit_and_validate(
        samples,
        keys,
        rows,
        lambda p: cost_model(p, config, backend),
        base=base,
        alpha=args.alpha,
        name=args.name or f"calibrated-{Path(str(args.model_path)).name}",
        device=args.device or m.device,
        measured_with="",
        attention_backend=backend,
    )
    rc = _fit_and_report(
        args,
        outcome,
        base=base,
        measured_with=f"sglang-er calibrate on {Path(str(args.model_path)).name}: {grid}; "
        f"{len(samples)} per-iteration samples",
        extra_json={"model_path": str(args.model_path), "sweep_csv": args.sweep_csv, "samples": len(samples)},
    )
    if args.sweep_csv and not args.json:
        print(f"sweep medians written to {args.sweep_csv}")
    return rc
