"""RL-shaped rollout benchmark: the same GRPO-style workload on plain SGLang and on EFFROLLOUT.

    python -m eval.rollout_bench --model gsm8k-lm --prompts 16 --n 8 --max-tokens 512 \\
        [--configs plain fixed:3 auto hybrid] [--epochs 2] [--policy-steps 2] [--profile profile.json] \\
        [--out eval/out/rollout]

Each configuration gets its own server and the same workload. The servers are up together (an
idle one sleeps, so it takes no core) and the rollouts alternate between them, rotating the order
(``--one-at-a-time``: one server after the other, for little memory). The workload is sent the
way an RL framework sends a rollout: all P prompts × n samples at once, temperature 1.0, natural
EOS with a max-tokens cap -- lengths are long-tailed, so the batch shrinks from P·n to a few
stragglers and the tail dominates the makespan. Recorded per request: send / finish time and
tokens; per server iteration (EFFROLLOUT): γ and batch size from the worker's timeline in
``/get_server_info``. ``--policy-steps K`` runs K rollouts per config and, between them, pushes
perturbed weights with ``update_weights_from_tensor`` (simulated policy drift), reporting the
drafter's re-quantization time and the acceptance per step. ``--epochs E`` sends the same
prompts E times per step (GRPO's epochs: what history drafts feed on); the headline figures are
totals over all rollouts of a config. ``--same-lengths``: every config generates the lengths
plain's rollout of the same epoch drew, so a makespan ratio no longer depends on how many of
each config's own samples happened to run long.

Writes ``report.md``, ``results.json`` and PNG plots (see :mod:`eval.report`) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from sglang_er.config import MAX_GAMMA
from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# GSM8K chat prompts are ~120-250 tokens: room in the KV pool for the longest
PROMPT_TOKENS_MAX = 384


@dataclass
class Rollout:
    config: str
    step: int
    makespan_s: float
    output_tokens: int
    requests: list[dict]  # {t_send, t_done, tokens, finish}
    timeline: list[dict]  # worker iterations: {time, gamma, batch_size, ...}
    accept_rate: float | None = None
    position_acceptance: list | None = None
    requantize_s: float | None = None
    extra: dict = field(default_factory=dict)
    epoch: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.makespan_s if self.makespan_s else 0.0


def parse_config(spec: str, gamma_max: int = 7) -> tuple[str, list[str], dict]:
    """``plain`` | ``fixed:G`` | ``auto`` | ``hybrid[:group]`` -> (label, server args, env).

    ``gamma_max``: the top of auto's and hybrid's γ ladder (1..gamma_max)."""
    if spec == "plain":
        return "plain", [], {}
    eff = ["--speculative-algorithm", "EFFROLLOUT"]
    if not 1 <= gamma_max <= MAX_GAMMA:
        raise ValueError(f"--gamma-max {gamma_max}: use 1..{MAX_GAMMA}")
    if spec == "auto":
        return "auto", [*eff, "--speculative-num-steps", str(gamma_max)], {"SGLANG_ER_MODE": "auto"}
    if spec in ("hybrid", "hybrid:group"):  # auto W4 + history drafts (earlier epochs too, unless :group)
        return (
            spec,
            [*eff, "--speculative-num-steps", str(gamma_max)],
            {"SGLANG_ER_MODE": "auto", "SGLANG_ER_HISTORY": "group" if spec.endswith(":group") else "all"},
        )
    if spec.startswith("fixed:") and spec[6:].isdigit() and 1 <= int(spec[6:]) <= MAX_GAMMA:
        g = int(spec[6:])
        return f"fixed γ={g}", [*eff, "--speculative-num-steps", str(g)], {"SGLANG_ER_GAMMA": str(g)}
    raise ValueError(
        f"unknown config {spec!r}: use plain, auto, hybrid, hybrid:group or fixed:G with 1 <= G <= {MAX_GAMMA}"
    )


def chat_prompts(model_path, k: int) -> tuple[list[list[dict]], list[str]]:
    """The first ``k`` GSM8K test questions as chat messages, and their reference answers."""
    from eval.math_data import load_problems

    problems = load_problems("gsm8k", limit=k)
    # the eval harness's prompt: question, newline, instruction (what gsm8k-lm was trained on)
    return (
        [[{"role": "user", "content": f"{p.question.strip()}\n{INSTRUCTION}"}] for p in problems],
        [p.reference for p in problems],
    )


def eos_token_strings(model_path) -> set[str]:
    """The text of the model's EOS tokens, as per-token logprobs spell them."""
    from transformers import AutoTokenizer

    from eval.bench_spec import eos_ids

    tok = AutoTokenizer.from_pretrained(str(model_path))
    return {tok.convert_ids_to_tokens(i) for i in eos_ids(model_path)} | {tok.eos_token}


