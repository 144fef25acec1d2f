"""Every kind of request SGLang serves gives under EFFROLLOUT what it gives on a plain server.

Greedy (float32 tiny model, fixed γ = 3: the shared ``eff3`` server), each request alone and then
all at once (one batch mixing kinds, so a request that must decode plainly shares iterations with
ones that speculate): penalties, logit bias, n > 1, logprobs with top-k, echo, stop strings and
stop token ids, ``ignore_eos``, streaming, ``/v1/score`` and the request-length check.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

PROMPT = "Alice has 12 apples. She buys 7 more apples. How many apples"


def _gen(**sampling) -> tuple[str, dict]:
    return "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 32, "temperature": 0, **sampling}}


def _completion(**kw) -> tuple[str, dict]:
    return "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, **kw}


CASES = {
    "frequency_penalty": _gen(frequency_penalty=1.5),
    "presence_penalty": _gen(presence_penalty=1.5),
    "repetition_penalty": _gen(repetition_penalty=1.3),
    "ignore_eos": _gen(ignore_eos=True, max_new_tokens=48),
    "stop_token_ids": _gen(stop_token_ids=[5, 9, 13]),
    "logprobs_top3": (
        "/generate",
        {
            "text": PROMPT,
            "sampling_params": {"max_new_tokens": 24, "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 3,
        },
    ),
    "logit_bias": _completion(logit_bias={"7": 5.0, "11": -100.0}),
    "n2": _completion(n=2),
    "echo": _completion(echo=True, max_tokens=8),
    "completion_logprobs": _completion(logprobs=2),
}


def _stop_at_plain_text(plain_text: str) -> str:
    """A stop string the plain output really contains (so stopping is exercised), mid-answer."""
    words = plain_text.split()
    return words[len(words) // 2] if len(words) > 2 else plain_text[len(plain_text) // 2 :]


def _canon(path: str, r: dict):
    """The parts of a response that must match plain's (ids, text, finish reasons, logprobs)."""
    if path == "/generate":
        m = r["meta_info"]
        out = {"text": r["text"], "ids": r.get("output_ids"), "finish": m["finish_reason"]}
        if "output_token_logprobs" in m:
            out["tokens"] = [t[1] for t in m["output_token_logprobs"]]
            out["logprobs"] = [t[0] for t in m["output_token_logprobs"]]
            out["top"] = [[(t[1], t[0]) for t in top] for top in m["output_top_logprobs"]]
        return out
    return [
        {"text": c["text"], "finish": c["finish_reason"], "logprobs": (c.get("logprobs") or {}).get("token_logprobs")}
        for c in r["choices"]
    ]


def _run(srv, stop: str) -> dict:
    cases = {**CASES, "stop_string": _gen(stop=[stop], max_new_tokens=48)}
    alone = {name: _canon(path, srv.post(path, body)) for name, (path, body) in cases.items()}
    with ThreadPoolExecutor(len(cases)) as ex:
        mixed = dict(zip(cases, ex.map(lambda c: _canon(c[0], srv.post(*c)), cases.values())))
    return {"alone": alone, "mixed": mixed}


def _same(a, b, path=""):
    """Equal, floats within 1e-4 (the verify and the decode kernels round differently)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4, rel=1e-4), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _streamed(srv) -> str:
    path, body = _gen(max_new_tokens=40, ignore_eos=True)
    text = ""
    with requests.post(srv.url + path, json={**body, "stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                text = json.loads(line[6:])["text"]  # /generate streams the text so far
    return text


def _score(srv) -> list:
    body = {"query": PROMPT, "items": [" 19", " 5", " twelve"], "label_token_ids": [5, 9, 13], "apply_softmax": True}
    return srv.post("/v1/score", body)["scores"]


def _too_long(srv) -> tuple[int, str]:
    r = requests.post(
        srv.url + "/generate",
        json={"input_ids": [7] * 5000, "sampling_params": {"max_new_tokens": 4}},
        timeout=120,
    )
    return r.status_code, r.text


@pytest.fixture(scope="module")
def plain_out(plain):
    stop = _stop_at_plain_text(plain.post(*_gen(max_new_tokens=48))["text"])
    return {
        "stop": stop,
        "runs": _run(plain, stop),
        "streamed": _streamed(plain),
        "score": _score(plain),
        "too_long": _too_long(plain),
    }


@pytest.fixture(scope="module")
def eff(eff3):
    return eff3


def test_plain_cases_exercise_what_they_name(plain_out):
    """The comparison is not empty: stops stop, penalties change the text, n gives two choices."""
    runs = plain_out["runs"]["alone"]
    assert runs["stop_string"]["finish"]["type"] == "stop" and plain_out["stop"] not in runs["stop_string"]["text"]
    assert runs["frequency_penalty"]["text"] != runs["ignore_eos"]["text"][: len(runs["frequency_penalty"]["text"])]
    assert len(runs["n2"]) == 2 and runs["echo"][0]["text"].startswith(PROMPT)
    assert len(runs["logprobs_top3"]["top"][0]) == 3


def test_every_request_kind_identical_to_plain(eff, plain_out):
    before = eff.effrollout_state()["metrics"]["iterations_spec"]
    _same(_run(eff, plain_out["stop"]), plain_out["runs"])
    assert eff.effrollout_state()["metrics"]["iterations_spec"] > before  # the unconstrained ones speculated


def test_streaming_score_and_length_check_as_plain(eff, plain_out):
    assert _streamed(eff) == plain_out["streamed"]
    _same(_score(eff), plain_out["score"])
    status, text = _too_long(eff)
    assert (status, text) == plain_out["too_long"] and status == 400
