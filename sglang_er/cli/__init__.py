"""The ``sglang-er`` command: ``--version``, ``doctor``, ``model``, ``demo``, ``eval``, ``calibrate``
(and ``bench``, which points at the source checkout's benchmark)."""

from __future__ import annotations

import argparse
import sys

from sglang_er import __version__


def _doctor(_args) -> int:
    import importlib.metadata as md

    import torch

    from sglang_er.engine.cpu.platform import PLATFORM_NAME, accelerator_present

    rows = [("sglang-er", __version__)]
    for dist in ("sglang", "torch", "transformers"):
        try:
            rows.append((dist, md.version(dist)))
        except md.PackageNotFoundError:
            rows.append((dist, "NOT INSTALLED"))
    acc = accelerator_present()
    rows.append(("accelerator", acc or "none"))
    try:
        from sglang_er.engine.kernels import platform_summary

        rows.append(("sglang platform", platform_summary()))
    except Exception as e:  # noqa: BLE001 - doctor reports problems instead of dying on them
        rows.append(("sglang platform", f"ERROR: {e}"))
    ops = torch.ops.aten
    rows.append(("int4 CPU matmul", "yes" if hasattr(ops, "_weight_int4pack_mm_for_cpu") else "MISSING"))
    rows.append(("int4 CPU pack", "yes" if hasattr(ops, "_convert_weight_to_int4pack_for_cpu") else "MISSING"))
    if acc == "cuda":
        from sglang_er.engine.kernels import marlin_importable
        from sglang_er.quant.int4pack import cuda_device_ok

        rows.append(("AWQ-Marlin (CUDA)", "yes" if marlin_importable() else "MISSING (SGLang's CUDA kernels)"))
        rows.append(("int4 CUDA (torch)", "yes" if cuda_device_ok() else "no (needs NVIDIA sm80+)"))
    rows.append(("portable CPU platform", f"SGLANG_PLATFORM={PLATFORM_NAME} or automatic without accelerator"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _model(args) -> int:
    from sglang_er.models.factory import build_model

    print(build_model(args.name, seed=args.seed))
    return 0


def _demo(rest: list[str]) -> int:
    from sglang_er.demo import main as demo_main

    return demo_main(rest)


def _calibrate(args) -> int:
    from sglang_er.cli.calibrate import run

    return run(args)


def _eval(rest: list[str]) -> int:
    from sglang_er.evaluation.math_eval import main as eval_main

    return eval_main(rest)


def _bench(_rest: list[str]) -> int:
    """The benchmarks are tools of the source checkout (its ``eval/`` folder), not installed."""
    raise RuntimeError(
        "the rollout benchmark is not installed with the package: from a source checkout's root run "
        "`python -m eval.rollout_bench --help`"
    )


# Commands with their own argument parsers: everything after the name is theirs, --help included.
FORWARDED = {
    "demo": (_demo, "start a server on a built-in model, run requests, report (--help for its options)"),
    "eval": (_eval, "math eval over the OpenAI API (GSM8K sample, GSM8K, MATH-500, jsonl, HF)"),
    "bench": (_bench, "RL-shaped rollout benchmark: plain vs EFFROLLOUT (source checkout only)"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sglang-er", description=__doc__)
    p.add_argument("--version", action="version", version=f"sglang-er {__version__}")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("doctor", help="versions, platform, accelerator, kernels").set_defaults(fn=_doctor)
    m = sub.add_parser("model", help="build a model from code and print its directory")
    m.add_argument(
        "name",
        help="tiny | tiny-llama | qwen2-0.5b | smollm2-135m-instruct | qwen2.5-0.5b-instruct "
        "(real, from the registry) | gsm8k-lm (trained on $SGLANG_ER_DATA/gsm8k/train.jsonl, ~15 min once) "
        "| gsm8k-lm-rl (gsm8k-lm sharpened: a low-entropy late-RL policy)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=_model)
    for name, (fn, help_) in FORWARDED.items():  # listed in --help; main() hands them their arguments
        e = sub.add_parser(name, help=help_, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
        e.set_defaults(fn=lambda a, _fn=fn: _fn(a.rest))
    from sglang_er.cli.calibrate import add_arguments as _calibrate_arguments  # stdlib-only import

    c = sub.add_parser("calibrate", help="measure T_T/T_D/T_V and fit a hardware profile, or validate one")
    _calibrate_arguments(c)
    c.set_defaults(fn=_calibrate)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:  # argparse's REMAINDER would reject a leading option such as --n
        fn, fn_args = FORWARDED[argv[0]][0], argv[1:]
    else:
        args = p.parse_args(argv)
        if not getattr(args, "fn", None):
            p.print_help()
            return 2
        fn, fn_args = args.fn, args
    try:
        return fn(fn_args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"sglang-er: error: {e}", file=sys.stderr)
        return 1
