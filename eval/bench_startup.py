"""Foundation figures: server cold start and plain AR decode throughput (not a test).

    python -m eval.bench_startup [--models tiny qwen2-0.5b] [--batches 1 4 16 64] [--new-tokens 128]

Cold start = process spawn until /health answers. Throughput = total new tokens / wall time for B
concurrent /generate requests of ``new_tokens`` each (ignore_eos), after one warm-up request.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

PROMPT = "Alice has 12 apples. She buys 7 more. Then she makes 3 times as many. How many apples"


def decode_throughput(srv: Server, batch: int, new_tokens: int) -> float:
    def one(i):
        return srv.generate(f"{i}: {PROMPT}", max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as ex:
        outs = list(ex.map(one, range(batch)))
    dt = time.perf_counter() - t0
    return sum(o["meta_info"]["completion_tokens"] for o in outs) / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["tiny", "qwen2-0.5b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    for name in args.models:
        path = build_model(name)
        with Server(path, max_total_tokens=32768) as srv:
            print(f"{name}: cold start {srv.startup_seconds:.1f} s", flush=True)
            srv.generate(PROMPT, max_new_tokens=8, temperature=0)
            for b in args.batches:
                tps = decode_throughput(srv, b, args.new_tokens)
                print(f"{name}: batch {b:3d}  {tps:7.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