class TimelinePoller:
    """Collects the worker's per-iteration records while a rollout runs (deduplicated)."""

    def __init__(self, url: str, every_s: float = 1.0):
        self.url, self.every_s = url, every_s
        self.records: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> dict | None:
        try:
            states = requests.get(self.url + "/get_server_info", timeout=30).json().get("internal_states") or [{}]
        except requests.RequestException:
            return None
        st = states[0].get("effrollout")
        for r in (st or {}).get("timeline", []):
            self.records[r["iteration"]] = r
        return st

    def _run(self):
        while not self._stop.wait(self.every_s):
            self._poll()

    def __enter__(self):
        self.start_state = self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end_state = self._poll()


def _own_answer(choice: dict, eos_tokens: set[str]) -> tuple[str, int]:
    """(text up to the response's first EOS, tokens generated after it) of an ignore_eos response,
    from its per-token logprobs; the text past EOS is not the model's answer."""
    toks = [t["token"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
    for k, t in enumerate(toks):
        if t in eos_tokens:
            return "".join(toks[:k]), len(toks) - k - 1
    return choice["message"]["content"] or "", 0


def run_rollout(
    srv: Server,
    label: str,
    step: int,
    prompts,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int,
    lengths: list[int] | None = None,
    references: list[str] | None = None,
    eos_tokens: set[str] = frozenset(),
) -> Rollout:
    """One rollout: every prompt × n samples sent at once. ``lengths`` (one per request, prompt-major):
    each request generates exactly that many tokens (``ignore_eos``) instead of stopping at EOS; the
    tokens it generates past its own first EOS are counted (``past_eos``). ``references``: each
    response is graded against its prompt's answer (``correct``)."""
    from eval.grading import grade

    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]

    def one(job):
        i, j = job
        t0 = time.time()
        body = {
            "model": "m",
            "messages": prompts[i],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed + 1000 * i + j,
        }
        if lengths is not None:
            body.update(
                max_tokens=max(1, lengths[i * n + j]), ignore_eos=True, logprobs=True, skip_special_tokens=False
            )
        r = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=3600)
        r.raise_for_status()
        out = r.json()
        choice = out["choices"][0]
        text, beyond = (
            _own_answer(choice, eos_tokens) if lengths is not None else (choice["message"]["content"] or "", None)
        )
        rec = {
            "t_send": t0,
            "t_done": time.time(),
            "tokens": out["usage"]["completion_tokens"],
            "finish": choice["finish_reason"],
            "question": i,
            "past_eos": beyond,
        }
        if references is not None:
            rec["correct"] = grade(text, references[i]).correct
        return rec

    with TimelinePoller(srv.url) as poll, ThreadPoolExecutor(len(jobs)) as ex:
        t0 = time.time()
        reqs = list(ex.map(one, jobs))
        makespan = max(r["t_done"] for r in reqs) - t0
    timeline = [r for _, r in sorted(poll.records.items()) if r["time"] >= t0]
    ro = Rollout(label, step, makespan, sum(r["tokens"] for r in reqs), reqs, timeline)
    ro.extra["lengths"] = "replayed" if lengths is not None else "natural"
    before, after = (poll.start_state or {}).get("metrics"), (poll.end_state or {}).get("metrics")
    if before and after and after["drafted"] > before["drafted"]:
        ro.extra["drafted"] = after["drafted"] - before["drafted"]
        ro.extra["accepted"] = after["accepted"] - before["accepted"]
        ro.accept_rate = ro.extra["accepted"] / ro.extra["drafted"]
        ro.position_acceptance = after["position_acceptance"]
        b0 = before.get("by_source", {})
        ro.extra["by_source"] = {
            k: {f: v[f] - b0.get(k, {}).get(f, 0) for f in ("drafted", "accepted")}
            for k, v in after.get("by_source", {}).items()
        }
    hist = (poll.end_state or {}).get("history")
    if hist:
        ro.extra["history_index"] = {k: hist[k] for k in ("groups", "indexed_tokens", "lookups", "hits")}
    return ro


