"""Shared test helpers (plain functions and constants, no fixtures): ``from helpers import ...``.

``tests/`` is on ``sys.path`` because pytest inserts the rootdir of ``tests/conftest.py`` (no
``__init__.py``), so test modules import this module by its bare name.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import requests

# float32 so that greedy near-ties between the decode and verify kernels cannot decide a comparison
FP32 = ["--dtype", "float32"]


# tests/hooks on the path of every process the suite starts (conftest.py): planted faults when a
# server asks for them, and a forked (not spawned) scheduler, which starts without importing SGLang
# again (tests/hooks/er_test_fork.py). SPAWN_ENV: a server started as the product starts it.
HOOKS_ENV = {
    "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "hooks"), os.environ.get("PYTHONPATH")])),
    "SGLANG_ER_TEST_FORK": "1",
}
SPAWN_ENV = {"SGLANG_ER_TEST_FORK": "0"}


class FaultSwitch:
    """A planted bug (``tests/hooks/er_test_faults.py``: a wrong acceptance rule, or a drafter left
    stale) to switch on and off in a running server: ``start_server(..., faults=FaultSwitch())``,
    then ``with srv.faults.planted("accept_all"): ...``. One server then serves both the honest
    runs and the proof that a test detects the bug, instead of a second server per bug."""

    def __init__(self):
        fd, name = tempfile.mkstemp(prefix="sglang-er-fault-")
        os.close(fd)
        self.path = Path(name)
        self.env = {"SGLANG_ER_TEST_FAULT_FILE": name}

    @contextmanager
    def planted(self, fault: str) -> Iterator[None]:
        self.path.write_text(fault)
        try:
            yield
        finally:
            self.path.write_text("")


def _server(model_path, extra_args=(), faults: FaultSwitch | None = None, **kw):
    from sglang_er.launcher import Server

    kw.setdefault("stop_grace", 1.0)  # nothing to drain: saves ~4 s per server
    if faults is not None:
        kw["env"] = {**kw.get("env", {}), **faults.env}
    srv = Server(model_path, list(extra_args), **kw)
    srv.faults = faults
    return srv


def start_server(model_path, extra_args=(), faults: FaultSwitch | None = None, **kw):
    """Start a server; the caller's fixture stops it (process group kill) when the module ends.
    With ``faults``, the server's bug can be planted later as ``srv.faults.planted(name)``."""
    return _server(model_path, extra_args, faults, **kw).start()


def start_servers(*specs: tuple) -> list:
    """Start servers side by side, ``(model_path, extra_args[, kwargs])`` each: a start is mostly
    one process importing SGLang on one core, so two take about as long as one. All are launched
    from this thread (a server dies with the thread that launched it), then waited for."""
    servers = [_server(spec[0], spec[1], **(spec[2] if len(spec) > 2 else {})) for spec in specs]
    try:
        for srv in servers:
            srv.launch()
        for srv in servers:
            srv.wait_ready()
    except BaseException:
        for srv in servers:
            srv.stop()
        raise
    return servers


def tiny_prompts(n=52):
    from sglang_er.models.corpus import math_corpus

    docs = math_corpus(n, seed=7)
    shared = docs[0][:120]
    out = []
    for i, d in enumerate(docs[:n]):
        # varied lengths; every 4th prompt shares a long prefix (radix-cache hits)
        out.append(shared + d[: 10 + 7 * i % 90] if i % 4 == 0 else d[: 5 + (13 * i) % 200])
    return out


def greedy_all(srv, prompts):
    def one(i):
        # a few long generations (256 tokens), the rest short: the suite must stay fast on 2 cores
        n = 256 if i % 13 == 0 else 40
        return srv.generate(prompts[i], max_new_tokens=n, temperature=0, ignore_eos=True)["output_ids"]

    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, range(len(prompts))))


def joint_first3(srv, prompt, n, per_call=None, **sampling):
    """Counts of the first 3 sampled tokens over n requests (``per_call`` prompts per HTTP call:
    the batch sizes the server sees)."""
    per_call = per_call or n // 10

    def chunk(k):
        r = requests.post(
            srv.url + "/generate",
            json={"text": [prompt] * k, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True, **sampling}},
            timeout=600,
        )
        r.raise_for_status()
        return [tuple(o["output_ids"][:3]) for o in r.json()]

    with ThreadPoolExecutor(4) as ex:
        outs = [t for part in ex.map(chunk, [per_call] * (n // per_call)) for t in part]
    return Counter(outs)


def same_distribution_pvalue(a: Counter, b: Counter) -> float:
    from scipy.stats import chi2_contingency

    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    rows, other = [], [0, 0]
    for k in keys:
        if a[k] + b[k] >= 10:  # pool rare outcomes so the chi-square approximation holds
            rows.append([a[k], b[k]])
        else:
            other[0] += a[k]
            other[1] += b[k]
    if sum(other):
        rows.append(other)
    return chi2_contingency(rows)[1]


def hf_greedy(model_dir, prompts: list[str], n: int = 40) -> list[list[int]]:
    """The reference greedy continuation of each prompt by transformers (float32), ``n`` tokens each:
    what a server must produce after a weight update to ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(ids[0, -n:].tolist())
    return out
