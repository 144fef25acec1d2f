"""A real SGLang server on the portable CPU platform, driven over real HTTP (plain decoding).

The session's float32 plain server (conftest): float32 so that greedy ties cannot decide the
comparison against transformers.
"""

from __future__ import annotations

import json

import pytest
import requests

PROMPT = "Alice has 12 apples. She buys 7 more. How many"


@pytest.fixture(scope="module")
def server(plain):
    return plain  # the session's float32 plain server (conftest)


def test_health(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_greedy_is_deterministic_and_equals_transformers(server, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = server.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True)
    b = server.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert a["output_ids"] == b["output_ids"] and len(a["output_ids"]) == 32

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(32):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert a["output_ids"] == ids[0, -32:].tolist()


def test_completions_n_logprobs_stop_max_tokens(server):
    r = server.post(
        "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 4, "logprobs": 2}
    )
    assert len(r["choices"]) == 4
    for c in r["choices"]:
        assert len(c["logprobs"]["token_logprobs"]) <= 12
        assert all(lp <= 0 for lp in c["logprobs"]["token_logprobs"])
    assert r["usage"]["completion_tokens"] <= 48

    full = server.post("/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    text = full["choices"][0]["text"]
    stop = text[5:8]  # a string the greedy continuation is known to contain
    cut = server.post(
        "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop]}
    )
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.index(stop)]


def test_chat_completions_plain_and_streaming(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 10, "temperature": 0}
    plain = server.post("/v1/chat/completions", body)
    content = plain["choices"][0]["message"]["content"]
    assert plain["usage"]["completion_tokens"] <= 10
    # The chat template was applied: the prompt is longer than the raw question.
    assert plain["usage"]["prompt_tokens"] > 6

    chunks = []
    with requests.post(
        server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    chunks.append(delta[0]["delta"]["content"])
    assert "".join(chunks) == content


def test_generate_logprobs(server):
    r = server.post(
        "/generate",
        {
            "text": PROMPT,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 3,
        },
    )
    lps = r["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == r["output_ids"]
    tops = r["meta_info"]["output_top_logprobs"]
    # greedy: the chosen token is the most likely one
    assert all(top[0][1] == tok for top, tok in zip(tops, r["output_ids"]))


def test_radix_cache_reports_cached_prefix(server):
    prefix = "Grace has 41 stickers. Grace gives away 9 stickers. Then Grace makes 3 times as many. " * 3
    server.generate(prefix + "How many?", max_new_tokens=2, temperature=0)
    second = server.generate(prefix + "What now?", max_new_tokens=2, temperature=0)
    assert second["meta_info"]["cached_tokens"] > 20
