"""Cost of the auto policy's per-iteration work, without an engine (not a test).

    python -m eval.bench_decision [--model qwen2-0.5b] [--batches 1 16 64 256]

Times what the worker adds to every decode iteration in auto mode: ``Policy.choose`` (cost model
for γ ∈ {0} ∪ 1..γmax, acceptance model, hysteresis) and the feedback after it (live correction
of the cost model from the measured phase times, acceptance update), with GRPO-like prefix
groups (n = 8 samples per prompt). Target: ≤ 50 µs per iteration.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from sglang_er.calibration import builtin_profile
from sglang_er.models.factory import build_model
from sglang_er.policy import AcceptanceModel, CostModel, ModelCost, Policy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-0.5b")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--gamma-max", type=int, default=7)
    p.add_argument("--iterations", type=int, default=2000)
    args = p.parse_args(argv)
    cfg = json.loads((build_model(args.model) / "config.json").read_text())
    rng = random.Random(0)
    print(f"auto-policy overhead per decode iteration ({args.model}, γ ladder 1..{args.gamma_max})")
    for b in args.batches:
        cost = CostModel(builtin_profile("cpu"), ModelCost.from_config(cfg), attention_backend="torch_native")
        acc = AcceptanceModel(args.gamma_max)
        pol = Policy(cost, acc, ladder=list(range(1, args.gamma_max + 1)))
        seq = [rng.randint(100, 1000) for _ in range(b)]
        rids = list(range(b))
        groups = [(80, list(range(i, min(i + 8, b)))) for i in range(0, b, 8)] if b >= 8 else None
        t_choose = t_observe = 0.0
        for it in range(args.iterations):
            seq = [s + 1 for s in seq]
            t0 = time.perf_counter()
            d = pol.choose(seq, groups, rids)
            t1 = time.perf_counter()
            if d.gamma:
                cost.observe("draft", seq, d.gamma, 0.02 * d.gamma)
                cost.observe("verify", seq, d.gamma, 0.09)
                acc.observe(d.gamma, [rng.randint(0, d.gamma) for _ in range(b)], rids)
            else:
                cost.observe("plain", seq, 0, 0.09)
            cost.observe_outside(d.gamma, b, 0.002 + 1e-5 * b)
            t2 = time.perf_counter()
            t_choose += t1 - t0
            t_observe += t2 - t1
        n = args.iterations
        print(f"B={b:4d}: choose {t_choose / n * 1e6:7.1f} µs + feedback {t_observe / n * 1e6:7.1f} µs "
              f"= {(t_choose + t_observe) / n * 1e6:7.1f} µs per iteration")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