def perturb_policy(srv: Server, model_path: Path, step: int, scale: float) -> float | None:
    """Simulated policy update: W ← W + scale·std(W)·noise on every decoder linear, pushed with
    SGLang's update_weights_from_tensor session; returns the drafter's re-quantization time."""
    import torch
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(step)
    named = []
    for name, w in load_file(str(model_path / "model.safetensors")).items():
        if w.dim() == 2 and ".layers." in name:
            noise = torch.randn(w.shape, generator=gen) * (scale * float(w.float().std()))
            w = (w.float() + noise).to(w.dtype)
        named.append((name, w))
    srv.update_weights_from_tensor(named)
    st = srv.effrollout_state()
    return st and st["last_requantize_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in model name")
    p.add_argument("--model-path", default=None, help="a local HF model directory (overrides --model)")
    p.add_argument("--prompts", type=int, default=16, help="GSM8K prompts P")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--configs", nargs="+", default=["plain", "fixed:3", "auto"])
    p.add_argument("--policy-steps", type=int, default=1, help="rollouts per config, perturbed weights in between")
    p.add_argument("--epochs", type=int, default=1, help="rollouts of the same prompts per policy step")
    p.add_argument("--perturb", type=float, default=0.02, help="policy-step noise, relative to each weight's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        default=None,
        help="hardware profile for the EFFROLLOUT servers (SGLANG_ER_PROFILE; see `sglang-er calibrate`)",
    )
    p.add_argument("--server-args", default="", help="extra SGLang args, e.g. '--dtype bfloat16'")
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="start the servers in turn instead of all at once with interleaved rollouts "
        "(less memory; this machine's drift then lands in the ratios)",
    )
    p.add_argument(
        "--same-lengths",
        action="store_true",
        help="every config generates the lengths plain's rollout of the same epoch drew (plain runs "
        "first, with natural EOS; the others with ignore_eos): the makespan ratio then "
        "compares the systems on one workload, not on each config's draw of long samples",
    )
    p.add_argument(
        "--gamma-max",
        type=int,
        default=7,
        help="auto and hybrid choose γ from 0..G each iteration (--speculative-num-steps G); "
        "a long ladder pays where acceptance is high and the batch small (the tail)",
    )
    p.add_argument("--out", default="eval/out/rollout")
    p.add_argument(
        "--from-json",
        default=None,
        help="write the report (and plots) of an earlier run's results.json to --out; runs nothing",
    )
    args = p.parse_args(argv)
    if args.from_json:
        from eval.report import write_rollout_report

        saved = json.loads(Path(args.from_json).read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        print(write_rollout_report([Rollout(**r) for r in saved["rollouts"]], out, saved["workload"], saved["meta"]))
        return 0
    try:
        configs = [parse_config(c, args.gamma_max) for c in args.configs]
    except ValueError as e:
        p.error(str(e))
    if args.policy_steps < 1 or args.epochs < 1:
        raise SystemExit("--policy-steps and --epochs must be >= 1")
    if args.same_lengths and (args.one_at_a_time or "plain" not in [c[0] for c in configs]):
        raise SystemExit(
            "--same-lengths replays plain's lengths in interleaved rollouts: add plain to --configs "
            "and drop --one-at-a-time"
        )
    model_path = Path(args.model_path) if args.model_path else build_model(args.model)
    if not (model_path / "config.json").exists():
        raise SystemExit(f"{model_path} is not a model directory (no config.json); pass --model-path DIR")
    prompts, references = chat_prompts(model_path, args.prompts)
    from eval.provenance import provenance

    # taken before the servers start: the commit is the code they run
    meta = provenance(model_path.name, rounds=args.epochs * args.policy_steps)
    eos_tokens = eos_token_strings(model_path) if args.same_lengths else set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rollouts: list[Rollout] = []
    # every sample of the rollout in the KV pool at once, as an RL framework sizes its engines
    # (a smaller pool makes SGLang queue and retract, which is not what is measured here)
    kv_tokens = max(32768, args.prompts * args.n * (args.max_tokens + PROMPT_TOKENS_MAX))

    def start(stack, label, server_args, env) -> Server:
        if args.profile and server_args:
            env = {**env, "SGLANG_ER_PROFILE": str(Path(args.profile).resolve())}
        srv = stack.enter_context(
            Server(
                model_path,
                [*server_args, *args.server_args.split()],
                env=env,
                max_total_tokens=kv_tokens,
                stop_grace=1.0,
            )
        )
        print(f"[rollout] {label}: server up in {srv.startup_seconds:.0f}s", flush=True)
        return srv

    drawn: dict = {}  # (step, epoch) -> plain's output lengths, replayed by the others (--same-lengths)

    def rollout(srv, label, step, epoch, req_s):
        lengths = drawn.get((step, epoch)) if label != "plain" else None
        ro = run_rollout(
            srv,
            label,
            step,
            prompts,
            args.n,
            args.max_tokens,
            args.temperature,
            args.seed + 7919 * epoch,
            lengths,
            references,
            eos_tokens,
        )
        if args.same_lengths and label == "plain":
            drawn[(step, epoch)] = [q["tokens"] for q in ro.requests]
        ro.requantize_s, ro.epoch = (req_s if epoch == 0 else None), epoch
        rollouts.append(ro)
        print(
            f"[rollout] {label} step {step} epoch {epoch}: makespan {ro.makespan_s:.1f}s, {ro.output_tokens} tokens, "
            f"{ro.tokens_per_s:.1f} tok/s, acceptance {ro.accept_rate if ro.accept_rate is not None else '-'}"
            + (f", re-quantized in {req_s:.2f}s" if ro.requantize_s else ""),
            flush=True,
        )

    if args.one_at_a_time:
        for label, server_args, env in configs:
            with contextlib.ExitStack() as stack:
                srv = start(stack, label, server_args, env)
                for step in range(args.policy_steps):
                    req_s = perturb_policy(srv, model_path, step + 1, args.perturb) if step else None
                    for epoch in range(args.epochs):
                        rollout(srv, label, step, epoch, req_s)
    else:
        # Every config's server is up at once (idle ones sleep) and the rollouts alternate,
        # rotating the order: this machine's speed drifts 10-20% over minutes, and alternating
        # puts the drift into every config alike instead of into their ratios.
        with contextlib.ExitStack() as stack:
            servers = [(label, start(stack, label, server_args, env)) for label, server_args, env in configs]
            k = 0
            for step in range(args.policy_steps):
                req = {
                    label: perturb_policy(srv, model_path, step + 1, args.perturb) if step else None
                    for label, srv in servers
                }
                for epoch in range(args.epochs):
                    order = servers[k:] + servers[:k]
                    if args.same_lengths:  # plain draws the lengths; the others keep their rotation
                        order = sorted(order, key=lambda s: s[0] != "plain")
                    for label, srv in order:
                        rollout(srv, label, step, epoch, req[label])
                    k = (k + 1) % len(servers)
        order = {label: i for i, (label, _, _) in enumerate(configs)}
        rollouts.sort(key=lambda r: (order[r.config], r.step, r.epoch))
    from eval.report import write_rollout_report

    workload = (
        f"{args.prompts} GSM8K prompts × n={args.n}, temperature {args.temperature}, max {args.max_tokens} "
        f"tokens, natural EOS"
        + (
            " for plain only: every other config replays plain's lengths with ignore_eos (--same-lengths), "
            "so part of its text lies past its own EOS (counted below)"
            if args.same_lengths
            else ""
        )
        + f", model {model_path.name}"
        + (
            f", auto and hybrid choose γ ≤ {args.gamma_max}"
            if any(c[0] in ("auto", "hybrid", "hybrid:group") for c in configs)
            else ""
        )
        + (f", {args.epochs} epochs of the same prompts" if args.epochs > 1 else "")
        + (
            "; one server at a time"
            if args.one_at_a_time
            else "; every server up at once, the rollouts alternating between them in a rotated order"
        )
    )
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "workload": workload, "rollouts": [asdict(r) for r in rollouts]})
    )
    report = write_rollout_report(rollouts, out, workload, meta)
    print(report)
    print(f"[rollout] report, plots and results in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
