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
import math
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import requests
from pydantic import BaseModel, Field, model_validator

from sglang_er.evaluation import grading
from sglang_er.evaluation.math_data import Problem, load_problems

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_OUT_ROOT = Path("eval") / "out"  # relative to the working directory (the checkout's eval/out)


class EvalError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------------------------
class EvalConfig(BaseModel):
    base_url: str = "http://127.0.0.1:30000"
    dataset: str = "gsm8k"
    question_field: str | None = None
    answer_field: str | None = None
    limit: int | None = None
    shuffle: bool = False  # draw the `limit` problems at random (seeded by `seed`, or 0)
    n: int = Field(1, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = Field(1024, ge=1)
    concurrency: int = Field(64, ge=1)
    seed: int | None = None  # per-sample sampling seed base: sample j of problem i gets seed + i*n + j
    chat: bool = True
    model: str | None = None  # OpenAI `model` field; default: the server's first /v1/models id
    api: Literal["openai", "native"] = "openai"
    n_mode: Literal["separate", "batched"] = "separate"
    sglext: bool = True  # ask the OpenAI endpoints for SGLang's spec/meta_info extension fields
    tokenizer: str | None = None  # native + chat: tokenizer path (default: GET /model_info)
    instruction: str = INSTRUCTION
    ks: list[int] | None = None  # pass@k / maj@k; default 1, 2, 4, ..., n
    request_timeout: float = 3600.0
    retries: int = 2  # per request, on connection errors and 5xx
    out: str | None = None  # directory for samples.jsonl and summary.json; None: write nothing
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.ks is not None:
            bad = [k for k in self.ks if not 0 < k <= self.n]
            if bad:
                raise ValueError(f"ks must lie in [1, n={self.n}], got {bad}")
        if self.seed is not None and self.n_mode == "batched" and self.n > 1:
            raise ValueError("a seed with n_mode='batched' gives n identical samples; use n_mode='separate'")
        return self


class SampleRecord(BaseModel):
    problem_idx: int
    source_idx: int
    sample_idx: int
    question: str
    reference: str
    response: str
    extracted: str | None
    correct: bool
    finish_reason: str | None = None
    correct_flexible: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None  # of the request that produced the sample
    t_send: float | None = None  # wall-clock (epoch s) when that request was sent: timelines and plots
    spec: dict[str, Any] | None = None  # spec_* fields of SGLang's meta_info, when present
    error: str | None = None


class LatencyStats(BaseModel):
    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class AcceptanceStats(BaseModel):
    """Speculative decoding, aggregated over the samples whose responses carried spec_* fields."""

    samples: int
    verify_ct: int  # verification steps (draft-verify iterations) summed over samples
    num_correct_drafts: int
    num_proposed_drafts: int
    accept_rate: float | None  # correct / proposed drafts
    accept_length: float | None  # tokens per verify step: sum(completion tokens) / sum(verify_ct)
    mean_sample_accept_length: float | None  # mean of SGLang's per-request spec_accept_length
    correct_drafts_histogram: list[int] = []  # steps that accepted 0, 1, 2, ... drafts


class Summary(BaseModel):
    model: str
    dataset: str
    api: str
    endpoint: str
    num_problems: int
    n: int
    num_samples: int
    num_errors: int
    num_extracted: int  # samples with a \boxed answer
    accuracy: float  # mean@n: mean correctness over all samples
    accuracy_flexible: float  # mean@n with the last number standing in for a missing box
    pass_at_k: dict[str, float]  # "pass@k" -> unbiased estimate
    maj_at_k: dict[str, float]  # "maj@k" -> majority-vote accuracy
    latency_s: LatencyStats  # per request
    makespan_s: float  # first request sent -> last response received
    output_tokens: int
    output_tokens_per_s: float
    mean_output_tokens: float
    finish_reasons: dict[str, int]
    acceptance: AcceptanceStats | None = None
    started_at: str
    out_dir: str | None = None
    config: EvalConfig


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------
class _Completion(BaseModel):
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    spec: dict[str, Any] | None = None


class _RetryableError(Exception):
    pass


def _spec_from(meta: dict | None) -> dict | None:
    if not meta:
        return None
    spec = {k: v for k, v in meta.items() if k.startswith("spec_") and v is not None}
    return spec or None


def _finish(fr) -> str | None:
    if isinstance(fr, dict):
        return fr.get("type")
    return fr


class Client:
    """One server: resolves the model name / tokenizer and sends one request per call."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(10, cfg.concurrency))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.model_info = self._get_json("/model_info")
        self.model = cfg.model or self._model_name()
        self.tokenizer = None
        if cfg.api == "native" and cfg.chat:
            self.tokenizer = self._load_tokenizer()
        if cfg.api == "native":
            self.endpoint = "/generate"
        else:
            self.endpoint = "/v1/chat/completions" if cfg.chat else "/v1/completions"

    def _get_json(self, path: str) -> dict | None:
        try:
            r = self.session.get(self.base + path, timeout=30)
            return r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def _model_name(self) -> str:
        models = self._get_json("/v1/models")
        if models and models.get("data"):
            return models["data"][0]["id"]
        if self.model_info and self.model_info.get("model_path"):
            return self.model_info["model_path"]
        if models is None and self.model_info is None:
            raise EvalError(f"server at {self.base} is not reachable (GET /v1/models and /model_info failed)")
        return "default"

    def _load_tokenizer(self):
        path = (
            self.cfg.tokenizer
            or (self.model_info or {}).get("tokenizer_path")
            or (self.model_info or {}).get("model_path")
        )
        if not path:
            raise EvalError("--api native --chat needs a tokenizer: GET /model_info gave no path; pass --tokenizer")
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise EvalError(f"cannot load the tokenizer at {path!r} for the chat template: {e}") from e

    def prompt_text(self, problem: Problem) -> str:
        q = problem.question.strip()
        return f"{q}\n{self.cfg.instruction}" if self.cfg.instruction else q

    # -- one request --------------------------------------------------------------------------
    def request(self, problem: Problem, n: int, seed: int | None) -> list[_Completion]:
        cfg = self.cfg
        content = self.prompt_text(problem)
        if cfg.api == "native":
            sp: dict[str, Any] = {"max_new_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
            if n > 1:
                sp["n"] = n
            if seed is not None:
                sp["sampling_seed"] = seed
            payload: dict[str, Any] = {"sampling_params": sp, "return_logprob": False}
            if self.tokenizer is not None:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
                payload["input_ids"] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                payload["text"] = content
        else:
            payload = {
                "model": self.model,
                "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "n": n,
                "stream": False,
            }
            if cfg.chat:
                payload["messages"] = [{"role": "user", "content": content}]
            else:
                payload["prompt"] = content
            if seed is not None:
                payload["seed"] = seed
            if cfg.sglext:
                payload["return_spec_tokens_details"] = True
                if cfg.chat:
                    payload["return_meta_info"] = True
        body = self._post(payload)
        out = parse_response(body, api=cfg.api, chat=cfg.chat)
        if len(out) != n:
            raise EvalError(f"{self.endpoint} returned {len(out)} completions for n={n}")
        return out

    def _post(self, payload: dict) -> Any:
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                r = self.session.post(self.base + self.endpoint, json=payload, timeout=self.cfg.request_timeout)
                if r.status_code >= 500:
                    raise _RetryableError(f"HTTP {r.status_code}: {r.text[:300]}")
                if r.status_code != 200:
                    raise EvalError(f"POST {self.endpoint} -> HTTP {r.status_code}: {r.text[:500]}")
                return r.json()
            except (requests.ConnectionError, requests.Timeout, _RetryableError) as e:
                last = e
                if attempt < self.cfg.retries:
                    time.sleep(min(2.0**attempt, 10.0))
        raise EvalError(f"POST {self.endpoint} failed after {self.cfg.retries + 1} tries: {last}")


def parse_response(body: Any, *, api: str, chat: bool) -> list[_Completion]:
    """Completions of one response body of /generate (api='native') or an OpenAI endpoint."""
    if api == "native":
        items = body if isinstance(body, list) else [body]
        out = []
        for it in items:
            meta = it.get("meta_info") or {}
            out.append(
                _Completion(
                    text=it.get("text") or "",
                    finish_reason=_finish(meta.get("finish_reason")),
                    prompt_tokens=meta.get("prompt_tokens"),
                    completion_tokens=meta.get("completion_tokens"),
                    spec=_spec_from(meta),
                )
            )
        return out
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    usage = body.get("usage") or {}
    ext = (body.get("sglext") or {}).get("spec_tokens_details")
    ext_list = ext if isinstance(ext, list) else [ext] if isinstance(ext, dict) else []
    out = []
    for i, c in enumerate(choices):
        meta = c.get("meta_info")
        if chat:
            msg = c.get("message") or {}
            text = msg.get("content")
            if text is None:
                text = msg.get("reasoning_content") or ""
        else:
            text = c.get("text") or ""
        spec = _spec_from(meta)
        if spec is None and len(ext_list) == len(choices):
            spec = _spec_from(ext_list[i])
        ctoks = (meta or {}).get("completion_tokens")
        if ctoks is None and len(choices) == 1:
            ctoks = usage.get("completion_tokens")
        if ctoks is None and spec and spec.get("spec_accept_length") and spec.get("spec_verify_ct"):
            # accept_length = completion_tokens / verify_ct (SGLang's definition)
            ctoks = round(float(spec["spec_accept_length"]) * int(spec["spec_verify_ct"]))
        ptoks = (meta or {}).get("prompt_tokens", usage.get("prompt_tokens") if len(choices) == 1 else None)
        out.append(
            _Completion(
                text=text,
                finish_reason=_finish(c.get("finish_reason")),
                prompt_tokens=ptoks,
                completion_tokens=ctoks,
                spec=spec,
            )
        )
    if (
        out
        and len(choices) > 1
        and all(o.completion_tokens is None for o in out)
        and usage.get("completion_tokens") is not None
    ):
        # Only the total is known: spread it evenly so token throughput stays right.
        total = int(usage["completion_tokens"])
        for j, o in enumerate(out):
            o.completion_tokens = total // len(out) + (1 if j < total % len(out) else 0)
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_stats(xs: list[float]) -> LatencyStats:
    if not xs:
        return LatencyStats()
    return LatencyStats(
        count=len(xs),
        mean=sum(xs) / len(xs),
        p50=percentile(xs, 50),
        p90=percentile(xs, 90),
        p99=percentile(xs, 99),
        max=max(xs),
    )


def acceptance_stats(records: list[SampleRecord]) -> AcceptanceStats | None:
    with_spec = [r for r in records if r.spec and r.spec.get("spec_verify_ct")]
    if not with_spec:
        return None
    verify = sum(int(r.spec["spec_verify_ct"]) for r in with_spec)
    correct = sum(int(r.spec.get("spec_num_correct_drafts") or 0) for r in with_spec)
    proposed = sum(int(r.spec.get("spec_num_proposed_drafts") or 0) for r in with_spec)
    toks = sum(int(r.completion_tokens or 0) for r in with_spec)
    per = [float(r.spec["spec_accept_length"]) for r in with_spec if r.spec.get("spec_accept_length") is not None]
    hist: list[int] = []
    for r in with_spec:
        h = r.spec.get("spec_correct_drafts_histogram") or []
        if len(h) > len(hist):
            hist += [0] * (len(h) - len(hist))
        for i, v in enumerate(h):
            hist[i] += int(v)
    return AcceptanceStats(
        samples=len(with_spec),
        verify_ct=verify,
        num_correct_drafts=correct,
        num_proposed_drafts=proposed,
        accept_rate=correct / proposed if proposed else None,
        accept_length=toks / verify if verify else None,
        mean_sample_accept_length=sum(per) / len(per) if per else None,
        correct_drafts_histogram=hist,
    )


def score(records: list[SampleRecord], n: int, ks: list[int], seed: int = 0) -> tuple[float, dict, dict]:
    """mean@n, pass@k and maj@k over problems; samples that errored count as wrong."""
    by_problem: dict[int, list[SampleRecord]] = {}
    for r in records:
        by_problem.setdefault(r.problem_idx, []).append(r)
    if not by_problem:
        return 0.0, {}, {}
    acc = sum(r.correct for r in records) / len(records)
    pass_k = {f"pass@{k}": 0.0 for k in ks}
    maj_k = {f"maj@{k}": 0.0 for k in ks}
    for pidx, rs in by_problem.items():
        rs = sorted(rs, key=lambda r: r.sample_idx)
        c = sum(r.correct for r in rs)
        clusters = grading.answer_clusters([r.extracted for r in rs])
        correct = [r.correct for r in rs]
        for k in ks:
            kk = min(k, len(rs))
            pass_k[f"pass@{k}"] += grading.pass_at_k(len(rs), c, kk)
            maj_k[f"maj@{k}"] += grading.maj_at_k(clusters, correct, kk, seed=seed + pidx)
    m = len(by_problem)
    return acc, {k: v / m for k, v in pass_k.items()}, {k: v / m for k, v in maj_k.items()}


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def run_eval(config: EvalConfig | dict | None = None, /, **overrides) -> Summary:
    """Run the eval described by ``config`` (an ``EvalConfig``, a dict, or keyword overrides)."""
    if config is None:
        cfg = EvalConfig(**overrides)
    elif isinstance(config, dict):
        cfg = EvalConfig(**{**config, **overrides})
    else:
        cfg = config.model_copy(update=overrides) if overrides else config
        cfg = EvalConfig.model_validate(cfg.model_dump())
    problems = load_problems(
        cfg.dataset,
        question_field=cfg.question_field,
        answer_field=cfg.answer_field,
        limit=cfg.limit,
        shuffle=cfg.shuffle,
        seed=cfg.seed or 0,
    )
    if not problems:
        raise EvalError(f"dataset {cfg.dataset!r} gave no problems")
    client = Client(cfg)
    ks = sorted(set(cfg.ks)) if cfg.ks else grading.default_ks(cfg.n)

    # Work units: (problem, first sample index, number of samples)
    if cfg.n_mode == "separate":
        units = [(p, j, 1) for p in problems for j in range(cfg.n)]
    else:
        units = [(p, 0, cfg.n) for p in problems]

    out_dir = Path(cfg.out) if cfg.out else None
    samples_f = None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_f = open(out_dir / "samples.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed in the finally

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    wall_offset = time.time() - time.perf_counter()  # perf_counter stamps -> epoch seconds
    records: list[SampleRecord] = []
    latencies: list[float] = []
    t_sent: list[float] = []
    t_done: list[float] = []
    lock = threading.Lock()

    def work(unit):
        p, j0, k = unit
        seed = None if cfg.seed is None else cfg.seed + p.idx * cfg.n + j0
        t0 = time.perf_counter()
        with lock:
            t_sent.append(t0)
        try:
            comps, err = client.request(p, k, seed), None
        except Exception as e:  # noqa: BLE001 - recorded per sample
            comps, err = None, f"{type(e).__name__}: {e}"
        t1 = time.perf_counter()
        return unit, comps, err, t0, t1

    from tqdm import tqdm

    bar = tqdm(
        total=len(problems) * cfg.n,
        disable=not cfg.progress,
        unit="sample",
        desc="math_eval",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    n_correct = 0
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as ex:
            pending = {ex.submit(work, u) for u in units}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    (p, j0, k), comps, err, t0, t1 = fut.result()
                    latencies.append(t1 - t0)
                    t_done.append(t1)
                    for j in range(k):
                        c = comps[j] if comps else None
                        g = grading.grade(c.text, p.reference) if c else grading.Grade(None, False)
                        rec = SampleRecord(
                            problem_idx=p.idx,
                            source_idx=p.source_idx,
                            sample_idx=j0 + j,
                            question=p.question,
                            reference=p.reference,
                            response=c.text if c else "",
                            extracted=g.extracted,
                            correct=g.correct,
                            correct_flexible=g.correct_flexible,
                            finish_reason=c.finish_reason if c else None,
                            prompt_tokens=c.prompt_tokens if c else None,
                            completion_tokens=c.completion_tokens if c else None,
                            latency_s=t1 - t0,
                            t_send=wall_offset + t0,
                            spec=c.spec if c else None,
                            error=err,
                        )
                        records.append(rec)
                        n_correct += rec.correct
                        if samples_f:
                            samples_f.write(rec.model_dump_json() + "\n")
                    bar.update(k)
                    bar.set_postfix(acc=f"{n_correct / len(records):.3f}", refresh=False)
    finally:
        bar.close()
        if samples_f:
            samples_f.close()

    errors = [r for r in records if r.error]
    if len(errors) == len(records):
        raise EvalError(f"every request failed; first error: {errors[0].error}")
    records.sort(key=lambda r: (r.problem_idx, r.sample_idx))
    acc, pass_k, maj_k = score(records, cfg.n, ks, seed=cfg.seed or 0)
    makespan = (max(t_done) - min(t_sent)) if t_done else 0.0
    out_toks = sum(r.completion_tokens or 0 for r in records)
    ok = [r for r in records if not r.error]
    summary = Summary(
        model=client.model,
        dataset=cfg.dataset,
        api=cfg.api,
        endpoint=client.endpoint,
        num_problems=len(problems),
        n=cfg.n,
        num_samples=len(records),
        num_errors=len(errors),
        num_extracted=sum(r.extracted is not None for r in records),
        accuracy=acc,
        accuracy_flexible=sum(r.correct_flexible for r in records) / len(records) if records else 0.0,
        pass_at_k=pass_k,
        maj_at_k=maj_k,
        latency_s=latency_stats(latencies),
        makespan_s=makespan,
        output_tokens=out_toks,
        output_tokens_per_s=out_toks / makespan if makespan > 0 else 0.0,
        mean_output_tokens=out_toks / len(ok) if ok else 0.0,
        finish_reasons=dict(Counter(str(r.finish_reason) for r in ok)),
        acceptance=acceptance_stats(ok),
        started_at=started_at,
        out_dir=str(out_dir) if out_dir else None,
        config=cfg,
    )
    if out_dir:
        (out_dir / "summary.json").write_text(summary.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return summary


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(s: Summary) -> str:
    rows: list[tuple[str, str]] = [
        ("model", s.model),
        ("dataset", s.dataset),
        ("endpoint", f"{s.api} {s.endpoint}"),
        ("problems x n", f"{s.num_problems} x {s.n} = {s.num_samples} samples"),
        ("errors", str(s.num_errors)),
        ("boxed answers", f"{s.num_extracted}/{s.num_samples}"),
        (f"accuracy (mean@{s.n})", _fmt(s.accuracy)),
        ("accuracy, last number if no box", _fmt(s.accuracy_flexible)),
        *[(k, _fmt(v)) for k, v in s.pass_at_k.items()],
        *[(k, _fmt(v)) for k, v in s.maj_at_k.items()],
        (
            "latency p50/p90/p99 s",
            f"{_fmt(s.latency_s.p50, 3)} / {_fmt(s.latency_s.p90, 3)} / {_fmt(s.latency_s.p99, 3)}",
        ),
        ("makespan s", _fmt(s.makespan_s, 2)),
        ("output tokens", str(s.output_tokens)),
        ("output tok/s", _fmt(s.output_tokens_per_s, 1)),
        ("mean output tokens", _fmt(s.mean_output_tokens, 1)),
        ("finish reasons", ", ".join(f"{k}={v}" for k, v in sorted(s.finish_reasons.items())) or "-"),
    ]
    a = s.acceptance
    if a is not None:
        rows += [
            (
                "spec accept length",
                f"{_fmt(a.accept_length, 3)} tok/step (mean/request {_fmt(a.mean_sample_accept_length, 3)})",
            ),
            ("spec accept rate", f"{_fmt(a.accept_rate, 3)} ({a.num_correct_drafts}/{a.num_proposed_drafts} drafts)"),
            ("spec verify steps", str(a.verify_ct)),
            ("spec accepted-drafts hist", " ".join(map(str, a.correct_drafts_histogram)) or "-"),
        ]
    else:
        rows.append(("spec acceptance", "not reported by the server"))
    if s.out_dir:
        rows.append(("output", s.out_dir))
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{w}}  {v}" for k, v in rows), line])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
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
