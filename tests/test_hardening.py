"""Hardening: load, aborts and disconnects, memory pressure, bad input, shutdown.

One EFFROLLOUT server in ``auto`` mode with history drafts on (``SGLANG_ER_HISTORY=all``: the
load repeats prompts, so W4, history and verify-only iterations mix) for the module, built to be
stressed: a KV pool of
only 2048 tokens and an aggressive admission setting (``--schedule-conservativeness``), so
that SGLang has to retract and re-schedule decoding requests, and SGLang's idle leak check
made fatal (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE``): a leaked draft slot would
take the server down, and every test ends by checking it still answers. Reference outputs
come from the session's plain server. The last test shuts the module's server down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import FP32, greedy_all, start_server

PROMPT = "Alice has 12 apples. She buys 7 more. How many"
EFF_AUTO = [
    *FP32,
    "--speculative-algorithm",
    "EFFROLLOUT",
    "--enable-metrics",
    "--schedule-conservativeness",
    "0.05",
    "--max-running-requests",
    "64",
]


@pytest.fixture(scope="module")
def eff(tiny_model):
    srv = start_server(
        tiny_model,
        EFF_AUTO,
        max_total_tokens=2048,
        env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", "SGLANG_ER_HISTORY": "all"},
    )
    yield srv
    srv.stop()


def _metric(srv, name: str) -> float:
    total = 0.0
    for line in requests.get(srv.url + "/metrics", timeout=30).text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(1))
    return total


def _wait_idle(srv, timeout=60.0) -> dict:
    """Until SGLang reports no running or waiting request; returns its load snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        load = srv.loads()
        if load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0:
            time.sleep(1.0)  # one more idle round: the scheduler's leak check runs when idle
            return srv.loads()
        assert time.monotonic() < deadline, f"server not idle after {timeout}s: {load}"
        time.sleep(0.5)


def _assert_healthy_and_lossless(srv, plain):
    assert requests.get(srv.url + "/health", timeout=30).status_code == 200
    a = plain.generate(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True)["output_ids"]
    assert srv.generate(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True)["output_ids"] == a


def test_auto_mode_is_lossless_and_reports_its_choices(eff, plain_greedy):
    """Default mode: γ chosen per iteration by the policy; exported on /metrics."""
    prompts, expected = plain_greedy
    assert greedy_all(eff, prompts[:12]) == expected[:12]
    metrics = requests.get(eff.url + "/metrics", timeout=30).text
    for name in (
        "sglang_er:iterations_total",
        "sglang_er:gamma",
        "sglang_er:phase_seconds_total",
        "sglang_er:gamma_chosen_bucket",
        "sglang_er:model_rel_error",
        "sglang_er:alpha",
    ):
        assert name in metrics, name
    assert eff.effrollout_state()["mode"] == "auto"


def test_memory_pressure_retracts_and_stays_lossless(eff, plain, plain_greedy):
    """Long greedy generations that cannot all fit: retracted requests are re-prefilled and
    resume; every output equals the plain server's. (First on the server: after a retraction
    SGLang admits conservatively for a few hundred iterations.)"""
    prompts, _ = plain_greedy
    chosen = prompts[:24]
    retracted0 = _metric(eff, "sglang:num_retracted_requests_total")

    def run(srv):  # no ignore_eos: SGLang then admits on its estimate of the output length, not the cap
        with ThreadPoolExecutor(24) as ex:
            return list(ex.map(lambda p: srv.generate(p, max_new_tokens=200, temperature=0)["output_ids"], chosen))

    got = run(eff)
    assert _metric(eff, "sglang:num_retracted_requests_total") > retracted0
    assert got == run(plain)
    assert _wait_idle(eff)["num_used_tokens"] == 0


