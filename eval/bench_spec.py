"""EFFROLLOUT vs plain decoding, side by side in one run (not a test).

    python -m eval.bench_spec --model qwen2.5-0.5b-instruct --batches 1 2 4 8 16 32 --gammas 2 3 4 6 8 \
        --temperatures 0 1 --new-tokens 256 --auto --repeats 3 [--draft-heads shared w8 w4] [--quant awq rtn]

Configurations: the plain SGLang server, EFFROLLOUT with γ fixed to 0 (plain decode through
the worker: measures T_T), each fixed γ, auto, hybrid. Their servers are all up at once and are
measured in interleaved rounds (see :func:`measure`; ``--one-at-a-time`` for little memory).
For every batch size B and temperature, B concurrent GSM8K chat requests of at most
``new_tokens`` tokens each are timed; they end at the model's own EOS. ``--ignore-eos`` makes
every request generate ``new_tokens`` (text past a model's EOS is easy to predict and flatters
speculation): the report's header says so, and each cell counts the tokens generated past EOS.
The worker's phase timers on ``/metrics`` give T_D (one draft step), T_V (one verify) and T_T
(one plain step), and its counters the acceptance; from them each fixed γ's physical bound
E[L|γ] / (γ·r + v), r = T_D/T_T, v = T_V/T_T, is printed beside its measured speed-up.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from eval.provenance import provenance
from eval.spec_configs import configurations, parser
from eval.spec_report import dump, load, report
from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let's think step by step."
)

_METRIC = re.compile(r"^(sglang_er:\w+?)(?:_total)?(?:\{([^}]*)\})? ([0-9.eE+-]+)$")


def scrape(url: str) -> dict:
    out: dict = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# --json-schema: every request answers in this JSON object (SGLang's constrained decoding)
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "answer": {"type": "number"}},
    "required": ["reasoning", "answer"],
}
ANSWER_IN_JSON = ' Answer with a JSON object {"reasoning": "...", "answer": <number>}.'
ANSWER_BOXED = " Please reason step by step, and put your final answer within \\boxed{}."


def gsm8k_chat_prompts(model_path, k: int = 64, instruction: str = ANSWER_BOXED) -> list[str]:
    """GSM8K test questions in the model's chat template: realistic acceptance for a real model."""
    from transformers import AutoTokenizer

    from eval.math_data import load_problems

    tok = AutoTokenizer.from_pretrained(model_path)
    items = load_problems("gsm8k", limit=k)
    return [
        tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": it.question + instruction,
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for it in items
    ]


