"""How long a policy update stalls the drafter: re-quantization time after a weight update.

    python -m eval.bench_requantize --model qwen2.5-0.5b-instruct [--updates 3] [--quant awq rtn]

For each quantizer, one EFFROLLOUT server with its defaults: a short warm-up (AWQ switches on from
the live statistics), then ``--updates`` times ``/update_weights_from_disk`` with the model's own
directory, the update path of an RL framework that writes checkpoints. The server's
``last_requantize_s`` after each update is the time the drafter took to follow the policy.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from eval.bench_spec import gsm8k_chat_prompts
from eval.provenance import header, provenance
from eval.spec_configs import AWQ_WARM
from sglang_er.launcher import Server
from sglang_er.models.factory import build_model


def measure(path: Path, quant: str, updates: int, prompts: list[str]) -> list[float]:
    env = {"SGLANG_ER_QUANT": quant, **(AWQ_WARM if quant == "awq" else {})}
    args = ["--speculative-algorithm", "EFFROLLOUT", "--enable-metrics"]
    with Server(path, args, env=env, max_total_tokens=16384, stop_grace=1.0) as srv:
        for p in prompts[:4]:  # warm-up: the traffic AWQ's statistics come from
            srv.generate(p, max_new_tokens=64, temperature=1.0)
        state = srv.effrollout_state()
        if quant == "awq" and not state["quantizer"].get("active"):
            raise SystemExit("AWQ did not switch on during the warm-up: raise the warm-up or use --quant rtn")
        times = []
        for _ in range(updates):
            srv.update_weights_from_disk(path)
            times.append(srv.effrollout_state()["last_requantize_s"])
        return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b-instruct")
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--quant", nargs="+", default=["awq", "rtn"], choices=["awq", "rtn"])
    p.add_argument("--out", default=None, help="also write a markdown report here")
    args = p.parse_args(argv)
    if args.updates < 1:
        p.error("--updates must be >= 1")
    path = build_model(args.model)
    prompts = gsm8k_chat_prompts(path, 8)
    lines = ["| quantizer | re-quantization s (each update) | median |", "|---|---|---|"]
    for q in args.quant:
        t = measure(path, q, args.updates, prompts)
        lines.append(f"| {q} | {', '.join(f'{x:.2f}' for x in t)} | {statistics.median(t):.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        meta = provenance(f"{args.model} ({path.name})", rounds=args.updates)
        Path(args.out).write_text(
            "# Drafter re-quantization after a weight update\n\n" + header(meta) + "\n\n" + "\n".join(lines) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
