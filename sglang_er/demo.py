"""The README's first command: a short RL-shaped math rollout, plain decoding vs EFFROLLOUT.

``python -m sglang_er.demo [--model smollm2-135m-instruct] [--questions 8] [--n 2] [--max-tokens 192]``

Builds the model (SmolLM2-135M-Instruct from the package registry by default; ``--model tiny``
for a random-weight smoke run), then for each of plain decoding and EFFROLLOUT: starts an SGLang
server, sends the same GSM8K chat prompts (n samples each, temperature 1.0) over the
OpenAI-compatible API, stops the server. The questions are the GSM8K sample that ships with the
package (``--dataset`` for others). Prints sample reasoning, accuracy, makespan, tokens/s,
acceptance, and the speed-up side by side, and writes them to ``<out>/report.md``.

Everything it needs ships with the package. Answers are graded with math-verify when it is
installed (``pip install 'sglang-er[eval]'``), else by numeric comparison, which grades GSM8K's
integer answers the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from sglang_er.evaluation.grading import have_math_verify
from sglang_er.evaluation.math_data import SAMPLE, load_problems
from sglang_er.evaluation.records import Summary
from sglang_er.evaluation.runner import run_eval
from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

REAL_MODEL = "qwen2.5-0.5b-instruct"
REAL_MODEL_COMMAND = f"python -m sglang_er.demo --model {REAL_MODEL} --questions 2 --n 2 --max-tokens 256"


def _rollout(
    model_path: Path, server_args: list[str], args: argparse.Namespace, label: str
) -> tuple[Summary, dict | None]:
    print(f"\n[demo] {label}: starting SGLang ({' '.join(server_args) or 'plain decoding'}) ...", flush=True)
    with Server(model_path, server_args, max_total_tokens=32768, stop_grace=1.0) as srv:
        print(
            f"[demo] {label}: healthy after {srv.startup_seconds:.0f}s; rollout of {args.questions} GSM8K "
            f"questions x n={args.n}, temperature {args.temperature}, max {args.max_tokens} tokens",
            flush=True,
        )
        summary = run_eval(
            base_url=srv.url,
            dataset=args.dataset,
            limit=args.questions,
            n=args.n,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency or args.questions * args.n,
            chat=True,
            out=f"{args.out}/{label}",
            progress=False,
        )
        counters = speculation_counters(srv.effrollout_state()) if server_args else None
    return summary, counters


def speculation_counters(state: dict | None) -> dict | None:
    """Exact counts from the worker's own metrics in ``/get_server_info`` (SGLang's per-request
    meta_info counts γ = 0 iterations of auto mode as failed drafts). None on a plain server."""
    m = (state or {}).get("metrics")
    if not m:
        return None
    return {
        "spec_iterations": m["iterations_spec"],
        "plain_iterations": m["iterations_plain"],
        "drafted": m["drafted"],
        "accepted": m["accepted"],
    }


def _first_sample(summary: Summary) -> str:
    if not summary.out_dir:
        return ""
    line = (Path(summary.out_dir) / "samples.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    return (
        f"Q: {rec['question'][:200]}\nA: {rec['response'][:600]}\n"
        f"(reference {rec['reference']}, graded {rec['correct']})"
    )


def report_rows(plain: Summary, eff: Summary, counters: dict | None) -> list[tuple[str, str, str]]:
    """The side-by-side table: (row name, plain, EFFROLLOUT)."""
    rows = [
        ("accuracy (mean@n)", f"{plain.accuracy:.3f}", f"{eff.accuracy:.3f}"),
        ("  last number if no box", f"{plain.accuracy_flexible:.3f}", f"{eff.accuracy_flexible:.3f}"),
        ("makespan (s)", f"{plain.makespan_s:.1f}", f"{eff.makespan_s:.1f}"),
        ("output tokens", str(plain.output_tokens), str(eff.output_tokens)),
        ("output tokens/s", f"{plain.output_tokens_per_s:.1f}", f"{eff.output_tokens_per_s:.1f}"),
        ("p50 latency (s)", f"{plain.latency_s.p50:.1f}", f"{eff.latency_s.p50:.1f}"),
    ]
    if counters and counters["drafted"]:
        spec_it, plain_it = counters["spec_iterations"], counters["plain_iterations"]
        rows.append(("iterations spec / plain", "-", f"{spec_it:.0f} / {plain_it:.0f}"))
        rows.append(("draft acceptance rate", "-", f"{counters['accepted'] / counters['drafted']:.3f}"))
    return rows


def write_report(out: Path, workload: str, rows: list[tuple[str, str, str]], speedup: float, sample: str) -> Path:
    """``report.md``: the workload, the side-by-side table and one EFFROLLOUT sample."""
    lines = [
        "# sglang-er demo: plain decoding vs EFFROLLOUT\n",
        f"Workload: {workload}.\n",
        "| | plain | EFFROLLOUT |",
        "|---|---|---|",
        *(f"| {name.strip()} | {a} | {b} |" for name, a, b in rows),
        f"| throughput ratio | | {speedup:.2f}x |",
        "\n## A sample from the EFFROLLOUT rollout\n",
        textwrap.indent(sample, "    "),
        f"\nThe same on the real 0.5B policy: `{REAL_MODEL_COMMAND}`",
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_dataset(dataset: str, questions: int) -> None:
    """Raise ValueError, before any server starts, when ``dataset`` cannot give ``questions`` questions."""
    available = len(load_problems(dataset))
    if questions > available:
        raise ValueError(
            f"--questions {questions}: {dataset!r} has {available} questions (for more, pass "
            "--dataset gsm8k with SGLANG_ER_DATA set, or --dataset PATH.jsonl)"
        )


def run(args: argparse.Namespace) -> int:
    if not have_math_verify():
        print(
            "[demo] math-verify is not installed: answers are graded by numeric comparison "
            "(pip install 'sglang-er[eval]' for math-verify)"
        )
    print(f"[demo] building model {args.model!r} ...", flush=True)
    path = build_model(args.model)
    print(f"[demo] model at {path}")
    spec = ["--speculative-algorithm", "EFFROLLOUT"]
    if args.gamma is not None:
        spec += ["--speculative-num-draft-tokens", str(args.gamma + 1)]
    plain, _ = _rollout(path, [], args, "plain")
    eff, counters = _rollout(path, spec, args, "effrollout")
    sample = _first_sample(eff)
    print("\n[demo] a sample from the EFFROLLOUT rollout:\n" + textwrap.indent(sample, "    "))
    rows = report_rows(plain, eff, counters)
    print("\n[demo] report (same prompts, same sampling settings, one server at a time)")
    print(f"    {'':<24}{'plain':>12}{'EFFROLLOUT':>14}")
    for name, a, b in rows:
        print(f"    {name:<24}{a:>12}{b:>14}")
    speedup = eff.output_tokens_per_s / max(plain.output_tokens_per_s, 1e-9)
    print(f"    {'throughput ratio':<24}{'':>12}{speedup:>13.2f}x")
    workload = (
        f"{args.questions} GSM8K questions x n={args.n}, temperature {args.temperature}, "
        f"max {args.max_tokens} tokens, model {Path(path).name}; one server at a time"
    )
    report = write_report(Path(args.out), workload, rows, speedup, sample)
    print(f"\n[demo] report: {report}; samples and summaries in {args.out}/<config>/")
    print("[demo] servers stopped cleanly")
    if args.model != REAL_MODEL:
        print(f"[demo] the same demo on the real 0.5B policy (Qwen2.5-0.5B-Instruct):\n    {REAL_MODEL_COMMAND}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sglang-er demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in model (see `sglang-er model`)")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--n", type=int, default=2, help="samples per question (GRPO group size)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--gamma", type=int, default=None, help="γ max (default: the server's, 8)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests in flight (default: all, like an RL rollout; torch_native attention on a "
        "CPU slows down past ~64)",
    )
    p.add_argument(
        "--dataset",
        default=SAMPLE,
        help=f"questions: {SAMPLE} (GSM8K's first 50 test questions, shipped with the package), "
        "gsm8k (needs SGLANG_ER_DATA) or PATH.jsonl",
    )
    p.add_argument("--out", default="eval/out/demo", help="where the report, samples and summaries go")
    args = p.parse_args(argv)
    try:
        check_dataset(args.dataset, args.questions)
    except ValueError as e:
        p.error(str(e))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
