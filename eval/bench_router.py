"""The router setup's throughput: one EFFROLLOUT engine behind sglang-router against two.

    python -m eval.bench_router --model smollm2-135m-instruct [--requests 16] [--max-new-tokens 64]
        [--rounds 3] [--out eval/results/router-smollm2-135m.md]

Two EFFROLLOUT engines with their defaults (auto γ) and two routers: one over the first engine,
one over both. Each round sends the same ``--requests`` concurrent greedy chat completions of fixed
length (``ignore_eos``: both configurations decode the same tokens) through each router, in an order
rotated every round, and reports output tokens per second. On a machine where the engines share
the same cores this measures the plumbing (routing, per-engine batches and γ), not scaling.
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
from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

ENGINE = ["--speculative-algorithm", "EFFROLLOUT", "--enable-metrics"]


def run_once(url: str, prompts: list[str], max_new_tokens: int) -> float:
    """Output tokens per second of one burst of concurrent requests through ``url``."""

    def one(p: str) -> int:
        body = {
            "text": p,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
        }
        r = requests.post(url + "/generate", json=body, timeout=900)
        r.raise_for_status()
        return len(r.json()["output_ids"])

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as ex:
        tokens = sum(ex.map(one, prompts))
    return tokens / (time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-total-tokens", type=int, default=8192, help="KV pool of each engine")
    p.add_argument("--out", default=None, help="also write a markdown report here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.requests < 2:
        p.error("--rounds must be >= 1 and --requests >= 2")
    path = build_model(args.model)
    prompts = gsm8k_chat_prompts(path, args.requests)
    names = ["one engine", "two engines"]
    tps: dict[str, list[float]] = {n: [] for n in names}
    with ExitStack() as stack:
        engines = [
            stack.enter_context(Server(path, ENGINE, max_total_tokens=args.max_total_tokens, stop_grace=1.0))
            for _ in range(2)
        ]
        routers = {
            "one engine": stack.enter_context(Router([engines[0].url])),
            "two engines": stack.enter_context(Router([e.url for e in engines])),
        }
        for r in routers.values():  # warm-up: the first forwards of each engine, not measured
            run_once(r.url, prompts[:2], 8)
        for k in range(args.rounds):
            for name in names if k % 2 == 0 else names[::-1]:
                tps[name].append(run_once(routers[name].url, prompts, args.max_new_tokens))
                print(f"round {k + 1} {name}: {tps[name][-1]:.1f} tok/s", flush=True)
        states = [e.effrollout_state() for e in engines]

    ratios = [b / a for a, b in zip(tps["one engine"], tps["two engines"])]
    lines = [
        "| configuration | output tok/s per round | median |",
        "|---|---|---|",
        *(f"| {n} | {', '.join(f'{x:.1f}' for x in tps[n])} | {statistics.median(tps[n]):.1f} |" for n in names),
        "",
        f"two engines / one engine, paired by round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f}x [{min(ratios):.2f}–{max(ratios):.2f}]",
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
            workload=f"{args.requests} concurrent greedy chat requests × {args.max_new_tokens} tokens (ignore_eos)",
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
