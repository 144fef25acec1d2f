"""The command line of :mod:`eval.bench_spec` and the server configurations it asks for.

A configuration is ``(name, γ, extra server args, extra environment)``: plain SGLang, EFFROLLOUT
with γ fixed (0 measures the worker's own plain step), off, auto, hybrid, each optionally at
several ``--tp-size`` values with every rank bound to a core of its own on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Benchmarks measure the steady state: AWQ switches on after the warm-up, not mid-measurement.
AWQ_WARM = {"SGLANG_ER_AWQ_MIN_TOKENS": "256", "SGLANG_ER_AWQ_SAMPLE_EVERY": "1"}


def cpu_bind(cores) -> dict[str, str]:
    """A server's environment that binds its rank r to CPU core ``cores[r]`` (SGLang's CPU TP refuses
    to share one NUMA node's cores unbound); nothing on a GPU."""
    import torch

    return {} if torch.cuda.is_available() else {"SGLANG_CPU_OMP_THREADS_BIND": "|".join(map(str, cores))}


def tp_variant(configs: list, tp: int) -> list:
    """The configurations at ``--tp-size tp``, named ``<name>/tp<tp>``, each rank on a core of its own."""
    if tp == 1:
        return list(configs)
    bind = cpu_bind(range(tp))
    return [(f"{n}/tp{tp}", g, [*extra, "--tp-size", str(tp)], {**env, **bind}) for n, g, extra, env in configs]


