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

import argparse
import contextlib
import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from eval.provenance import provenance
from sglang_er.gamma import expected_lengths
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


# Benchmarks measure the steady state: AWQ switches on after the warm-up, not mid-measurement.
AWQ_WARM = {"SGLANG_ER_AWQ_MIN_TOKENS": "256", "SGLANG_ER_AWQ_SAMPLE_EVERY": "1"}


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


# Configurations chosen per iteration; "auto-twin" (--twin) is a second, identical auto server
POLICIES = ("auto", "hybrid", "auto-twin")


def is_policy(name: str) -> bool:
    """auto, hybrid or auto's twin, at any TP size (``auto/tp2``)."""
    return name.split("/tp")[0] in POLICIES


def cpu_bind(cores) -> dict[str, str]:
    """A server's environment that binds its rank r to CPU core ``cores[r]`` (SGLang's CPU TP refuses
    to share one NUMA node's cores unbound); nothing on a GPU."""
    import torch

    return {} if torch.cuda.is_available() else {"SGLANG_CPU_OMP_THREADS_BIND": "|".join(map(str, cores))}


def tp_variant(configs: list, tp: int) -> list:
    """The configurations at ``--tp-size tp``, named ``<name>/tp<tp>``, each rank on a core of its own."""
    if tp == 1:
        return list(configs)
    bind = cpu_bind(range(tp))
    return [(f"{n}/tp{tp}", g, [*extra, "--tp-size", str(tp)], {**env, **bind}) for n, g, extra, env in configs]


def best_other(results: dict, names: list[str], temp: float, b: int) -> tuple[str, float]:
    """The configuration auto is judged against at (T, B): the fastest that is neither a policy
    (auto, hybrid, auto's twin) nor the γ = 0 timing server, and its tok/s."""
    others = {n: results[(n, temp, b)]["tok_s"] for n in names if not is_policy(n) and n != "gamma=0"}
    best = max(others, key=others.get)
    return best, others[best]


def paired_ratio(
    results: dict, names: list[str], temp: float, b: int, of: str = "auto", against: str | None = None
) -> float | None:
    """Median over interleaved rounds of ``of``'s tok/s over the best other configuration's in
    the same round (or ``against``'s): this machine's speed drifts by 10-15% over minutes, the
    same for every server, so a ratio within one round is steadier than a ratio of medians.
    Configurations measured once (the contender rule) are left out; None with under 3 rounds."""
    mine = results[(of, temp, b)].get("tok_s_runs") or []
    pool = [against] if against else [n for n in names if not is_policy(n) and n not in ("gamma=0", of)]
    runs = [results[(n, temp, b)].get("tok_s_runs") or [] for n in pool]
    runs = [r for r in runs if len(r) >= len(mine)]
    if len(mine) < 3 or not runs:
        return None
    return statistics.median(m / max(r[i] for r in runs) for i, m in enumerate(mine))


