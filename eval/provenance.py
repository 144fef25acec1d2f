"""What every result file records: the command, the commit, the model, the machine, the rounds.

A figure without these cannot be re-run or compared; :func:`provenance` gathers them once, and
:func:`header` puts them at the top of a markdown report.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """The machine in a few fields: CPU, cores this process may use, memory, GPU if any."""
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop a CPU benchmark's report
        gpu = None
    return {
        "cpu": _cpu(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "gpu": gpu,
        "host": platform.node(),
    }


def provenance(model: str, *, rounds: int | None = None, argv: list[str] | None = None, **extra) -> dict:
    """Command, commit, model, machine, rounds, library versions and the date of a run."""
    argv = sys.argv if argv is None else argv
    mod = Path(argv[0]).stem if argv else "?"
    return {
        "command": "python -m eval." + mod + " " + shlex.join(argv[1:]) if argv else "",
        "commit": _commit(),
        "model": model,
        "machine": machine(),
        "rounds": rounds,
        "versions": {p: _version(p) for p in ("sglang", "torch", "transformers")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **extra,
    }


def header(p: dict) -> str:
    """Markdown lines that open a report: how to re-run it and where it ran."""
    m = p["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB" + (f", GPU {m['gpu']}" if m["gpu"] else "")
    extra = [
        f"- {k.replace('_', ' ')}: {v}"
        for k, v in p.items()
        if k not in ("command", "commit", "model", "machine", "rounds", "versions", "date")
    ]
    return "\n".join(
        [
            f"- command: `{p['command']}`",
            f"- commit: {p['commit']}; {p['date']}; " + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v),
            f"- model: {p['model']}",
            f"- machine: {where}",
            *([f"- rounds: {p['rounds']}"] if p.get("rounds") is not None else []),
            *extra,
        ]
    )
