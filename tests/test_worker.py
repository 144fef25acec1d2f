"""EFFROLLOUT through real SGLang servers: lossless greedy, exact sampling, logprobs, edge cases.

Servers (float32 tiny model so greedy ties cannot decide a comparison), one per configuration:
plain decoding and EFFROLLOUT with fixed γ=3 (both shared with other modules); EFFROLLOUT with γ
cycling 1,7,0,7,3,0 per iteration (γ max 7), under SGLang's overlap scheduler (the default) and
without it (``--disable-overlap-schedule``). A deliberately wrong acceptance rule, planted in the γ=3
server for one test, proves the distribution test can fail.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, joint_first3, same_distribution_pvalue, start_server, start_servers
from helpers import greedy_all as _greedy_all

EFF = ["--speculative-algorithm", "EFFROLLOUT"]


@pytest.fixture(scope="module")
def cycle_servers(tiny_model):
    """γ cycling 1, 7, 0, 7, 3, 0 with the overlap scheduler (SGLang's default) and without it,
    started side by side."""
    cycle = [*FP32, *EFF, "--speculative-num-steps", "7"]
    env = {"env": {"SGLANG_ER_GAMMA": "1,7,0,7,3,0"}}
    pair = start_servers((tiny_model, cycle, env), (tiny_model, [*cycle, "--disable-overlap-schedule"], env))
    yield pair
    for srv in pair:
        srv.stop()


@pytest.fixture(scope="module")
def eff_cycle(cycle_servers):
    return cycle_servers[0]


@pytest.fixture(scope="module")
def eff_cycle_sync(cycle_servers):
    return cycle_servers[1]


def test_overlap_scheduler_on_by_default_and_off_on_request(eff_cycle, eff_cycle_sync):
    info = [requests.get(s.url + "/get_server_info", timeout=30).json() for s in (eff_cycle, eff_cycle_sync)]
    assert [i["disable_overlap_schedule"] for i in info] == [False, True]


@pytest.mark.parametrize("which", ["eff3", "eff_cycle", "eff_cycle_sync"])
def test_greedy_identical_to_plain(which, request, plain_greedy):
    srv = request.getfixturevalue(which)
    prompts, expected = plain_greedy
    got = _greedy_all(srv, prompts)
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(prompts)} prompts differ, e.g. #{mismatched[0]}"


def test_speculation_really_happens_and_meta_info_adds_up(eff3):
    r = eff3.generate("Alice has 12 apples. She buys", max_new_tokens=64, temperature=0, ignore_eos=True)
    m = r["meta_info"]
    assert m["completion_tokens"] == 64
    assert m["spec_verify_ct"] < 64  # fewer target steps than tokens: drafts were accepted
    assert m["spec_num_correct_drafts"] > 0
    assert sum(m["spec_correct_drafts_histogram"]) == m["spec_verify_ct"]


@pytest.mark.parametrize("which", ["eff_cycle", "eff_cycle_sync"])
def test_meta_info_counts_plain_iterations_as_plain(which, request):
    """γ cycles 1,7,0,7,3,0: SGLang's own fields would count the γ = 0 iterations as failed
    drafts of γmax = 7; sglang-er's fields count what was really proposed."""
    srv = request.getfixturevalue(which)
    r = srv.generate("Alice has 12 apples. She buys", max_new_tokens=64, temperature=0, ignore_eos=True)
    m = r["meta_info"]
    gammas = m["spec_gamma"]  # the request's γ timeline, one entry per decode iteration
    assert set(gammas) <= {0, 1, 3, 7} and 0 in gammas
    n_plain = gammas.count(0)
    assert m["spec_plain_iterations"] == n_plain
    assert m["spec_verify_ct"] == len(gammas) - n_plain
    assert m["spec_num_proposed_drafts"] == sum(gammas)
    assert m["spec_num_correct_drafts"] <= sum(gammas)  # never more accepted than proposed
    assert m["spec_accept_rate"] == pytest.approx(m["spec_num_correct_drafts"] / sum(gammas))
    assert m["spec_accept_length"] == pytest.approx((64 - n_plain) / m["spec_verify_ct"])
    assert sum(m["spec_correct_drafts_histogram"]) == m["spec_verify_ct"]
    # every committed token is accounted for: 1 from prefill, 1 per plain step, accepted+1 per draft round
    assert 1 + n_plain + m["spec_verify_ct"] + m["spec_num_correct_drafts"] >= 64


def test_meta_info_adds_up_when_streamed(eff_cycle):
    """Streamed, SGLang sends the per-token tags in slices at every chunk: the γ timeline must still
    hold every iteration (one lost entry drops a one-token iteration from it)."""
    payload = {
        "text": "Alice has 12 apples. She buys",
        "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    chunks = []
    with requests.post(eff_cycle.url + "/generate", json=payload, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[len(b"data: ") :]))
    assert len(chunks) > 8  # really streamed in many slices
    m = chunks[-1]["meta_info"]
    gammas = m["spec_gamma"]
    n_plain = gammas.count(0)
    assert m["spec_plain_iterations"] == n_plain
    assert m["spec_num_proposed_drafts"] == sum(gammas)
    assert sum(m["spec_correct_drafts_histogram"]) == m["spec_verify_ct"] == len(gammas) - n_plain
    assert 1 + n_plain + m["spec_verify_ct"] + m["spec_num_correct_drafts"] >= 64


def test_kv_capacity_unchanged_and_state_reported(plain, eff3):
    """The drafter owns no KV: the same pool size as the plain server; its state is in server info."""
    a = requests.get(plain.url + "/get_server_info", timeout=30).json()
    b = requests.get(eff3.url + "/get_server_info", timeout=30).json()
    assert b["max_total_num_tokens"] == a["max_total_num_tokens"]
    eff3.generate(PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True)
    st = eff3.effrollout_state()
    assert st["mode"] == "fixed" and st["gamma_max"] == 3
    assert 0 < st["drafter_weight_bytes"]
    # a float32 model has no 4-bit kernel: the drafter runs dequantized weights, and says so at start
    assert st["w4_kernels"].keys() == {"torch"} and "float32" in st["w4_kernels"]["torch"]
    log = eff3.log_path.read_text(errors="replace")
    assert "EFFROLLOUT W4 kernel torch" in log and "speculation will rarely pay" in log
    last = st["timeline"][-1]
    assert last["gamma"] == 3 and last["batch_size"] >= 1 and last["verify_s"] > 0
    assert st["metrics"]["iterations_spec"] > 0


PROMPT = "Alice has 12 apples. She buys 7 more. How many"
N_SAMPLES = 2000


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 1.0, "top_p": 0.9},
        {"temperature": 1.0, "top_k": 20},
    ],
    ids=["t1", "top_p", "top_k"],
)
def test_sampled_joint_distribution_matches_plain(sampling, plain, eff3):
    def pvalue():
        return same_distribution_pvalue(
            joint_first3(plain, PROMPT, N_SAMPLES, **sampling), joint_first3(eff3, PROMPT, N_SAMPLES, **sampling)
        )

    p = pvalue()
    if p <= 0.01:  # a correct sampler lands here 1% of the time: one fresh draw decides
        p = pvalue()
    assert p > 0.01, f"EFFROLLOUT's first-3-token distribution differs from plain (p={p:.2e})"


