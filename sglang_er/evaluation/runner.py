"""One eval run: load the problems, send the requests from a thread pool, grade each sample as its
response arrives (streamed to ``samples.jsonl``), then score and summarize."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path

from sglang_er.evaluation import grading
from sglang_er.evaluation.client import Client, Completion
from sglang_er.evaluation.math_data import Problem, load_problems
from sglang_er.evaluation.records import EvalConfig, EvalError, SampleRecord, Summary
from sglang_er.evaluation.stats import acceptance_stats, latency_stats, score


def run_eval(config: EvalConfig | dict | None = None, /, **overrides) -> Summary:
    """Run the eval described by ``config`` (an ``EvalConfig``, a dict, or keyword overrides)."""
    cfg = _config(config, overrides)
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
                        rec = _sample_record(p, j0 + j, comps[j] if comps else None, err, t1 - t0, wall_offset + t0)
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
    acc, pass_k, maj_k = score(records, ks, seed=cfg.seed or 0)
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


def _config(config: EvalConfig | dict | None, overrides: dict) -> EvalConfig:
    if config is None:
        return EvalConfig(**overrides)
    if isinstance(config, dict):
        return EvalConfig(**{**config, **overrides})
    cfg = config.model_copy(update=overrides) if overrides else config
    return EvalConfig.model_validate(cfg.model_dump())  # validates the overrides too


def _sample_record(
    p: Problem, sample_idx: int, c: Completion | None, err: str | None, latency: float, t_send: float
) -> SampleRecord:
    """One graded sample; ``c`` is None when its request failed (``err``)."""
    g = grading.grade(c.text, p.reference) if c else grading.Grade(None, False)
    return SampleRecord(
        problem_idx=p.idx,
        source_idx=p.source_idx,
        sample_idx=sample_idx,
        question=p.question,
        reference=p.reference,
        response=c.text if c else "",
        extracted=g.extracted,
        correct=g.correct,
        correct_flexible=g.correct_flexible,
        finish_reason=c.finish_reason if c else None,
        prompt_tokens=c.prompt_tokens if c else None,
        completion_tokens=c.completion_tokens if c else None,
        latency_s=latency,
        t_send=t_send,
        spec=c.spec if c else None,
        error=err,
    )
