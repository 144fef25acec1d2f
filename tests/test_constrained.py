"""Constrained decoding under EFFROLLOUT: every endpoint, every grammar kind, alone and mixed.

SGLang attaches a request's grammar to ``Req.grammar`` and fills the batch's sampling info from it
only when it builds the forward batch, so the worker must look at the requests themselves. Real
SmolLM2-135M-Instruct in float32 (chat template, so regex/JSON answers are real text), a plain server
and an EFFROLLOUT server with fixed γ = 3: every output must equal plain's, token for token, and
constrained requests speculate (drafts drawn under the grammar's masks).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, same_distribution_pvalue, start_servers

MODEL = "smollm2-135m-instruct"
EFF = ["--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"]

REGEX = r'\{"name": "[A-Z][a-z]{1,10}", "age": [1-9][0-9]?\}'
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "unit": {"type": "string", "enum": ["apples", "pears"]}},
    "required": ["answer", "unit"],
}
EBNF = 'root ::= "The answer is " [0-9]+ " " ("apples" | "pears") "."'
QUESTION = "Alice has 12 apples. She buys 7 more. How many apples does she have?"
PERSON = "Describe a person called Bob who is 34 as a JSON object."


def _chat(content: str, **extra) -> tuple[str, dict]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 64, "temperature": 0}
    return "/v1/chat/completions", {**body, **extra}


# (endpoint, payload, how to read the text out of the response)
CASES = {
    "generate-regex": (
        "/generate",
        {"text": PERSON + "\n", "sampling_params": {"max_new_tokens": 64, "temperature": 0, "regex": REGEX}},
        lambda r: r["text"],
    ),
    "generate-ebnf": (
        "/generate",
        {"text": QUESTION + "\n", "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ebnf": EBNF}},
        lambda r: r["text"],
    ),
    "completions-regex": (
        "/v1/completions",
        {"model": "m", "prompt": PERSON + "\n", "max_tokens": 64, "temperature": 0, "regex": REGEX},
        lambda r: r["choices"][0]["text"],
    ),
    "chat-regex": (*_chat(PERSON, regex=REGEX), lambda r: r["choices"][0]["message"]["content"]),
    "chat-json-schema": (
        *_chat(
            QUESTION + " Answer in JSON.",
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        ),
        lambda r: r["choices"][0]["message"]["content"],
    ),
    "responses-json-schema": (
        "/v1/responses",
        {
            "model": "m",
            "input": QUESTION + " Answer in JSON.",
            "max_output_tokens": 64,
            "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA}},
        },
        lambda r: next(c["text"] for o in r["output"] if o["type"] == "message" for c in o["content"]),
    ),
}
# sampled: at T = 1 the grammar leaves 12 answers, drawn over several draft positions
PICK = "Name a colour and an animal:"
PICK_EBNF = 'root ::= ("red" | "green" | "blue" | "yellow") " " ("cat" | "dog" | "bird") "."'
SAMPLES = 600
FREE = [_chat(f"Count from {i} to {i + 20}, one number per line.", max_tokens=48) for i in range(3)]


def _run(srv) -> dict:
    """Every case alone, then all at once mixed with unconstrained chats (one batch)."""
    model = requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]  # /v1/responses checks it

    def post(path, payload, read):
        return read(srv.post(path, {**payload, "model": model} if "model" in payload else payload))

    alone = {name: post(*case) for name, case in CASES.items()}
    jobs = list(CASES.values()) + [
        (path, payload, lambda r: r["choices"][0]["message"]["content"]) for path, payload in FREE
    ]
    with ThreadPoolExecutor(len(jobs)) as ex:
        mixed = list(ex.map(lambda j: post(*j), jobs))
    return {"alone": alone, "mixed": mixed}


def _sampled(srv) -> Counter:
    """The answers of SAMPLES requests at T = 1 under PICK_EBNF."""

    def chunk(k):
        params = {"max_new_tokens": 16, "temperature": 1.0, "ebnf": PICK_EBNF}
        return [o["text"] for o in srv.post("/generate", {"text": [PICK] * k, "sampling_params": params})]

    with ThreadPoolExecutor(4) as ex:
        return Counter(t for part in ex.map(chunk, [SAMPLES // 6] * 6) for t in part)


@pytest.fixture(scope="module")
def model_path():
    from sglang_er.models.factory import build_model

    return build_model(MODEL)


@pytest.fixture(scope="module")
def servers(model_path):
    """Plain and EFFROLLOUT (γ = 3), started side by side."""
    pair = start_servers((model_path, FP32), (model_path, [*FP32, *EFF], {"env": {"SGLANG_ER_GAMMA": "3"}}))
    yield pair
    for srv in pair:
        srv.stop()


@pytest.fixture(scope="module")
def plain_out(servers):
    return {**_run(servers[0]), "sampled": _sampled(servers[0])}


@pytest.fixture(scope="module")
def eff(servers):
    return servers[1]


def test_plain_outputs_obey_their_grammars(plain_out):
    """The cases are real constraints: plain SGLang's answers match them (else the comparison is empty)."""
    a = plain_out["alone"]
    for name in ("generate-regex", "completions-regex", "chat-regex"):
        assert re.fullmatch(REGEX, a[name]), (name, a[name])
    for name in ("chat-json-schema", "responses-json-schema"):
        assert set(json.loads(a[name])) == {"answer", "unit"}, (name, a[name])
    assert re.fullmatch(r"The answer is [0-9]+ (apples|pears)\.", a["generate-ebnf"])


def test_constrained_requests_identical_to_plain(eff, plain_out):
    got = _run(eff)
    assert got["alone"] == plain_out["alone"]
    assert got["mixed"] == plain_out["mixed"]


def test_constrained_requests_speculate(eff):
    """A constrained request drafts under its grammar: its iterations are speculative and most of
    its forced JSON structure is accepted."""
    before = eff.effrollout_state()["metrics"]
    path, payload, _ = CASES["chat-json-schema"]
    eff.post(path, payload)
    after = eff.effrollout_state()["metrics"]
    assert after["iterations_spec"] > before["iterations_spec"]
    accepted = after["accepted"] - before["accepted"]
    proposed = after["drafted"] - before["drafted"]
    assert accepted > 0.5 * proposed, (accepted, proposed)


def test_sampled_constrained_answers_follow_plain(eff, plain_out):
    """At T = 1 the answers under a grammar follow plain SGLang's distribution (the chi-square of
    the deep losslessness tests, which planted acceptance bugs fail)."""
    before = eff.effrollout_state()["metrics"]["iterations_spec"]
    got = _sampled(eff)
    assert eff.effrollout_state()["metrics"]["iterations_spec"] > before
    assert all(re.fullmatch(r"(red|green|blue|yellow) (cat|dog|bird)\.", t) for t in got), got
    p = same_distribution_pvalue(plain_out["sampled"], got)
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p = same_distribution_pvalue(plain_out["sampled"], _sampled(eff))
    assert p > 0.01, (p, plain_out["sampled"], got)


def test_unconstrained_requests_still_speculate(eff):
    before = eff.effrollout_state()["metrics"]["iterations_spec"]
    eff.post(*FREE[0])
    assert eff.effrollout_state()["metrics"]["iterations_spec"] > before