def test_distribution_test_detects_a_wrong_acceptance_rule(plain, eff3):
    reference = joint_first3(plain, PROMPT, N_SAMPLES, temperature=1.0)
    with eff3.faults.planted("accept_all"):
        p = same_distribution_pvalue(reference, joint_first3(eff3, PROMPT, N_SAMPLES, temperature=1.0))
    assert p < 1e-4, f"accept-every-draft went undetected (p={p:.2e})"


@pytest.mark.parametrize("which", ["eff3", "eff_cycle"])  # eff_cycle: γ = 0 iterations too
def test_logprobs_are_the_targets(plain, which, request):
    body = {
        "text": PROMPT,
        "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
        "top_logprobs_num": 3,
    }
    a = plain.post("/generate", body)
    b = request.getfixturevalue(which).post("/generate", body)
    assert a["output_ids"] == b["output_ids"]
    for (la, ta, _), (lb, tb, _) in zip(
        a["meta_info"]["output_token_logprobs"], b["meta_info"]["output_token_logprobs"]
    ):
        assert ta == tb and abs(la - lb) < 1e-3
    for ra, rb in zip(a["meta_info"]["output_top_logprobs"], b["meta_info"]["output_top_logprobs"]):
        assert [t for _, t, _ in ra] == [t for _, t, _ in rb]
        assert all(abs(x[0] - y[0]) < 1e-3 for x, y in zip(ra, rb))


