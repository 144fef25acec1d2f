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


# What SGLang's HTTP server does last in a start whose port was taken meanwhile: the same uvicorn
# server on the same port, without loading a model first (seconds instead of a second full start).
BIND_LAST = """
import sys, uvicorn
uvicorn.Server(uvicorn.Config(lambda *a: None, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop")).run()
sys.exit(1)
"""


def test_a_port_taken_during_startup_is_replaced(tiny_model, monkeypatch):
    """SGLang's internal sockets and the HTTP port come from the same free ports; when one of them
    takes the port first, the server fails as its HTTP server binds, and the launcher starts again
    on another port instead of waiting for a health check that can never pass. The first start is
    that failing bind itself (uvicorn's own error on a port in use); the second is a real server."""
    import socket

    from sglang_er import launcher

    real_port, real_launch = launcher.free_port, launcher.Server.launch
    starts = []

    def launch(self):
        starts.append(self.port)
        if len(starts) > 1:
            return real_launch(self)
        args, self.args = self.args, [sys.executable, "-c", BIND_LAST, str(self.port)]
        try:
            return real_launch(self)
        finally:
            self.args = args

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        monkeypatch.setattr(launcher, "free_port", lambda: next(ports, None) or real_port())
        monkeypatch.setattr(launcher.Server, "launch", launch)
        # started as the product starts a server (spawned scheduler), unlike the suite's others
        srv = launcher.Server(
            tiny_model, ["--dtype", "float32"], env=SPAWN_ENV, stop_grace=1.0, startup_timeout=240
        ).start()
        try:
            assert starts[0] == busy and len(starts) == 2 and srv.port == starts[1] != busy
            assert srv.generate("Alice has", max_new_tokens=2, temperature=0)["meta_info"]["completion_tokens"] == 2
        finally:
            srv.stop()