def test_load_256_mixed_requests(eff, plain, plain_greedy):
    """256 concurrent requests (greedy, sampled, n=4, streaming, logprobs) against a 2048-token
    KV pool (queued, admitted and retracted by SGLang as memory allows): all complete, none
    errors, greedy ones equal the plain server's, KV usage returns to 0."""
    prompts, _ = plain_greedy

    def job(i):
        p = prompts[i % len(prompts)]
        kind = i % 5
        if kind == 0:
            return "greedy", i, eff.generate(p, max_new_tokens=32, temperature=0, ignore_eos=True)["output_ids"]
        if kind == 1:
            r = eff.generate(p, max_new_tokens=32, temperature=1.0, top_p=0.9, ignore_eos=True)
            return "sampled", i, len(r["output_ids"])
        if kind == 2:
            r = eff.post("/v1/completions", {"model": "m", "prompt": p, "n": 4, "max_tokens": 24, "temperature": 1.0})
            return "n4", i, len(r["choices"])
        if kind == 3:
            text = []
            with requests.post(
                eff.url + "/v1/completions",
                stream=True,
                timeout=600,
                json={"model": "m", "prompt": p, "max_tokens": 24, "temperature": 0.7, "stream": True},
            ) as r:
                assert r.status_code == 200, r.text
                for line in r.iter_lines():
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        ch = json.loads(line[6:])["choices"]
                        text.extend(c["text"] for c in ch)
            return "stream", i, len(text)
        r = eff.post(
            "/generate",
            {
                "text": p,
                "return_logprob": True,
                "top_logprobs_num": 2,
                "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
            },
        )
        lp = r["meta_info"]["output_token_logprobs"]
        return "logprobs", i, (len(lp), all(v is not None and v <= 0 for v, _, _ in lp))

    errors, results = [], []
    with ThreadPoolExecutor(256) as ex:
        for fut in [ex.submit(job, i) for i in range(256)]:
            try:
                results.append(fut.result(timeout=900))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(repr(e))
    assert not errors, f"{len(errors)} of 256 requests failed, e.g. {errors[0]}"
    by_kind = {}
    for kind, i, out in results:
        by_kind.setdefault(kind, []).append((i, out))
    assert all(n == 4 for _, n in by_kind["n4"])
    assert all(n == 32 for _, n in by_kind["sampled"])
    assert all(n > 0 for _, n in by_kind["stream"])
    assert all(out == (16, True) for _, out in by_kind["logprobs"])
    sample = by_kind["greedy"][::4]  # 13 of them, checked against the plain server
    expected = {
        i: plain.generate(prompts[i % len(prompts)], max_new_tokens=32, temperature=0, ignore_eos=True)["output_ids"]
        for i, _ in sample
    }
    assert all(out == expected[i] for i, out in sample)
    assert _wait_idle(eff)["num_used_tokens"] == 0
    _assert_healthy_and_lossless(eff, plain)


def test_aborts_and_disconnects_leak_nothing(eff, plain):
    """Streaming clients that hang up mid-stream and /abort_request during speculation: the
    other requests are unaffected and lossless, and idle KV usage returns to 0."""
    expected = plain.generate(PROMPT, max_new_tokens=120, temperature=0, ignore_eos=True)["output_ids"]
    done = {}

    def hang_up(i):
        with requests.post(
            eff.url + "/generate",
            stream=True,
            timeout=300,
            json={
                "text": f"{PROMPT} {i}",
                "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "temperature": 1.0, "ignore_eos": True},
            },
        ) as r:
            for k, _ in enumerate(r.iter_lines()):
                if k >= 5 + i:
                    break  # leaving the with-block closes the connection mid-stream

    def aborted(i):
        r = requests.post(
            eff.url + "/generate",
            timeout=300,
            json={
                "text": f"{PROMPT} abort {i}",
                "rid": f"abort-{i}",
                "sampling_params": {"max_new_tokens": 2000, "temperature": 1.0, "ignore_eos": True},
            },
        )
        done[f"abort-{i}"] = r.json()["meta_info"]["finish_reason"]["type"]

    def survivor(i):
        done[f"keep-{i}"] = eff.generate(PROMPT, max_new_tokens=120, temperature=0, ignore_eos=True)["output_ids"]

    threads = (
        [threading.Thread(target=hang_up, args=(i,)) for i in range(6)]
        + [threading.Thread(target=aborted, args=(i,)) for i in range(4)]
        + [threading.Thread(target=survivor, args=(i,)) for i in range(3)]
    )
    for t in threads:
        t.start()
    time.sleep(3.0)
    for i in range(4):
        requests.post(eff.url + "/abort_request", json={"rid": f"abort-{i}"}, timeout=30)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert all(done[f"abort-{i}"] == "abort" for i in range(4)), done
    assert all(done[f"keep-{i}"] == expected for i in range(3))
    assert _wait_idle(eff)["num_used_tokens"] == 0  # no leaked draft slots
    _assert_healthy_and_lossless(eff, plain)


