"""Cost of auto mode's per-iteration work (the γ choice), without an engine (not a test).

    python -m eval.bench_decision [--model qwen2-0.5b] [--batches 1 4 16 64 256] [--history]

Times what the worker adds to every decode iteration in auto mode, through the worker's own
adapter (:class:`sglang_er.gamma.controller.Controller`) on a stand-in batch (sequence lengths as a
CPU tensor, requests with ids and prompts: GRPO-like groups of n = 8 samples per prompt):
``choose`` (batch summary, cost model for γ ∈ {0} ∪ 1..γmax, acceptance model, hysteresis,
exploration) and the feedback after it (live correction from the measured phase times,
acceptance update, scheduler time). Target: ≤ 50 µs per iteration.

``--history`` also times the history drafts' upkeep (:class:`sglang_er.history.proposer.HistoryProposer`
``sync`` + ``plan``) in W4 iterations of γ = 7 where the W4 drafter (α 0.96) out-drafts history,
each request committing 7 tokens of phrase-reusing text per iteration.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from types import SimpleNamespace

import torch

from sglang_er.engine import batch as batch_view
from sglang_er.gamma.builtin_profiles import builtin_profile
from sglang_er.gamma.controller import Controller
from sglang_er.models.factory import build_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-0.5b")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    p.add_argument("--gamma-max", type=int, default=7)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument(
        "--profiles",
        nargs="+",
        default=["cpu", "h100"],
        help="built-in hardware profiles: on 'cpu' a 0.5B model is compute-bound from B≈16 "
        "(the γ chooser decodes plainly), on 'h100' it speculates at every B",
    )
    p.add_argument("--history", action="store_true", help="also time the history drafts' upkeep")
    args = p.parse_args(argv)
    cfg = json.loads((build_model(args.model) / "config.json").read_text())
    rng = random.Random(0)
    for prof in args.profiles:
        print(f"auto-mode overhead per decode iteration ({args.model}, γ ladder 1..{args.gamma_max}, profile {prof})")
        for b in args.batches:
            _bench(cfg, builtin_profile(prof), b, args, rng)
    if args.history:
        print("history drafts' upkeep per W4 iteration (γ = 7, 7 tokens committed per request)")
        for b in args.batches:
            _bench_history(b, rng)
    return 0


def _bench_history(b: int, rng, iterations: int = 100, warm: int = 40) -> None:
    from sglang_er.history.proposer import HistoryProposer

    phrases = [[rng.randrange(4096) for _ in range(rng.randint(3, 12))] for _ in range(300)]

    def text():
        while True:
            yield from (rng.choice(phrases[:60]) if rng.random() < 0.7 else rng.choice(phrases))

    w4 = [1 + sum(0.96**k for k in range(1, g + 1)) for g in range(8)]
    hd = HistoryProposer(gamma_max=7)
    prompts = [[rng.randrange(4096) for _ in range(80)] for _ in range(-(-b // 8))]
    reqs = [
        SimpleNamespace(rid=f"r{i}", origin_input_ids=prompts[i // 8], output_ids=[], text=text()) for i in range(b)
    ]
    spent = 0.0
    for it in range(iterations):
        for r in reqs:
            r.output_ids += [next(r.text) for _ in range(7)]
        t0 = time.perf_counter()
        hd.propose(reqs, 7, w4)
        if it >= warm:
            spent += time.perf_counter() - t0
    print(
        f"B={b:4d}: {spent / (iterations - warm) * 1e6:7.0f} µs per iteration "
        f"({hd.lookups} lookups, {hd.skipped_lookups} iterations without)"
    )


def _bench(cfg, profile, b, args, rng) -> None:
    """Controller.choose + its feedback on a stand-in batch of b requests, averaged."""
    ctl = Controller(cfg, args.gamma_max, torch.device("cpu"), "torch_native", profile=profile)
    prompts = [[rng.randrange(1000) for _ in range(80)] for _ in range(-(-b // 8))]
    reqs = [SimpleNamespace(rid=f"r{i}", origin_input_ids=prompts[i // 8]) for i in range(b)]
    seq = torch.tensor([rng.randint(100, 1000) for _ in range(b)])
    rids = [r.rid for r in reqs]  # the worker's reads of the batch (engine.batch), here on stand-ins

    def keys():
        return [batch_view.prompt_key(r) for r in reqs]

    t_choose = t_observe = 0.0
    n_spec = 0
    for it in range(args.iterations):
        seq += 1
        accepted = torch.randint(0, 8, (b,))
        t0 = time.perf_counter()
        g = ctl.choose(seq.tolist(), rids, keys)
        t1 = time.perf_counter()
        if g:
            n_spec += 1
            ctl.observe(g, {"draft": 0.002 * g, "verify": 0.095}, accepted.clamp(max=g))
        else:
            ctl.observe(0, {"plain": 0.09})
        ctl.observe_outside(g, b, 0.002 + 1e-5 * b)
        t2 = time.perf_counter()
        t_choose += t1 - t0
        t_observe += t2 - t1
    n = args.iterations
    print(
        f"B={b:4d}: choose {t_choose / n * 1e6:7.1f} µs + feedback {t_observe / n * 1e6:7.1f} µs "
        f"= {(t_choose + t_observe) / n * 1e6:7.1f} µs per iteration ({n_spec / n:.0%} speculating)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