def test_sampled_logprobs_are_the_targets(plain, eff_cycle):
    """At T = 1, through γ = 0 iterations too, every output logprob is the target's: a plain
    server's prefill scores the same tokens alike. (At T > 0 SGLang's sampler overwrites the logits
    in place with probabilities, so a plain step's logprobs recomputed from them came out near
    −log V.) T = 1, because prefill logprobs are untempered."""
    body = {"text": PROMPT, "return_logprob": True, "top_logprobs_num": 3}
    out = eff_cycle.post("/generate", {**body, "sampling_params": {"max_new_tokens": 24, "temperature": 1.0}})
    one = {"max_new_tokens": 1, "temperature": 0}
    listed = plain.post("/generate", {**body, "sampling_params": one, "logprob_start_len": 0})["meta_info"]
    prompt_ids = [t for _, t, _ in listed["input_token_logprobs"]]
    scored = plain.post(
        "/generate",
        {
            "input_ids": prompt_ids + out["output_ids"],
            "sampling_params": one,
            "return_logprob": True,
            "top_logprobs_num": 3,
            "logprob_start_len": len(prompt_ids) - 1,  # SGLang gives the first position no logprob
        },
    )["meta_info"]
    want, got = scored["input_token_logprobs"][1:], out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in want] == out["output_ids"] == [t for _, t, _ in got]
    assert max(abs(a - b) for (a, _, _), (b, _, _) in zip(want, got)) < 1e-3
    for ra, rb in zip(scored["input_top_logprobs"][1:], out["meta_info"]["output_top_logprobs"]):
        assert [t for _, t, _ in ra] == [t for _, t, _ in rb]
        assert all(abs(x[0] - y[0]) < 1e-3 for x, y in zip(ra, rb))


def test_max_new_tokens_below_gamma(plain, eff3):
    for k in (1, 2, 3):
        a = plain.generate(PROMPT, max_new_tokens=k, temperature=0, ignore_eos=True)
        b = eff3.generate(PROMPT, max_new_tokens=k, temperature=0, ignore_eos=True)
        assert b["output_ids"] == a["output_ids"] and len(b["output_ids"]) == k


def test_stop_strings_and_stop_tokens_inside_accepted_runs(plain, eff3):
    full = plain.generate(PROMPT, max_new_tokens=48, temperature=0, ignore_eos=True)
    text, ids = full["text"], full["output_ids"]
    for start in (3, 7, 12, 20):
        stop = text[start : start + 3]
        a = plain.generate(PROMPT, max_new_tokens=48, temperature=0, stop=[stop])
        b = eff3.generate(PROMPT, max_new_tokens=48, temperature=0, stop=[stop])
        assert b["text"] == a["text"] and b["output_ids"] == a["output_ids"]
    for pos in (2, 5, 9):
        a = plain.generate(PROMPT, max_new_tokens=48, temperature=0, stop_token_ids=[ids[pos]])
        b = eff3.generate(PROMPT, max_new_tokens=48, temperature=0, stop_token_ids=[ids[pos]])
        assert b["output_ids"] == a["output_ids"]
        assert b["meta_info"]["finish_reason"] == a["meta_info"]["finish_reason"]


def test_n8_sampling_and_mixed_batch(plain, eff3):
    r = eff3.post("/v1/completions", {"model": "m", "prompt": PROMPT, "n": 8, "max_tokens": 16, "temperature": 1.0})
    assert len(r["choices"]) == 8 and all(c["text"] is not None for c in r["choices"])

    # greedy and sampled requests (different temperatures) decoded in the same iterations
    greedy_expected = plain.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True)["output_ids"]

    def job(i):
        if i % 3 == 0:
            return eff3.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True)["output_ids"]
        return eff3.generate(PROMPT, max_new_tokens=32, temperature=0.5 + i / 10, ignore_eos=True)["output_ids"]

    with ThreadPoolExecutor(9) as ex:
        outs = list(ex.map(job, range(9)))
    assert all(outs[i] == greedy_expected for i in range(0, 9, 3))
    assert all(len(o) == 32 for o in outs)