def eos_ids(model_path) -> set[int]:
    """The ids the model ends a response with (config.json and generation_config.json)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        f = Path(model_path) / name
        if f.exists():
            v = json.loads(f.read_text()).get("eos_token_id")
            ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    return ids


def past_eos(output_ids: list[int], eos: set[int]) -> int:
    """Tokens generated after the first EOS (0 when none): text a natural-EOS run never produces."""
    for i, t in enumerate(output_ids):
        if t in eos:
            return len(output_ids) - i - 1
    return 0


def run_batch(
    srv: Server,
    batch: int,
    new_tokens: int,
    temperature: float,
    gamma: int,
    prompts=None,
    ignore_eos: bool = False,
    eos: set[int] = frozenset(),
    constraint: dict | None = None,
) -> dict:
    def one(i):
        text = prompts[i % len(prompts)] if prompts else f"[{i}] {PROMPT}"
        return srv.generate(
            text, max_new_tokens=new_tokens, temperature=temperature, ignore_eos=ignore_eos, **(constraint or {})
        )

    before = scrape(srv.url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as ex:
        outs = list(ex.map(one, range(batch)))
    dt = time.perf_counter() - t0
    d = delta(scrape(srv.url), before)
    toks = sum(o["meta_info"]["completion_tokens"] for o in outs)
    beyond = sum(past_eos(o.get("output_ids") or [], eos) for o in outs) if ignore_eos else 0

    def per_call(phase):
        calls = d.get(("sglang_er:phase_calls", f'phase="{phase}"'), 0.0)
        return d.get(("sglang_er:phase_seconds", f'phase="{phase}"'), 0.0) / calls if calls else None

    drafted, accepted = d.get(("sglang_er:drafted_tokens", ""), 0.0), d.get(("sglang_er:accepted_tokens", ""), 0.0)
    verified = drafted / gamma if gamma else 0.0  # request-iterations that were verified
    spec_it = d.get(("sglang_er:iterations", 'mode="spec"'), 0.0)
    plain_it = d.get(("sglang_er:iterations", 'mode="plain"'), 0.0)
    pos = [
        (
            d.get(("sglang_er:position_accepted", f'position="{k}"'), 0.0),
            d.get(("sglang_er:position_proposed", f'position="{k}"'), 0.0),
        )
        for k in range(gamma)
    ]
    return {
        "spec_share": spec_it / (spec_it + plain_it) if spec_it + plain_it else None,
        "tok_s": toks / dt,
        "tokens": toks,
        "tokens_past_eos": beyond,
        "t_plain": per_call("plain"),
        "t_draft_step": per_call("draft_step"),
        "t_verify": per_call("verify"),
        "accept_rate": accepted / drafted if drafted else None,
        "accept_length": 1 + accepted / verified if verified else None,  # tokens per verify, bonus included
        # α_k = P(draft k accepted | drafts 0..k-1 accepted); the counters hold P(accept_len > k)
        "position_acceptance": [
            round(a / prev, 3) if prev else None
            for (a, _), prev in zip(pos, [p for _, p in pos[:1]] + [a for a, _ in pos[:-1]])
        ]
        or None,
    }


def _warm(srv: Server, name: str, prompts) -> None:
    for i in range(8):  # warm-up; also the traffic the AWQ statistics start from
        srv.generate(prompts[-1 - i] if prompts else f"[{i}] {PROMPT}", max_new_tokens=16, temperature=0)
    state = srv.effrollout_state()
    if state:
        print(f"{name}: drafter {state['quantizer']}, head {state['draft_head']}", flush=True)


def measure(configs: list, args, prompts, path) -> tuple[dict, dict]:
    """tok/s and phase timings of every (config, T, B) cell, the median of its repeats.

    Interleaved (default): every configuration's server is up at once -- an idle server sleeps
    (``sleep_on_idle``), so it takes no core from the one being measured -- and each round of a
    (T, B) cell runs every configuration once, in an order rotated between rounds. This
    machine's throughput drifts by 10-20% over minutes, while two servers of one configuration
    measured alternately agree within ~3%: alternating puts the drift into every configuration
    alike instead of into their ratios. Each server first runs a short untimed batch of every new
    size B (its first batch of a size ran 20-37% slower at B = 64). Memory is the price: five
    Qwen2-0.5B servers at B = 64 (~4.7 GB each at peak) overran 24 GiB: a fixed γ that fell
    below ``--contender-ratio`` of the best at the previous batch size runs once (see ``wanted``),
    and in the last cell those run first and their servers stop; ``--one-at-a-time`` runs the
    servers in turn.
    """
    results: dict = {}
    model_errors: dict = {}
    names = [c[0] for c in configs]

    def open_server(stack, name, extra, env):
        srv = stack.enter_context(
            Server(
                path,
                ["--dtype", args.dtype, "--enable-metrics", *extra],
                env=env,
                max_total_tokens=args.max_total_tokens,
                stop_grace=1.0,
                fork_children=args.fork_children,
            )
        )
        _warm(srv, name, prompts)
        return srv

    def cell(srv, name, gamma, temp, b, runs):
        runs.append(
            run_batch(srv, b, args.new_tokens, temp, gamma, prompts, args.ignore_eos, args.eos, args.constraint)
        )

    def keep(name, temp, b, runs):
        r = sorted(runs, key=lambda x: x["tok_s"])[(len(runs) - 1) // 2]  # the median run, whole
        r["tok_s_runs"] = [round(x["tok_s"], 2) for x in runs]
        results[(name, temp, b)] = r
        dump(args.json, results, model_errors, args.meta)
        print(
            f"{args.model} {name:>8} T={temp:g} B={b:3d}: {r['tok_s']:7.1f} tok/s  "
            + "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in r.items()
                if k not in ("tok_s", "tok_s_runs") and v is not None
            )
            + (f"  runs={r['tok_s_runs']}" if len(runs) > 1 else ""),
            flush=True,
        )

    def model_error(srv, name):
        policy = (srv.effrollout_state() or {}).get("policy") or {}
        if policy.get("model_error"):  # auto: the live cost model's error over this whole sweep
            model_errors[name] = policy["model_error"]
            print(
                f"{name}: cost model mean |predicted - measured| / measured per phase (profile alone -> "
                "live-corrected): "
                + ", ".join(
                    f"{ph} {e['mean_rel_err_raw']:.1%} -> {e['mean_rel_err_corrected']:.1%} (n={e['n']})"
                    for ph, e in policy["model_error"].items()
                    if e.get("n")
                ),
                flush=True,
            )

    def reps(b):
        return args.repeats if args.repeat_batches is None or b in args.repeat_batches else 1

    if args.one_at_a_time:
        for name, gamma, extra, env in configs:
            with contextlib.ExitStack() as stack:
                srv = open_server(stack, name, extra, env)
                for temp in args.temperatures:
                    for b in args.batches:
                        runs: list = []
                        run_batch(srv, b, 8, temp, gamma, prompts, True)  # untimed, as below
                        for _ in range(reps(b)):
                            cell(srv, name, gamma, temp, b, runs)
                        keep(name, temp, b, runs)
                model_error(srv, name)
        return results, model_errors

    def wanted(temp, b, prev_b):
        """Runs per configuration at (T, B): ``reps(b)``, but one for a fixed γ that reached less
        than ``--contender-ratio`` of the best at the previous batch size (past its crossover a
        fixed γ only falls further behind; its repeats would cost most of a large-B cell)."""
        n_runs = {n: reps(b) for n in names}
        if prev_b is not None and args.contender_ratio:
            best = max(results[(n, temp, prev_b)]["tok_s"] for n in names)
            for n in names:
                if (
                    n.startswith("gamma=")
                    and n != "gamma=0"
                    and results[(n, temp, prev_b)]["tok_s"] < args.contender_ratio * best
                ):
                    n_runs[n] = 1
        return n_runs

    with contextlib.ExitStack() as stack:
        servers = {name: (open_server(stack, name, extra, env), gamma) for name, gamma, extra, env in configs}
        stopped: set = set()
        for temp in args.temperatures:
            prev_b = None
            for b in args.batches:
                n_runs = wanted(temp, b, prev_b)
                final = (temp, b) == (args.temperatures[-1], args.batches[-1])
                runs = {n: [] for n in names}
                # the last cell's single-run configurations go first, one server at a time, and
                # stop: a server keeps its peak memory, and five at B = 64 overran 24 GiB
                singles = [n for n in names if final and n_runs[n] < reps(b)]
                for n in singles + [n for n in names if n not in singles]:
                    # untimed: a server's first batch of a new size runs 20-37% slower
                    run_batch(servers[n][0], b, 8, temp, servers[n][1], prompts, True)
                    if n in singles:
                        cell(servers[n][0], n, servers[n][1], temp, b, runs[n])
                        servers[n][0].stop()
                        stopped.add(n)
                for r in range(max(n_runs.values())):
                    k = r % len(names)
                    for n in names[k:] + names[:k]:
                        if len(runs[n]) < n_runs[n]:
                            cell(servers[n][0], n, servers[n][1], temp, b, runs[n])
                for n in names:
                    keep(n, temp, b, runs[n])
                prev_b = b
        for n in names:
            if n not in stopped:
                model_error(servers[n][0], n)
    return results, model_errors


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    path = build_model(args.model)
    instruction = ANSWER_IN_JSON if args.json_schema else ANSWER_BOXED
    prompts = gsm8k_chat_prompts(path, instruction=instruction) if args.prompts == "gsm8k" else None
    args.constraint = {"json_schema": json.dumps(ANSWER_SCHEMA)} if args.json_schema else None
    args.eos = eos_ids(path)
    eos_mode = (
        f"ignore_eos: every request generates {args.new_tokens} tokens, past the model's EOS"
        if args.ignore_eos
        else f"natural EOS, at most {args.new_tokens} new tokens"
    )
    if args.json_schema:
        eos_mode += "; every request constrained to a JSON schema"
    if args.fork_children:
        eos_mode += "; every server's scheduler forked, not spawned (memory)"
    args.meta = provenance(f"{args.model} ({path.name})", rounds=args.repeats, eos=eos_mode, prompts=args.prompts)
    print(f"[bench_spec] {eos_mode}; {args.meta['command']} at {args.meta['commit']}", flush=True)
    configs, spec_configs = configurations(args)
    if args.from_json:  # re-print the report of an earlier run of the same command
        results, model_errors = load(args.from_json)
        args.meta = json.loads(Path(args.from_json).read_text()).get("meta") or args.meta
    else:
        results, model_errors = measure(configs, args, prompts, path)
    report(args, results, model_errors, configs, spec_configs, eos_mode)


if __name__ == "__main__":
    main()
