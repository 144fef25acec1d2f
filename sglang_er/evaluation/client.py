"""The HTTP side of the eval: one SGLang server, reached through its OpenAI endpoints or its native
``/generate``, the way an RL framework drives it; :func:`parse_response` turns either answer into
per-sample completions with token counts and SGLang's ``spec_*`` stats."""

from __future__ import annotations

import time
from typing import Any

import requests
from pydantic import BaseModel

from sglang_er.evaluation.math_data import Problem
from sglang_er.evaluation.records import EvalConfig, EvalError


class Completion(BaseModel):
    """One sample of a response."""

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
    def request(self, problem: Problem, n: int, seed: int | None) -> list[Completion]:
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


def parse_response(body: Any, *, api: str, chat: bool) -> list[Completion]:
    """Completions of one response body of /generate (api='native') or an OpenAI endpoint."""
    if api == "native":
        items = body if isinstance(body, list) else [body]
        out = []
        for it in items:
            meta = it.get("meta_info") or {}
            out.append(
                Completion(
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
            Completion(
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
