"""The router setup's throughput: one EFFROLLOUT engine behind sglang-router against two.

    python -m eval.bench_router --model qwen2.5-0.5b-instruct [--requests 16] [--max-new-tokens 256]
        [--rounds 3] [--plain] [--fork-children] [--out eval/results/router-qwen2.5-0.5b.md]

Two EFFROLLOUT engines with their defaults (auto γ) and two routers: one over the first engine,
one over both (``--plain``: the same with two plain SGLang engines). Each round sends the same
``--requests`` concurrent greedy GSM8K chat requests through each router, in an order rotated
every round, and reports output tokens per second. Greedy to the model's own EOS: every
configuration decodes the same tokens. On a CPU each engine is bound to a core of its own
(``SGLANG_CPU_OMP_THREADS_BIND``), so two engines have twice the compute of one, as two GPUs
would; where engines share cores this measures the plumbing (routing, per-engine batches and γ).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import requests

from eval.bench_spec import gsm8k_chat_prompts
from eval.provenance import header, provenance
from eval.router import Router
from eval.spec_configs import cpu_bind
from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

ENGINE = ["--speculative-algorithm", "EFFROLLOUT", "--enable-metrics"]


def run_once(url: str, prompts: list[str], max_new_tokens: int) -> float:
    """Output tokens per second of one burst of concurrent requests through ``url``."""

    def one(p: str) -> int:
        body = {"text": p, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        r = requests.post(url + "/generate", json=body, timeout=900)
        r.raise_for_status()
        return len(r.json()["output_ids"])

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as ex:
        tokens = sum(ex.map(one, prompts))
    return tokens / (time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b-instruct")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most; requests end at the model's EOS")
    p.add_argument("--plain", action="store_true", help="also two plain SGLang engines behind their own routers")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-total-tokens", type=int, default=8192, help="KV pool of each engine")
    p.add_argument(
        "--fork-children",
        action="store_true",
        help="CPU: engines fork their scheduler and detokenizer instead of spawning them "
        "(sglang_er.launcher): ~0.7 GB less per child, so four engines fit side by side",
    )
    p.add_argument("--out", default=None, help="also write a markdown report here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.requests < 2:
        p.error("--rounds must be >= 1 and --requests >= 2")
    path = build_model(args.model)
    prompts = gsm8k_chat_prompts(path, args.requests)
    kinds = {"EFFROLLOUT": ENGINE, **({"plain": ["--enable-metrics"]} if args.plain else {})}
    names = [f"{k}, {n}" for k in kinds for n in ("one engine", "two engines")]
    tps: dict[str, list[float]] = {n: [] for n in names}
    with ExitStack() as stack:
        engines, routers = {}, {}
        for kind, flags in kinds.items():
            engines[kind] = [
                stack.enter_context(
                    Server(
                        path,
                        flags,
                        env=cpu_bind([i]),
                        max_total_tokens=args.max_total_tokens,
                        stop_grace=1.0,
                        fork_children=args.fork_children,
                    )
                )
                for i in range(2)
            ]
            routers[f"{kind}, one engine"] = stack.enter_context(Router([engines[kind][0].url]))
            routers[f"{kind}, two engines"] = stack.enter_context(Router([e.url for e in engines[kind]]))
        for r in routers.values():  # warm-up: the first forwards of each engine, not measured
            run_once(r.url, prompts[:2], 8)
        for k in range(args.rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                tps[name].append(run_once(routers[name].url, prompts, args.max_new_tokens))
                print(f"round {k + 1} {name}: {tps[name][-1]:.1f} tok/s", flush=True)
        states = [e.effrollout_state() for e in engines["EFFROLLOUT"]]

    def paired(a: str, b: str) -> str:
        rr = [y / x for x, y in zip(tps[a], tps[b])]
        return (
            f"{b} / {a}, paired by round: {', '.join(f'{r:.2f}x' for r in rr)}; "
            f"median {statistics.median(rr):.2f}x [{min(rr):.2f}–{max(rr):.2f}]"
        )

    lines = [
        "| configuration | output tok/s per round | median |",
        "|---|---|---|",
        *(f"| {n} | {', '.join(f'{x:.1f}' for x in tps[n])} | {statistics.median(tps[n]):.1f} |" for n in names),
        "",
        *(paired(f"{k}, one engine", f"{k}, two engines") + "  " for k in kinds),
        *(paired(f"plain, {n}", f"EFFROLLOUT, {n}") + "  " for n in ("one engine", "two engines") if args.plain),
        "",
        "| engine | decode iterations (spec / plain) | largest batch seen | acceptance |",
        "|---|---|---|---|",
    ]
    for i, st in enumerate(states):
        m = st["metrics"]
        acc = f"{m['accepted'] / m['drafted']:.2f}" if m["drafted"] else "–"
        biggest = max((r["batch_size"] for r in st["timeline"]), default=0)
        lines.append(f"| {i} | {m['iterations_spec']} / {m['iterations_plain']} | {biggest} | {acc} |")
    print("\n".join(lines))
    if args.out:
        meta = provenance(
            f"{args.model} ({path.name})",
            rounds=args.rounds,
            workload=f"{args.requests} concurrent greedy GSM8K chat requests, at most {args.max_new_tokens} "
            "tokens each, to the model's own EOS"
            + ("; every engine's scheduler forked, not spawned (memory)" if args.fork_children else ""),
        )
        Path(args.out).write_text(
            "# Two EFFROLLOUT engines behind sglang-router against one\n\n"
            + header(meta)
            + "\n\n"
            + "\n".join(lines)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
