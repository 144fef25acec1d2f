"""Start and stop SGLang server processes: one place for tests, the demo and the benchmarks.

A server runs in its own process group so that stopping it takes the scheduler and
detokenizer children with it (SGLang does not always exit on SIGTERM within seconds), and
it gets SIGTERM from the kernel if the process that started it dies (PR_SET_PDEATHSIG on
Linux): a killed benchmark or demo leaves no server behind.
The KV pool is always capped: SGLang's default takes most of a small machine's RAM.

``fork_children=True`` (CPU only) starts ``python -m sglang_er.launcher`` instead: SGLang's own
launch with its scheduler and detokenizer forked rather than spawned. SGLang spawns because a
CUDA context cannot be forked; on a CPU a spawned child imports SGLang, torch and transformers
again (~0.7 GB of private memory and ~25 s on 2 cores per child), a forked one shares the
parent's. What the scheduler computes is the same either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

DEFAULT_MAX_TOTAL_TOKENS = 16384

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class _PortTaken(Exception):
    pass


_BIND_ERROR = "error while attempting to bind on address"


class Server:
    """A ``python -m sglang.launch_server`` child process.

    >>> with Server(model_path, ["--speculative-algorithm", "EFFROLLOUT"]) as srv:
    ...     requests.post(srv.url + "/generate", json=...)
    """

    def __init__(
        self,
        model_path: str | Path,
        extra_args: list[str] | None = None,
        *,
        port: int | None = None,
        max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 300.0,
        stop_grace: float = 5.0,
        fork_children: bool = False,
    ):
        self._port_given = port is not None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = list(extra_args or [])
        if fork_children and not _no_accelerator():
            raise ValueError("fork_children is for CPU servers: a CUDA context cannot be forked; leave it off")
        self.args = [
            sys.executable,
            "-m",
            "sglang_er.launcher" if fork_children else "sglang.launch_server",
            "--model-path",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(["--device", "cpu"] if "--device" not in extra and _no_accelerator() else []),
            *(["--max-total-tokens", str(max_total_tokens)] if "--max-total-tokens" not in extra else []),
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
        self.startup_timeout = startup_timeout
        # SGLang drains for ~5 s on SIGTERM (and sleeps 5 s for crash diagnostics when a child
        # dies first); a throwaway server (tests, benchmarks) can be killed after less
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> Server:
        """Start and wait until healthy (:meth:`launch`, then :meth:`wait_ready`)."""
        return self.launch().wait_ready()

    def launch(self) -> Server:
        """Start the process and return at once. The kernel signals the server when the *thread*
        that launched it ends (PR_SET_PDEATHSIG), so launch from a thread that outlives it: to
        start several side by side, launch each, then wait for each."""
        self._t0 = time.monotonic()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return self

    def wait_ready(self) -> Server:
        """Wait until healthy. A port chosen here that SGLang's own processes took for their
        internal sockets in the meantime (both draw from the free ports) is replaced, up to
        twice; a port the caller chose is not."""
        for attempt in range(3):
            try:
                return self._wait_once()
            except _PortTaken:
                if self._port_given or attempt == 2:
                    raise ServerError(f"port {self.port} is in use:\n{self.log_tail()}") from None
                old, self.port = self.port, free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.args[self.args.index("--port") + 1] = str(self.port)
                logger.warning("port %d was taken during startup; retrying on %d", old, self.port)
                self.launch()
        raise AssertionError("unreachable")

    def _wait_once(self) -> Server:
        t0 = self._t0
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                self.stop()
                if _BIND_ERROR in self.log_tail():
                    raise _PortTaken
                raise ServerError(f"server exited with code {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - t0
                    return self
            except requests.RequestException:
                if _BIND_ERROR in self.log_tail():  # SGLang may hang in shutdown instead of exiting
                    self.stop()
                    raise _PortTaken from None
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"server not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds
        (default: ``stop_grace``)."""
        if self.proc is None:
            return
        grace = self.stop_grace if grace is None else grace
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(pgid, signal.SIGKILL)  # children (scheduler, detokenizer) too
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # Convenience wrappers over the HTTP API
    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        r = requests.post(self.url + path, json=payload, timeout=timeout)
        if r.status_code != 200:
            raise ServerError(f"POST {path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def generate(self, text=None, input_ids=None, timeout: float = 300.0, **sampling) -> dict:
        payload: dict = {"sampling_params": sampling}
        if text is not None:
            payload["text"] = text
        if input_ids is not None:
            payload["input_ids"] = input_ids
        return self.post("/generate", payload, timeout=timeout)

    def effrollout_state(self) -> dict | None:
        """The EFFROLLOUT worker's state from SGLang's server info (None on a plain server)."""
        r = requests.get(self.url + "/get_server_info", timeout=30)
        r.raise_for_status()
        return (r.json().get("internal_states") or [{}])[0].get("effrollout")

    def loads(self) -> dict:
        """SGLang's own load snapshot (``/v1/loads``): running/waiting requests, used KV tokens."""
        r = requests.get(self.url + "/v1/loads", timeout=30)
        r.raise_for_status()
        return r.json()["loads"][0]

    @contextlib.contextmanager
    def generation_paused(self, mode: str = "retract", timeout: float = 600.0):
        """What RL frameworks do around a weight update under load: SGLang retracts running
        requests to its waiting queue (``/pause_generation``), the update flushes the KV cache,
        and on ``/continue_generation`` they are re-prefilled with the new weights."""
        self.post("/pause_generation", {"mode": mode}, timeout=timeout)
        try:
            yield self
        finally:
            self.post("/continue_generation", {}, timeout=timeout)

    def update_weights_from_disk(self, model_path: str | Path, timeout: float = 600.0) -> dict:
        return self._checked("/update_weights_from_disk", {"model_path": str(model_path)}, timeout)

    def update_weights_from_tensor(self, named_tensors: list, timeout: float = 600.0) -> None:
        """The RL-framework path (SGLang 0.5.23): begin a session, push named tensors, end it.

        CPU tensors travel as shared-memory files: torch's default fd-passing strategy needs
        the receiver to share this process's multiprocessing authkey, which a server does not.
        """
        import torch.multiprocessing

        from sglang_er.engine.kernels import serialize_named_tensors

        torch.multiprocessing.set_sharing_strategy("file_system")
        payload = serialize_named_tensors(named_tensors)
        self._checked("/begin_weight_update", {}, timeout)
        try:
            self._checked("/update_weights_from_tensor", {"serialized_named_tensors": [payload]}, timeout)
        finally:
            self._checked("/end_weight_update", {}, timeout)  # never leave the session open

    def _checked(self, path: str, body: dict, timeout: float) -> dict:
        out = self.post(path, body, timeout=timeout)
        if not out.get("success", True):
            raise ServerError(f"POST {path} failed: {out.get('message', out)}")
        return out


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _no_accelerator() -> bool:
    from sglang_er.engine.cpu.platform import accelerator_present

    return accelerator_present() is None


def fork_children() -> None:
    """Have SGLang fork its scheduler and detokenizer instead of spawning them (see the module
    docstring): SGLang sets the ``spawn`` start method right before it starts them."""
    import multiprocessing

    set_start_method = multiprocessing.set_start_method

    def fork_not_spawn(method, force=False):
        return set_start_method("fork" if method == "spawn" else method, force=force)

    multiprocessing.set_start_method = fork_not_spawn


if __name__ == "__main__":  # python -m sglang_er.launcher ARGS: sglang.launch_server, children forked
    import runpy

    fork_children()
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
