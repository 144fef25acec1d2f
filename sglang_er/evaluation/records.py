"""What an eval run is asked to do (:class:`EvalConfig`) and what it writes and returns: one
:class:`SampleRecord` per sample (``samples.jsonl``) and a :class:`Summary` (``summary.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class EvalError(RuntimeError):
    pass


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
