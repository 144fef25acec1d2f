"""The README's first command: a short RL-shaped math rollout, plain decoding vs EFFROLLOUT.

``python -m sglang_er.demo [--model smollm2-135m-instruct] [--questions 8] [--n 2] [--max-tokens 192]``

Builds the model (SmolLM2-135M-Instruct from the package registry by default; ``--model tiny``
for a random-weight smoke run), then for each of plain decoding and EFFROLLOUT: starts an SGLang
server, sends the same GSM8K chat prompts (n samples each, temperature 1.0) over the
OpenAI-compatible API, stops the server. Prints sample reasoning, accuracy, makespan, tokens/s,
acceptance, and the speed-up side by side.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from sglang_er.launcher import Server
from sglang_er.models.factory import build_model


def _rollout(model_path, server_args: list[str], args, label: str):
    try:
        from eval.math_eval import run_eval
        from eval.rollout_bench import TimelinePoller
    except ImportError as e:  # eval/ lives beside the package in the checkout
        raise RuntimeError(f"the demo needs the checkout's eval/ package (run it from the repo root): {e}") from None
    print(f"\n[demo] {label}: starting SGLang ({' '.join(server_args) or 'plain decoding'}) ...", flush=True)
    with Server(model_path, [*server_args, "--enable-metrics"], max_total_tokens=32768, stop_grace=1.0) as srv:
        print(f"[demo] {label}: healthy after {srv.startup_seconds:.0f}s; rollout of {args.questions} GSM8K "
              f"questions x n={args.n}, temperature {args.temperature}, max {args.max_tokens} tokens", flush=True)
        with TimelinePoller(srv.url) as poll:
            summary = run_eval(
                base_url=srv.url, dataset="gsm8k", limit=args.questions, n=args.n, temperature=args.temperature,
                max_tokens=args.max_tokens, concurrency=args.concurrency or args.questions * args.n, chat=True,
                out=f"{args.out}/{label}", progress=False,
            )
        counters = _speculation_counters(srv.url) if server_args else None
    return summary, counters, _as_rollout(label, summary, poll)


def _as_rollout(label: str, summary, poll):
    """The eval's samples and the worker's timeline in the rollout benchmark's shape (for plots)."""
    import json
    from pathlib import Path

    from eval.rollout_bench import Rollout

    recs = [json.loads(line) for line in (Path(summary.out_dir) / "samples.jsonl").read_text().splitlines()]
    reqs = [{"t_send": r["t_send"], "t_done": r["t_send"] + r["latency_s"], "tokens": r["completion_tokens"] or 0,
             "finish": r["finish_reason"]} for r in recs if r.get("t_send") is not None]
    t0 = min(r["t_send"] for r in reqs)
    ro = Rollout(label, 0, summary.makespan_s, summary.output_tokens, reqs,
                 [x for _, x in sorted(poll.records.items()) if x["time"] >= t0])
    before, after = (poll.start_state or {}).get("metrics"), (poll.end_state or {}).get("metrics")
    if before and after and after["drafted"] > before["drafted"]:
        ro.extra["drafted"] = after["drafted"] - before["drafted"]
        ro.extra["accepted"] = after["accepted"] - before["accepted"]
        ro.accept_rate = ro.extra["accepted"] / ro.extra["drafted"]
        ro.position_acceptance = after["position_acceptance"]
    return ro


def _speculation_counters(url: str) -> dict:
    """Exact server-side counts from the worker (SGLang's per-request meta_info counts γ = 0
    iterations of the auto policy as failed drafts)."""
    from eval.bench_spec import scrape

    m = scrape(url)
    get = lambda name, labels="": m.get((name, labels), 0.0)  # noqa: E731
    return {
        "spec_iterations": get("sglang_er:iterations", 'mode="spec"'),
        "plain_iterations": get("sglang_er:iterations", 'mode="plain"'),
        "drafted": get("sglang_er:drafted_tokens"),
        "accepted": get("sglang_er:accepted_tokens"),
    }


def _first_sample(summary) -> str:
    if not summary.out_dir:
        return ""
    import json
    from pathlib import Path

    line = (Path(summary.out_dir) / "samples.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    return f"Q: {rec['question'][:200]}\nA: {rec['response'][:600]}\n(reference {rec['reference']}, graded {rec['correct']})"


def run(args) -> int:
    print(f"[demo] building model {args.model!r} ...", flush=True)
    path = build_model(args.model)
    print(f"[demo] model at {path}")
    spec = ["--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", str(args.gamma + 1)]
    plain, _, plain_ro = _rollout(path, [], args, "plain")
    eff, counters, eff_ro = _rollout(path, spec, args, "effrollout")
    print("\n[demo] a sample from the EFFROLLOUT rollout:\n" + textwrap.indent(_first_sample(eff), "    "))
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
    print("\n[demo] report (same prompts, same sampling settings, one server at a time)")
    print(f"    {'':<24}{'plain':>12}{'EFFROLLOUT':>14}")
    for name, a, b in rows:
        print(f"    {name:<24}{a:>12}{b:>14}")
    speedup = eff.output_tokens_per_s / max(plain.output_tokens_per_s, 1e-9)
    print(f"    {'throughput ratio':<24}{'':>12}{speedup:>13.2f}x")
    from pathlib import Path

    from eval.report import write_rollout_report

    workload = (f"{args.questions} GSM8K questions x n={args.n}, temperature {args.temperature}, "
                f"max {args.max_tokens} tokens, model {Path(path).name}; one server at a time")
    write_rollout_report([plain_ro, eff_ro], Path(args.out), workload)
    table = ["\n## Accuracy and speed, side by side\n", "| | plain | EFFROLLOUT |", "|---|---|---|",
             *(f"| {name.strip()} | {a} | {b} |" for name, a, b in rows), f"| throughput ratio | | {speedup:.2f}x |"]
    with open(Path(args.out) / "report.md", "a") as f:
        f.write("\n".join(table) + "\n")
    print(f"\n[demo] report and plots: {args.out}/report.md, throughput.png, timeline.png (active requests "
          f"and γ over time), latency_cdf.png, acceptance.png; samples in {args.out}/<config>/samples.jsonl")
    print("[demo] servers stopped cleanly")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sglang-er demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in model (see `sglang-er model`)")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--n", type=int, default=2, help="samples per question (GRPO group size)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--gamma", type=int, default=4, help="draft length γ")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight (default: all, like an RL rollout; torch_native attention on a "
                        "CPU slows down past ~64)")
    p.add_argument("--out", default="eval/out/demo", help="where the report, plots, samples and summaries go")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
