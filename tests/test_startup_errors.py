"""Bad server arguments: the process exits, says what is wrong, and leaves no process behind."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from sglang_er.launcher import free_port


def _launch(args, timeout=180):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--port", str(free_port()), "--max-total-tokens", "2048", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    orphans = [p for p in psutil.process_iter(["pid", "cmdline"])
               if p.info["cmdline"] and any(f"--port" == a for a in p.info["cmdline"])
               and str(cmd[4]) in p.info["cmdline"]]
    return proc.returncode, out, orphans


@pytest.mark.parametrize("case", ["missing_model", "unknown_device", "impossible_context"])
def test_bad_args_exit_with_a_clear_message(case, tiny_model):
    if case == "missing_model":
        code, out, orphans = _launch(["--model-path", "/nonexistent/model-dir", "--device", "cpu"])
        expect = ["/nonexistent/model-dir"]
    elif case == "unknown_device":
        code, out, orphans = _launch(["--model-path", str(tiny_model), "--device", "quantum"])
        expect = ["quantum"]
    else:
        code, out, orphans = _launch(["--model-path", str(tiny_model), "--device", "cpu", "--context-length", "100000000"])
        expect = ["context"]
    assert code != 0
    assert all(e.lower() in out.lower() for e in expect), out[-3000:]
    assert not orphans
