"""``sglang-router`` in front of SGLang servers: one place for the scale-out test and benchmark.

The router (``python -m sglang_router.launch_router``, package ``sglang-router``) spreads generation
requests (``/generate``, ``/v1/completions``, ``/v1/chat/completions``) over its workers by a policy,
fans ``/flush_cache`` out to every worker and gathers every worker's ``/metrics`` under
``/engine_metrics`` (labelled ``worker_addr``). Version 0.3.2 does not forward weight updates
(``/update_weights_from_disk``, ``/update_weights_from_tensor``) or ``/pause_generation`` (404), so an
RL framework sends those to each engine; :meth:`Router.worker_urls` lists them from ``GET /workers``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sglang_er.launcher import _die_with_parent, free_port


class RouterError(RuntimeError):
    pass


class Router:
    """A ``python -m sglang_router.launch_router`` child process in its own process group."""

    def __init__(
        self,
        worker_urls: list[str],
        *,
        policy: str = "round_robin",
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 180.0,  # a cold first import of the 30 MB Rust extension takes ~30 s here
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--worker-urls",
            *worker_urls,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--policy",
            policy,
            # its own Prometheus endpoint; the default port 29000 would collide between routers
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "warn",
            # SIGTERM (its parent died: see _die_with_parent) must not leave it draining for 3 minutes
            "--shutdown-grace-period-secs",
            "1",
        ]
        self.n_workers = len(worker_urls)
        if log_path is None:
            log_path = tempfile.mkstemp(prefix="sglang-router-", suffix=".log")[1]
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> Router:
        """Start and wait until the router reports every worker healthy (``/readiness``)."""
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # a killed test or benchmark leaves no router behind
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                self.stop()
                raise RouterError(f"router exited with code {self.proc.returncode}:\n{self._tail()}")
            try:
                r = requests.get(self.url + "/readiness", timeout=2)
                if r.status_code == 200 and r.json().get("healthy_workers") == self.n_workers:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RouterError(f"router not ready after {self.startup_timeout:.0f}s:\n{self._tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # nothing to drain: a test or benchmark router
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        r = requests.post(self.url + path, json=payload, timeout=timeout)
        if r.status_code != 200:
            raise RouterError(f"POST {path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def worker_urls(self) -> list[str]:
        """The engines behind the router, as it lists them."""
        r = requests.get(self.url + "/workers", timeout=30)
        r.raise_for_status()
        return sorted(w["url"] for w in r.json()["workers"])

    def update_weights_from_disk(self, model_path: str | Path, timeout: float = 600.0) -> list[dict]:
        """What an RL framework does with the router in front: the update to every engine at once."""

        def one(url: str) -> dict:
            r = requests.post(url + "/update_weights_from_disk", json={"model_path": str(model_path)}, timeout=timeout)
            r.raise_for_status()
            out = r.json()
            if not out.get("success", True):
                raise RouterError(f"{url}: update failed: {out.get('message', out)}")
            return out

        urls = self.worker_urls()
        with ThreadPoolExecutor(len(urls)) as ex:
            return list(ex.map(one, urls))