BAD_GENERATE = {
    "negative temperature": {"temperature": -0.5},
    "top_p above 1": {"top_p": 1.5},
    "top_k = 0": {"top_k": 0},
    "min_p above 1": {"min_p": 2.0},
    "negative max_new_tokens": {"max_new_tokens": -3},
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_sampling_parameters_get_a_clear_4xx(eff, case):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, **BAD_GENERATE[case]}}
    r = requests.post(eff.url + "/generate", json=body, timeout=60)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    assert r.text.strip(), case


@pytest.mark.parametrize(
    "case,body",
    [
        ("max_tokens beyond the context", {"prompt": PROMPT, "max_tokens": 100_000}),
        ("empty prompt", {"prompt": "", "max_tokens": 8}),
        ("temperature not a number", {"prompt": PROMPT, "max_tokens": 8, "temperature": "hot"}),
    ],
    ids=["beyond-context", "empty-prompt", "temperature-string"],
)
def test_bad_openai_requests_get_a_clear_4xx(eff, plain, case, body):
    r = requests.post(eff.url + "/v1/completions", json={"model": "m", **body}, timeout=60)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    _assert_healthy_and_lossless(eff, plain)


def test_die_with_parent_leaves_no_orphan():
    """A process started the way the launcher starts SGLang dies with whoever started it, so a
    killed benchmark or demo leaves no server behind."""
    code = (
        "import subprocess, sys, time; from sglang_er.launcher import _die_with_parent; "
        "p = subprocess.Popen(['sleep', '120'], start_new_session=True, preexec_fn=_die_with_parent); "
        "print(p.pid, flush=True); time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the child outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(eff):
    """Last in the module: SIGTERM to the server's main process (what a supervisor or k8s
    sends) while requests are generating. SGLang drains: every in-flight request gets its
    complete answer, then the whole process tree (scheduler, detokenizer) exits in seconds."""
    outcomes = []

    def client(i):
        try:
            r = eff.generate(f"{PROMPT} {i}", max_new_tokens=200, temperature=1.0, ignore_eos=True, timeout=120)
            outcomes.append(("answer", len(r["output_ids"])))
        except Exception as e:  # noqa: BLE001 - an error is an outcome; a hang is the failure
            outcomes.append(("error", repr(e)[:200]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    pgid = os.getpgid(eff.proc.pid)
    eff.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=150)
    assert not any(t.is_alive() for t in threads), "a client still waits after SIGTERM"
    assert outcomes == [("answer", 200)] * 4, outcomes
    t_answered = time.monotonic()
    while time.monotonic() - t_answered < 30 and _group_alive(pgid):
        time.sleep(0.2)
    assert not _group_alive(pgid), "processes of the server's tree survive SIGTERM"
    assert eff.proc.wait(timeout=5) is not None


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                if os.getpgid(int(entry)) == pgid:
                    return True
            except ProcessLookupError:
                pass
    return False
