"""Pin each CPU rank (or engine) to the cores ``SGLANG_CPU_OMP_THREADS_BIND`` gives it.

SGLang reads the variable on every CPU but applies it only through its AMX / arm64 kernel library
(``bootstrap._init_cpu_threads_env``); on other CPUs each rank kept torch's default pool of every
core. Two TP ranks, or two engines behind a router, each told "one core", then ran two threads
apiece on two cores: measured here, two engines decoding side by side fell from ~120 tok/s for one
engine to ~6 tok/s each. This hook pins the process to its cores and sizes torch's pool to them.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("sglang_er")


def cpu_list(spec) -> list[int]:
    """``"0"``, ``"0-3"``, ``"0,2,4-5"`` or a list of ints -> the core ids."""
    if isinstance(spec, (list, tuple)):
        return [int(c) for c in spec]
    cores: list[int] = []
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        cores += list(range(int(lo), int(hi or lo) + 1))
    return cores


def bind_rank_threads(original, *args, local_omp_cpuid=None, **kwargs):
    """Around SGLang's CPU thread setup: where the variable names this rank's cores, pin to them."""
    out = original(*args, local_omp_cpuid=local_omp_cpuid, **kwargs)
    if os.environ.get("SGLANG_CPU_OMP_THREADS_BIND", "all") != "all" and local_omp_cpuid is not None:
        cores = cpu_list(local_omp_cpuid)
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        logger.info("sglang-er: this rank runs on cores %s with %d torch threads", cores, len(cores))
    return out
