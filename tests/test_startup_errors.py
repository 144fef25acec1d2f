"""Bad server arguments: the process exits, says what is wrong, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from helpers import SPAWN_ENV

from sglang_er.launcher import free_port


def _launch(args, timeout=180):
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--port",
        str(free_port()),
        "--max-total-tokens",
        "2048",
        *args,
    ]
    env = {**os.environ, **SPAWN_ENV}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    orphans = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["cmdline"] and any("--port" == a for a in p.info["cmdline"]) and str(cmd[4]) in p.info["cmdline"]
    ]
    return proc.returncode, out, orphans


CASES = {  # case: (server args, what the message must name)
    "missing_model": (["--model-path", "/nonexistent/model-dir", "--device", "cpu"], ["/nonexistent/model-dir"]),
    "unknown_device": (["--device", "quantum"], ["quantum"]),
    "impossible_context": (["--device", "cpu", "--context-length", "100000000"], ["context"]),
}


@pytest.fixture(scope="module")
def launched(tiny_model):
    """All cases side by side: each is mostly an SGLang import on one core."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case):
        args, _ = CASES[case]
        if "--model-path" not in args:
            args = ["--model-path", str(tiny_model), *args]
        return case, _launch(args)

    with ThreadPoolExecutor(len(CASES)) as ex:
        return dict(ex.map(run, CASES))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_args_exit_with_a_clear_message(case, launched):
    code, out, orphans = launched[case]
    expect = CASES[case][1]
    assert code != 0
    assert all(e.lower() in out.lower() for e in expect), out[-3000:]
    assert not orphans


def test_a_port_taken_during_startup_is_replaced(tiny_model, monkeypatch):
    """SGLang's internal sockets and the HTTP port come from the same free ports; when one of them
    takes the port first, the launcher starts again on another instead of waiting for a health
    check that can never pass."""
    import socket

    from sglang_er import launcher

    real = launcher.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        monkeypatch.setattr(launcher, "free_port", lambda: next(ports, None) or real())
        # started as the product starts a server (spawned scheduler), unlike the suite's others
        srv = launcher.Server(
            tiny_model, ["--dtype", "float32"], env=SPAWN_ENV, stop_grace=1.0, startup_timeout=240
        ).start()
        try:
            assert srv.port != busy
            assert srv.generate("Alice has", max_new_tokens=2, temperature=0)["meta_info"]["completion_tokens"] == 2
        finally:
            srv.stop()
