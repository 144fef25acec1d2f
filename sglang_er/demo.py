"""The README's first command: build a model, start SGLang on it, send OpenAI-style requests, report.

``python -m sglang_er.demo [--model tiny] [--spec EFFROLLOUT]``
"""

from __future__ import annotations

import argparse
import sys
import time

import requests

from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

PROMPTS = [
    "Alice has 12 apples. She buys 7 more. How many apples does she have?",
    "Solve for x: 3x + 5 = 20.",
]


def _timed_post(url: str, payload: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = requests.post(url, json=payload, timeout=600)
    r.raise_for_status()
    return r.json(), time.perf_counter() - t0


def run(model: str, server_args: list[str]) -> int:
    print(f"[demo] building model {model!r} ...", flush=True)
    path = build_model(model)
    print(f"[demo] model at {path}")
    print(f"[demo] starting SGLang server {' '.join(server_args) or '(plain decoding)'} ...", flush=True)
    with Server(path, server_args) as srv:
        print(f"[demo] server healthy after {srv.startup_seconds:.1f}s at {srv.url}")
        for prompt in PROMPTS:
            out, dt = _timed_post(srv.url + "/v1/completions", {
                "model": "default", "prompt": prompt, "max_tokens": 48, "temperature": 0})
            toks = out["usage"]["completion_tokens"]
            print(f"\n[completions] {prompt!r}\n  -> {out['choices'][0]['text']!r}\n"
                  f"  {toks} tokens in {dt:.2f}s ({toks / dt:.1f} tok/s)")
        out, dt = _timed_post(srv.url + "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 48, "temperature": 1.0, "n": 4})
        toks = out["usage"]["completion_tokens"]
        print(f"\n[chat, n=4, temperature 1.0] {PROMPTS[0]!r}")
        for c in out["choices"]:
            print(f"  [{c['index']}] {c['message']['content']!r}")
        print(f"  {toks} tokens in {dt:.2f}s ({toks / dt:.1f} tok/s)")
    print("\n[demo] server stopped cleanly")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sglang-er demo", description=__doc__)
    p.add_argument("--model", default="tiny", help="built-in model name (see `sglang-er model`)")
    p.add_argument("--spec", default=None, help="speculative algorithm, e.g. EFFROLLOUT")
    args, server_args = p.parse_known_args(argv)
    if args.spec:
        server_args = ["--speculative-algorithm", args.spec, *server_args]
    return run(args.model, server_args)


if __name__ == "__main__":
    sys.exit(main())