def test_streaming_equals_non_streaming(eff3):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    plain_text = eff3.post("/v1/completions", body)["choices"][0]["text"]
    parts = []
    with requests.post(eff3.url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                ch = json.loads(line[6:])["choices"]
                if ch:
                    parts.append(ch[0]["text"])
    assert "".join(parts) == plain_text


def test_abort_mid_generation_leaves_others_lossless(plain, eff3):
    expected = plain.generate(PROMPT, max_new_tokens=200, temperature=0, ignore_eos=True)["output_ids"]
    result = {}

    def long_job():
        r = requests.post(
            eff3.url + "/generate",
            json={
                "text": "Solve for x: 3x + 5 = 20.",
                "rid": "to-abort",
                "sampling_params": {"max_new_tokens": 3000, "temperature": 1.0, "ignore_eos": True},
            },
            timeout=300,
        )
        result["long"] = r.json()

    t = threading.Thread(target=long_job)
    t.start()
    other = eff3.generate(PROMPT, max_new_tokens=200, temperature=0, ignore_eos=True)
    requests.post(eff3.url + "/abort_request", json={"rid": "to-abort"}, timeout=30)
    t.join(timeout=120)
    assert not t.is_alive()
    assert result["long"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert other["output_ids"] == expected


def test_auto_policy_speculates_alone_and_not_in_a_compute_bound_batch(tiny_model, plain, plain_greedy, tmp_path):
    """A profile whose ridge point puts batch 1 in the memory-bound regime and batch ≥ 4 in the
    compute-bound one: a lone request speculates, a batch of 24 decodes plainly (both ways within
    one server, decided per iteration) (asserted on the
    worker's recorded decisions, not on time), and every output stays the plain server's."""
    from sglang_er.gamma.builtin_profiles import builtin_profile

    base = builtin_profile("cpu")
    profile = base.model_copy(
        update=dict(
            name="test-ridge",
            bandwidth_bytes_per_s=1e9,
            flops_per_s={k: 4e9 for k in base.flops_per_s},
            fixed_plain_s=1e-4,
            fixed_draft_step_s=1e-4,
            fixed_verify_s=1e-4,
            per_seq_s=0.0,
            per_seq_draft_s=0.0,
        )
    )
    path = profile.save(tmp_path / "profile.json")
    # Exploration off: it would measure speculation at B = 24 once, and on this machine the tiny
    # model's measured speculation pays there, which (rightly) overrides this synthetic profile.
    # No server warm-up: its request's drafts (a few iterations, sometimes none accepted) would
    # teach the acceptance model before the lone request, which then never speculates to unlearn it.
    srv = start_server(
        tiny_model,
        [*FP32, *EFF, "--speculative-num-steps", "7", "--skip-server-warmup"],
        env={"SGLANG_ER_MODE": "auto", "SGLANG_ER_PROFILE": str(path), "SGLANG_ER_EXPLORE_EVERY": "0"},
    )
    try:
        alone = srv.generate(PROMPT, max_new_tokens=48, temperature=0, ignore_eos=True)
        t_alone = _timeline(srv)
        prompts, expected = plain_greedy
        # one batched request: all 24 are admitted together, so no decode runs at a middle batch size
        # first (speculation measured there would teach the model the tiny model's own ridge)
        batch = srv.generate(prompts[:24], max_new_tokens=40, temperature=0, ignore_eos=True)
        assert len(batch) == 24
        t_all = _timeline(srv)
    finally:
        srv.stop()
    assert (
        alone["output_ids"] == plain.generate(PROMPT, max_new_tokens=48, temperature=0, ignore_eos=True)["output_ids"]
    )
    for i, r in enumerate(batch):
        assert r["output_ids"] == expected[i][:40]
    # alone: speculation predicted to pay (live correction may still veto some iterations)
    lone = [x["gamma"] for x in t_alone if x["batch_size"] == 1]
    assert any(g > 0 for g in lone), lone
    big = [x["gamma"] for x in t_all if x["batch_size"] >= 16]
    assert big and sum(g == 0 for g in big) > 0.8 * len(big), big
    # a plain iteration records the best speculative γ's predicted gain: below min_gain (1.05),
    # within the hysteresis (1.02) where plain was kept
    lost = [x["best_spec_speedup"] for x in t_all if x["batch_size"] >= 16 and x["gamma"] == 0]
    assert lost and all(v is not None and 0 < v < 1.05 * 1.02 for v in lost), lost
    assert alone["meta_info"]["spec_verify_ct"] > 0, alone["meta_info"]


def _timeline(srv):
    st = srv.effrollout_state()
    assert st["mode"] == "auto" and st["policy"]["profile"] == "test-ridge"
    return st["timeline"]