def parser(description: str) -> argparse.ArgumentParser:
    """bench_spec's arguments (``--help`` explains each)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b-instruct")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument(
        "--gammas", nargs="*", type=int, default=[2, 3, 4, 6, 8], help="fixed γ configurations (none: pass none)"
    )
    p.add_argument(
        "--gamma-max",
        type=int,
        help="γmax of every EFFROLLOUT server (--speculative-num-steps; default: the largest of --gammas)",
    )
    p.add_argument(
        "--tp-sizes",
        nargs="+",
        type=int,
        default=[1],
        help="run every configuration at each of these --tp-size values (named <config>/tp<N>), "
        "and report TP N against TP 1 per configuration",
    )
    p.add_argument(
        "--off",
        action="store_true",
        help="also run EFFROLLOUT with SGLANG_ER_MODE=off (every iteration decodes plainly through the "
        "worker): what switching speculation off costs against plain SGLang",
    )
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument(
        "--new-tokens",
        type=int,
        default=256,
        help="at most this many tokens per request; they end at the model's EOS unless --ignore-eos",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly --new-tokens per request, past the model's EOS (labelled in the report; "
        "such text is easy to predict, so acceptance and speed-ups read high)",
    )
    p.add_argument(
        "--json-schema",
        action="store_true",
        help="constrained decoding: every request asks for, and is constrained to, a JSON object "
        "with its reasoning and answer (labelled in the report)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--draft-vocabs",
        nargs="+",
        type=int,
        default=[None],
        help="draft head vocabularies (SGLANG_ER_DRAFT_VOCAB; 0: every token; default: the server's own): every "
        "fixed γ runs with each, auto and hybrid with the first",
    )
    p.add_argument(
        "--draft-heads",
        nargs="+",
        default=["auto"],
        choices=["auto", "shared", "w8", "w4"],
        help="drafter lm_head: the server's default (auto), the target's (shared), an int8 and/or a W4 copy",
    )
    p.add_argument(
        "--quant",
        nargs="+",
        default=["awq"],
        choices=["awq", "rtn"],
        help="drafter quantizer(s); AWQ switches on after its live statistics are ready",
    )
    p.add_argument(
        "--no-overlap-plain",
        action="store_true",
        help="also run plain SGLang with --disable-overlap-schedule: SGLang turns its overlap "
        "scheduler off for a speculative algorithm that does not support it, so this is "
        "the plain decoding an EFFROLLOUT server's γ = 0 iterations compare with",
    )
    p.add_argument(
        "--skip-gamma0",
        action="store_true",
        help="skip the γ=0 EFFROLLOUT server (it only measures T_T for the T_D/T_T and T_V/T_T columns)",
    )
    p.add_argument("--auto", action="store_true", help="also run auto mode (γ chosen per iteration)")
    p.add_argument(
        "--hybrid",
        action="store_true",
        help="also run auto with history drafts (SGLANG_ER_HISTORY=all); implies --auto",
    )
    p.add_argument(
        "--twin",
        action="store_true",
        help="also run a second, identical auto server (auto-twin): how far two servers of one "
        "configuration differ here (each computes its own AWQ scales from its own traffic), "
        "the yardstick for hybrid vs auto; implies --auto",
    )
    p.add_argument(
        "--auto-gamma-max",
        nargs="*",
        type=int,
        default=[],
        help="also run auto with each of these γ max (named auto/gmax<N>), judged against auto at "
        "--gamma-max round by round: which γ max a default should be; implies --auto",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="hardware profile for auto/hybrid (SGLANG_ER_PROFILE; `sglang-er calibrate` writes one)",
    )
    p.add_argument(
        "--prompts",
        choices=["synthetic", "gsm8k"],
        default="gsm8k",
        help="gsm8k: GSM8K questions in the model's chat template; synthetic: one fixed text (random-weight models)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every (B, T) cell this many times on its server and keep the median run "
        "(this machine's throughput wanders by ±15%% between runs)",
    )
    p.add_argument(
        "--repeat-batches",
        nargs="+",
        type=int,
        default=None,
        help="only these batch sizes get --repeats (default: all); the large batches take longest, "
        "and there the configurations are far apart",
    )
    p.add_argument(
        "--contender-ratio",
        type=float,
        default=0.8,
        help="a fixed γ below this fraction of the best at the previous batch size gets one run "
        "instead of --repeats (interleaved mode; 0: repeat every configuration)",
    )
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="start the servers in turn instead of all at once (interleaved rounds need every "
        "configuration's server in memory together)",
    )
    p.add_argument(
        "--fork-children",
        action="store_true",
        help="CPU: every server forks its scheduler and detokenizer instead of spawning them "
        "(sglang_er.launcher): ~0.7 GB less per child, so more servers fit side by side; the "
        "scheduler computes the same",
    )
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV pool of every server, in tokens")
    p.add_argument("--json", default=None, help="also write the results here (and a markdown report beside them)")
    p.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: print (and with --json write) the report of an earlier run's JSON; pass that "
        "run's other arguments unchanged",
    )
    return p


def configurations(args: argparse.Namespace) -> tuple[list, list]:
    """Every configuration the arguments name, and those that speculate (or could: off, auto)."""
    if args.tp_sizes[0] != 1:
        raise SystemExit(f"--tp-sizes {args.tp_sizes}: start with 1, the reference every ratio is taken against")
    if args.gamma_max is None and not args.gammas:
        raise SystemExit("--gammas is empty: pass --gamma-max for the auto and off servers")
    gmax = args.gamma_max if args.gamma_max is not None else max(args.gammas)
    if any(g > gmax for g in args.gammas):
        raise SystemExit(f"--gammas {args.gammas} exceed --gamma-max {gmax}: raise --gamma-max")

    def eff(g: int) -> list[str]:  # an EFFROLLOUT server at γ max g
        return ["--speculative-algorithm", "EFFROLLOUT", "--speculative-num-steps", str(g)]

    spec = eff(gmax)
    configs = (
        [("plain", 0, [], {})]
        + ([("plain/no-overlap", 0, ["--disable-overlap-schedule"], {})] if args.no_overlap_plain else [])
        + ([] if args.skip_gamma0 else [("gamma=0", 0, spec, {"SGLANG_ER_GAMMA": "0"})])
        + ([("off", 0, spec, {"SGLANG_ER_MODE": "off"})] if args.off else [])
        + [
            (
                f"gamma={g}"
                + ("" if head == "auto" else f"/{head}")
                + ("" if q == "awq" else f"/{q}")
                + (f"/v{dv}" if dv else ""),
                g,
                spec,
                {
                    "SGLANG_ER_GAMMA": str(g),
                    "SGLANG_ER_DRAFT_HEAD": head,
                    "SGLANG_ER_QUANT": q,
                    **({} if dv is None else {"SGLANG_ER_DRAFT_VOCAB": str(dv)}),
                    **AWQ_WARM,
                },
            )
            for q in args.quant
            for head in args.draft_heads
            for dv in args.draft_vocabs
            for g in args.gammas
        ]
    )
    args.auto = args.auto or args.hybrid or args.twin or bool(args.auto_gamma_max)
    prof = {"SGLANG_ER_PROFILE": str(Path(args.profile).resolve())} if args.profile else {}
    if args.hybrid:
        configs.append(
            (
                "hybrid",
                0,
                spec,
                {
                    "SGLANG_ER_MODE": "auto",
                    "SGLANG_ER_HISTORY": "all",
                    "SGLANG_ER_DRAFT_HEAD": args.draft_heads[0],
                    **({} if args.draft_vocabs[0] is None else {"SGLANG_ER_DRAFT_VOCAB": str(args.draft_vocabs[0])}),
                    "SGLANG_ER_QUANT": args.quant[0],
                    **AWQ_WARM,
                    **prof,
                },
            )
        )
    if args.auto:
        auto_env = {
            "SGLANG_ER_MODE": "auto",
            "SGLANG_ER_DRAFT_HEAD": args.draft_heads[0],
            **({} if args.draft_vocabs[0] is None else {"SGLANG_ER_DRAFT_VOCAB": str(args.draft_vocabs[0])}),
            "SGLANG_ER_QUANT": args.quant[0],
            **AWQ_WARM,
            **prof,
        }
        configs.append(("auto", 0, spec, auto_env))
        if args.twin:
            configs.append(("auto-twin", 0, spec, dict(auto_env)))
        for g in args.auto_gamma_max:
            if g < 1 or g == gmax:
                raise SystemExit(f"--auto-gamma-max {g}: give γ max values >= 1 other than --gamma-max {gmax}")
            configs.append((f"auto/gmax{g}", 0, eff(g), dict(auto_env)))
    configs = [c for tp in args.tp_sizes for c in tp_variant(configs, tp)]
    spec_configs = [c for c in configs if c[0] not in ("plain", "gamma=0", "plain/no-overlap")]
    return configs, spec_configs
