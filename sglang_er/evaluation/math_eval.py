"""Math eval harness: drive a running SGLang server over HTTP the way an RL framework does, grade
with math-verify, and report accuracy, latency, throughput and speculative acceptance.

    sglang-er eval --base-url http://127.0.0.1:30000 --dataset gsm8k --n 4 --limit 100 \\
        --temperature 1.0 --max-tokens 1024 --concurrency 64 --out eval/out/gsm8k

(also ``python -m sglang_er.evaluation.math_eval``, and ``python -m eval.math_eval`` in a checkout).
Without math-verify installed (``pip install 'sglang-er[eval]'``) answers are compared numerically,
then as normalized strings: enough for GSM8K, weaker on MATH-500's symbolic answers.

Each question gets the instruction "Please reason step by step, and put your final answer within
\\boxed{}."; the last ``\\boxed{}`` of a response is its answer.

APIs (``--api``):
  openai  ``/v1/chat/completions`` (``--chat``, the server applies the chat template) or
          ``/v1/completions`` (``--no-chat``, raw prompt). SGLang's extension fields are requested:
          ``return_spec_tokens_details`` (both endpoints: ``sglext.spec_tokens_details`` on the
          response, one entry per choice when n > 1) and ``return_meta_info`` (chat only: the full
          per-choice ``meta_info``). ``--no-sglext`` leaves them out for other servers.
  native  SGLang's ``/generate`` (``return_logprob=False``); with ``--chat`` the chat template is
          applied client-side by the tokenizer at ``GET /model_info``'s path and ``input_ids`` are
          sent. ``meta_info`` (token counts, ``spec_*``) comes back with every sample.

Samples per prompt (``--n-mode``): ``separate`` sends n independent n=1 requests (as slime and
verl's agent loop do), ``batched`` one request with ``n``. Latency percentiles are per request.

Outputs (``--out DIR``): ``samples.jsonl`` (one line per sample, written as they complete) and
``summary.json``; a table is printed. Python API: ``run_eval(EvalConfig(...)) -> Summary``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from sglang_er.evaluation.records import EvalConfig, EvalError
from sglang_er.evaluation.report import format_table
from sglang_er.evaluation.runner import run_eval

DEFAULT_OUT_ROOT = Path("eval") / "out"  # relative to the working directory (the checkout's eval/out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sglang-er eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = EvalConfig()
    p.add_argument("--base-url", default=d.base_url)
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="gsm8k-sample (ships with the package) | gsm8k | math500 "
        "(from $SGLANG_ER_DATA) | PATH.jsonl | hf:NAME[:CONFIG]:SPLIT",
    )
    p.add_argument("--question-field", default=None, help="default: question or problem")
    p.add_argument("--answer-field", default=None, help="default: answer or solution")
    p.add_argument("--limit", type=int, default=None, help="first N problems (random N with --shuffle)")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--n", type=int, default=d.n, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="per-sample sampling seed base (SGLang sampling_seed; not every sampling backend takes one)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=d.chat,
        help="chat template (/v1/chat/completions) or raw prompt (/v1/completions)",
    )
    p.add_argument("--model", default=None, help="OpenAI model name (default: the server's)")
    p.add_argument("--api", choices=["openai", "native"], default=d.api)
    p.add_argument("--n-mode", choices=["separate", "batched"], default=d.n_mode)
    p.add_argument(
        "--no-sglext",
        dest="sglext",
        action="store_false",
        help="do not request SGLang's extension fields (spec stats, meta_info)",
    )
    p.add_argument("--tokenizer", default=None, help="native API + chat: tokenizer path")
    p.add_argument("--instruction", default=d.instruction, help="appended to every question ('' for none)")
    p.add_argument("--k", dest="ks", type=int, nargs="+", default=None, help="pass@k / maj@k values")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout)
    p.add_argument("--retries", type=int, default=d.retries)
    p.add_argument("--out", default=None, help=f"output directory (default: {DEFAULT_OUT_ROOT}/<dataset>-<time>)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        tag = Path(args.dataset.split(":", 1)[-1] if args.dataset.startswith("hf:") else args.dataset).stem
        tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag)
        args.out = str(DEFAULT_OUT_ROOT / f"math-{tag}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    try:
        cfg = EvalConfig(**vars(args))
        summary = run_eval(cfg)
    except Exception as e:
        if not isinstance(e, (EvalError, ValueError, OSError)):
            raise
        print(f"math_eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