def markdown_table(results: dict, names: list[str], temp: float, batches: list[int]) -> str:
    """One README table: plain tok/s, then each configuration's speed-up over plain with its
    acceptance; for auto also the ratio to the best other configuration and its speculating share."""
    cols = [n for n in names if n not in ("plain", "gamma=0")]
    head = (
        "| B | plain tok/s | " + " | ".join(cols) + (" | auto vs best | auto speculating |" if "auto" in cols else " |")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for b in batches:
        base = results[("plain", temp, b)]["tok_s"]
        cells = []
        for n in cols:
            r = results[(n, temp, b)]
            acc = f" (α {r['accept_rate']:.2f})" if r.get("accept_rate") is not None else ""
            cells.append(f"{r['tok_s'] / base:.2f}x{acc}")
        row = f"| {b} | {base:.1f} | " + " | ".join(cells) + " |"
        if "auto" in cols:
            a = results[("auto", temp, b)]
            paired = paired_ratio(results, names, temp, b)
            row += (
                f" {a['tok_s'] / best_other(results, names, temp, b)[1]:.2f}x"
                + (f" ({paired:.2f}x per round)" if paired else "")
                + f" | {(a['spec_share'] or 0) * 100:.0f}% |"
            )
        lines.append(row)
    return "\n".join(lines)


def physics_bound(r: dict, t_t: float | None, gamma: int) -> float | None:
    """E[L|γ] / (γ·r + v): the speed-up over the worker's own plain step that a fixed γ reaches
    with no overhead beyond its draft steps and verify, from the cell's measured per-position
    acceptance α_k, r = T_D/T_T and v = T_V/T_T. The gap to the measured speed-up is what the
    scheduler, sampling and the acceptance bookkeeping cost."""
    alphas = r.get("position_acceptance") or []
    if (
        not gamma
        or not t_t
        or not r.get("t_draft_step")
        or not r.get("t_verify")
        or len(alphas) < gamma
        or any(a is None for a in alphas[:gamma])
    ):
        return None
    e_len = expected_lengths(alphas[:gamma])[gamma]
    return e_len / (gamma * r["t_draft_step"] / t_t + r["t_verify"] / t_t)


def round_ratios(results: dict, name: str, temp: float, b: int, base: str = "plain") -> list[float]:
    """``name``'s tok/s over ``base``'s in each interleaved round (the spread of a ratio)."""
    mine, theirs = results[(name, temp, b)].get("tok_s_runs") or [], results[(base, temp, b)].get("tok_s_runs") or []
    return [m / t for m, t in zip(mine, theirs)]


def dump(path, results: dict, model_errors: dict, meta: dict | None = None) -> None:
    """Write the results so far (after every cell, so a crash mid-sweep keeps what was measured)."""
    if path:
        with open(path, "w") as f:
            json.dump(
                {
                    **({"meta": meta} if meta else {}),
                    **{f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()},
                    **{f"{k}|model_error": v for k, v in model_errors.items()},
                },
                f,
                indent=1,
            )


def load(path) -> tuple[dict, dict]:
    """The results and cost-model errors :func:`dump` wrote."""
    raw = json.loads(Path(path).read_text())
    results, errors = {}, {}
    for key, v in raw.items():
        parts = key.split("|")
        if len(parts) == 3:
            results[(parts[0], float(parts[1]), int(parts[2]))] = v
        elif len(parts) == 2 and parts[1] == "model_error":
            errors[parts[0]] = v
    return results, errors


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b-instruct")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument(
        "--gammas", nargs="*", type=int, default=[2, 3, 4, 6, 8], help="fixed γ configurations (none: pass none)"
    )
    p.add_argument(
        "--gamma-max",
        type=int,
        help="γmax of every EFFROLLOUT server (--speculative-num-steps; default: the largest of --gammas)",
    )
    p.add_argument(
        "--tp-sizes",
        nargs="+",
        type=int,
        default=[1],
        help="run every configuration at each of these --tp-size values (named <config>/tp<N>), "
        "and report TP N against TP 1 per configuration",
    )
    p.add_argument(
        "--off",
        action="store_true",
        help="also run EFFROLLOUT with SGLANG_ER_MODE=off (every iteration decodes plainly through the "
        "worker): what switching speculation off costs against plain SGLang",
    )
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument(
        "--new-tokens",
        type=int,
        default=256,
        help="at most this many tokens per request; they end at the model's EOS unless --ignore-eos",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly --new-tokens per request, past the model's EOS (labelled in the report; "
        "such text is easy to predict, so acceptance and speed-ups read high)",
    )
    p.add_argument(
        "--json-schema",
        action="store_true",
        help="constrained decoding: every request asks for, and is constrained to, a JSON object "
        "with its reasoning and answer (labelled in the report)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--draft-vocabs",
        nargs="+",
        type=int,
        default=[None],
        help="draft head vocabularies (SGLANG_ER_DRAFT_VOCAB; 0: every token; default: the server's own): every "
        "fixed γ runs with each, auto and hybrid with the first",
    )
    p.add_argument(
        "--draft-heads",
        nargs="+",
        default=["auto"],
        choices=["auto", "shared", "w8", "w4"],
        help="drafter lm_head: the server's default (auto), the target's (shared), an int8 and/or a W4 copy",
    )
    p.add_argument(
        "--quant",
        nargs="+",
        default=["awq"],
        choices=["awq", "rtn"],
        help="drafter quantizer(s); AWQ switches on after its live statistics are ready",
    )
    p.add_argument(
        "--no-overlap-plain",
        action="store_true",
        help="also run plain SGLang with --disable-overlap-schedule: SGLang turns its overlap "
        "scheduler off for a speculative algorithm that does not support it, so this is "
        "the plain decoding an EFFROLLOUT server's γ = 0 iterations compare with",
    )
    p.add_argument(
        "--skip-gamma0",
        action="store_true",
        help="skip the γ=0 EFFROLLOUT server (it only measures T_T for the T_D/T_T and T_V/T_T columns)",
    )
    p.add_argument("--auto", action="store_true", help="also run auto mode (γ chosen per iteration)")
    p.add_argument(
        "--hybrid",
        action="store_true",
        help="also run auto with history drafts (SGLANG_ER_HISTORY=all); implies --auto",
    )
    p.add_argument(
        "--twin",
        action="store_true",
        help="also run a second, identical auto server (auto-twin): how far two servers of one "
        "configuration differ here (each computes its own AWQ scales from its own traffic), "
        "the yardstick for hybrid vs auto; implies --auto",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="hardware profile for auto/hybrid (SGLANG_ER_PROFILE; `sglang-er calibrate` writes one)",
    )
    p.add_argument(
        "--prompts",
        choices=["synthetic", "gsm8k"],
        default="gsm8k",
        help="gsm8k: GSM8K questions in the model's chat template; synthetic: one fixed text (random-weight models)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every (B, T) cell this many times on its server and keep the median run "
        "(this machine's throughput wanders by ±15%% between runs)",
    )
    p.add_argument(
        "--repeat-batches",
        nargs="+",
        type=int,
        default=None,
        help="only these batch sizes get --repeats (default: all); the large batches take longest, "
        "and there the configurations are far apart",
    )
    p.add_argument(
        "--contender-ratio",
        type=float,
        default=0.8,
        help="a fixed γ below this fraction of the best at the previous batch size gets one run "
        "instead of --repeats (interleaved mode; 0: repeat every configuration)",
    )
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="start the servers in turn instead of all at once (interleaved rounds need every "
        "configuration's server in memory together)",
    )
    p.add_argument(
        "--fork-children",
        action="store_true",
        help="CPU: every server forks its scheduler and detokenizer instead of spawning them "
        "(sglang_er.launcher): ~0.7 GB less per child, so more servers fit side by side; the "
        "scheduler computes the same",
    )
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV pool of every server, in tokens")
    p.add_argument("--json", default=None, help="also write the results here (and a markdown report beside them)")
    p.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: print (and with --json write) the report of an earlier run's JSON; pass that "
        "run's other arguments unchanged",
    )
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
    if args.tp_sizes[0] != 1:
        raise SystemExit(f"--tp-sizes {args.tp_sizes}: start with 1, the reference every ratio is taken against")
    if args.gamma_max is None and not args.gammas:
        raise SystemExit("--gammas is empty: pass --gamma-max for the auto and off servers")
    gmax = args.gamma_max if args.gamma_max is not None else max(args.gammas)
    if any(g > gmax for g in args.gammas):
        raise SystemExit(f"--gammas {args.gammas} exceed --gamma-max {gmax}: raise --gamma-max")
    spec = ["--speculative-algorithm", "EFFROLLOUT", "--speculative-num-steps", str(gmax)]
    configs = (
        [("plain", 0, [], {})]
        + ([("plain/no-overlap", 0, ["--disable-overlap-schedule"], {})] if args.no_overlap_plain else [])
        + ([] if args.skip_gamma0 else [("gamma=0", 0, spec, {"SGLANG_ER_GAMMA": "0"})])
        + ([("off", 0, spec, {"SGLANG_ER_MODE": "off"})] if args.off else [])
        + [
            (
                f"gamma={g}"
                + ("" if head == "auto" else f"/{head}")
                + ("" if q == "awq" else f"/{q}")
                + (f"/v{dv}" if dv else ""),
                g,
                spec,
                {
                    "SGLANG_ER_GAMMA": str(g),
                    "SGLANG_ER_DRAFT_HEAD": head,
                    "SGLANG_ER_QUANT": q,
                    **({} if dv is None else {"SGLANG_ER_DRAFT_VOCAB": str(dv)}),
                    **AWQ_WARM,
                },
            )
            for q in args.quant
            for head in args.draft_heads
            for dv in args.draft_vocabs
            for g in args.gammas
        ]
    )
    args.auto = args.auto or args.hybrid or args.twin
    prof = {"SGLANG_ER_PROFILE": str(Path(args.profile).resolve())} if args.profile else {}
    if args.hybrid:
        configs.append(
            (
                "hybrid",
                0,
                spec,
                {
                    "SGLANG_ER_MODE": "auto",
                    "SGLANG_ER_HISTORY": "all",
                    "SGLANG_ER_DRAFT_HEAD": args.draft_heads[0],
                    **({} if args.draft_vocabs[0] is None else {"SGLANG_ER_DRAFT_VOCAB": str(args.draft_vocabs[0])}),
                    "SGLANG_ER_QUANT": args.quant[0],
                    **AWQ_WARM,
                    **prof,
                },
            )
        )
    if args.auto:
        auto_env = {
            "SGLANG_ER_MODE": "auto",
            "SGLANG_ER_DRAFT_HEAD": args.draft_heads[0],
            **({} if args.draft_vocabs[0] is None else {"SGLANG_ER_DRAFT_VOCAB": str(args.draft_vocabs[0])}),
            "SGLANG_ER_QUANT": args.quant[0],
            **AWQ_WARM,
            **prof,
        }
        configs.append(("auto", 0, spec, auto_env))
        if args.twin:
            configs.append(("auto-twin", 0, spec, dict(auto_env)))
    configs = [c for tp in args.tp_sizes for c in tp_variant(configs, tp)]
    spec_configs = [c for c in configs if c[0] not in ("plain", "gamma=0", "plain/no-overlap")]
    if args.from_json:  # re-print the report of an earlier run of the same command
        results, model_errors = load(args.from_json)
        args.meta = json.loads(Path(args.from_json).read_text()).get("meta") or args.meta
    else:
        results, model_errors = measure(configs, args, prompts, path)
    lines: list[str] = []

    def say(text: str = "", **_print_kw) -> None:  # printed, and kept for the markdown report
        print(text, flush=True)
        lines.append(text)

    say(
        f"\nratios vs plain ({args.model}, {eos_mode}, same run; per-round range in brackets; "
        "bound = E[L|γ]/(γ·r + v) from the measured α_k, r = T_D/T_T, v = T_V/T_T)"
    )
    for temp in args.temperatures:
        for b in args.batches:
            base = results[("plain", temp, b)]["tok_s"]
            t_t = results.get(("gamma=0", temp, b), {}).get("t_plain")
            cells = []
            for name in [c[0] for c in spec_configs]:
                r = results[(name, temp, b)]
                rd = r["t_draft_step"] / t_t if r["t_draft_step"] and t_t else float("nan")
                rv = r["t_verify"] / t_t if r["t_verify"] and t_t else float("nan")
                gamma = next(c[1] for c in spec_configs if c[0] == name)
                bound = physics_bound(r, t_t, gamma)
                rr = round_ratios(results, name, temp, b)
                cells.append(
                    f"{name}: {r['tok_s'] / base:4.2f}x"
                    + (f" [{min(rr):.2f}-{max(rr):.2f}]" if len(rr) > 1 else "")
                    + f" (r {rd:.2f}, v {rv:.2f}, α {r['accept_rate'] or 0:.2f}"
                    + (f", L {r['accept_length']:.2f}" if r.get("accept_length") else "")
                    + (f", bound {bound:.2f}x" if bound else "")
                    + (f", {r['tokens_past_eos']} of {r['tokens']} tokens past EOS" if args.ignore_eos else "")
                    + ")"
                )
            say(f"T={temp:g} B={b:3d}  " + "\n              ".join(cells))
    tp_names = [c[0] for c in configs if "/tp" in c[0]]
    # TP N against TP 1 for each configuration, then each configuration against plain at its TP size
    for title, pairs in (
        ("TP N vs TP 1, the same configuration", [(n, n.rsplit("/tp", 1)[0]) for n in tp_names]),
        (
            "vs plain at the same TP size",
            [(n, "plain/tp" + n.rsplit("/tp", 1)[1]) for n in tp_names if not n.startswith("plain")],
        ),
    ):
        if not pairs:
            continue
        say(f"\n{title} (median of the per-round ratios, range in brackets)")
        for temp in args.temperatures:
            for b in args.batches:
                cells = []
                for name, base in pairs:
                    rr = round_ratios(results, name, temp, b, base=base)
                    if rr:
                        cells.append(f"{name} vs {base}: {statistics.median(rr):4.2f}x [{min(rr):.2f}-{max(rr):.2f}]")
                say(f"T={temp:g} B={b:3d}  " + "\n              ".join(cells))
    if args.auto:
        say("\nauto policy vs the best other configuration (same run)")
        for temp in args.temperatures:
            crossover = max(
                (
                    b
                    for b in args.batches
                    if any(
                        results[(c[0], temp, b)]["tok_s"] > results[("plain", temp, b)]["tok_s"]
                        for c in spec_configs
                        if c[0] not in POLICIES
                    )
                ),
                default=None,
            )
            for b in args.batches:
                best, best_tok_s = best_other(results, [c[0] for c in configs], temp, b)
                a = results[("auto", temp, b)]
                paired = paired_ratio(results, [c[0] for c in configs], temp, b)
                say(
                    f"T={temp:g} B={b:3d}  auto {a['tok_s']:7.1f} tok/s = {a['tok_s'] / best_tok_s:4.2f}x best "
                    f"({best}), {a['tok_s'] / results[('plain', temp, b)]['tok_s']:4.2f}x plain, speculating in "
                    f"{(a['spec_share'] or 0) * 100:.0f}% of iterations"
                    + (f"; per round {paired:4.2f}x the round's best" if paired else ""),
                    flush=True,
                )
                for other, label in (("hybrid", "auto (W4 only)"), ("auto-twin", "auto (same configuration)")):
                    if other in [c[0] for c in configs]:
                        h = results[(other, temp, b)]
                        hp = paired_ratio(results, [c[0] for c in configs], temp, b, of=other, against="auto")
                        say(
                            f"              {other} {h['tok_s']:7.1f} tok/s = {h['tok_s'] / a['tok_s']:4.2f}x {label}"
                            + (f"; per round {hp:4.2f}x" if hp else ""),
                            flush=True,
                        )
            say(f"T={temp:g} crossover: fixed γ beats plain up to B = {crossover}")
    for temp in args.temperatures:
        say(
            f"\nT={temp:g}, speed-up over plain (acceptance α):\n"
            + markdown_table(results, [c[0] for c in configs], temp, args.batches),
            flush=True,
        )
    dump(args.json, results, model_errors, args.meta)
    if args.json:  # the report a person reads, beside the data
        from eval.provenance import header

        md = Path(args.json).with_suffix(".md")
        md.write_text(
            f"# B sweep: EFFROLLOUT vs plain SGLang\n\n{header(args.meta)}\n\n```\n" + "\n".join(lines) + "\n```\n"
        )


if __name__ == "__main__":
    main()
