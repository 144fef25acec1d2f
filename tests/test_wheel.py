"""The installed package is self-contained: build the wheel, install it into a bare directory, and
outside the checkout import every module, run the CLI's, ``calibrate``'s and the demo's ``--help``,
and load the packaged GSM8K sample, with the checkout's ``eval`` package out of reach.

The subprocesses run ``python -S`` with ``PYTHONPATH=<install dir>:<the venv's site-packages>``:
sglang, torch and the other dependencies resolve from the venv, but no ``.pth`` file runs, so the
editable install's finder (which maps ``sglang_er`` to the checkout) cannot stand in for a module
or a data file the wheel lacks. No module needs CUDA at import time, so none is skipped.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import importlib, importlib.util, json, pkgutil
    import sglang_er
    from importlib.metadata import distribution

    out = {"file": sglang_er.__file__, "eval": importlib.util.find_spec("eval") is not None, "failed": {}}
    out["modules"] = [m.name for m in pkgutil.walk_packages(sglang_er.__path__, "sglang_er.")]
    for name in out["modules"]:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["failed"][name] = f"{type(e).__name__}: {e}"
    dist = distribution("sglang-er")
    out["console_scripts"] = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    from sglang_er.evaluation.math_data import DatasetError, load_problems
    out["sample"] = len(load_problems("gsm8k-sample"))
    try:
        load_problems("gsm8k")
    except DatasetError as e:
        out["gsm8k_error"] = str(e)
    from sglang_er.models.trained import data_path
    try:
        data_path()
    except FileNotFoundError as e:
        out["train_error"] = str(e)
    print(json.dumps(out))
""")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, **kw)


def _build_and_install(tmp: Path) -> Path:
    # From a copy of what the wheel is built from: setuptools' build/ in the checkout keeps files
    # of deleted modules, which a wheel built there would still carry.
    src = tmp / "src"
    shutil.copytree(REPO / "sglang_er", src / "sglang_er", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    wheels = tmp / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)]
    r = _run(cmd)
    if r.returncode != 0:  # offline without setuptools in the index: build with the venv's own
        r = _run([*cmd, "--no-build-isolation"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("sglang_er-*.whl")
    site = tmp / "site"
    r = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return site


def _isolated(site: Path, cwd: Path):
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "SGLANG_ER_DATA")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *deps])

    def run(*args: str) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-S", *args], cwd=cwd, env=env)

    return run


def eval_imports(root: Path) -> list[str]:
    """Every import of the checkout's ``eval`` package in the sources under ``root`` (lazy ones
    inside functions too), and every string naming one of its modules (``importlib`` targets)."""
    hits = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("eval."):
                names = [node.value] if node.value.replace(".", "").replace("_", "").isalnum() else []
            hits += [f"{f.relative_to(root)}:{node.lineno}: {n}" for n in names if n == "eval" or n.startswith("eval.")]
    return hits


def test_installed_wheel_needs_nothing_from_the_checkout(tmp_path):
    import json

    site = _build_and_install(tmp_path)
    pkg = site / "sglang_er"
    for data in ("gsm8k_sample.jsonl", "LICENSE-GSM8K"):
        assert (pkg / "data" / data).is_file(), f"package data {data} missing from the wheel"
    assert eval_imports(pkg) == []

    outside = tmp_path / "elsewhere"  # not the checkout: `python -m` puts the working directory on sys.path
    outside.mkdir()
    run = _isolated(site, outside)
    r = run("-c", PROBE)
    assert r.returncode == 0, r.stderr[-5000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(res["file"]).resolve().is_relative_to(site.resolve()), res["file"]
    assert res["eval"] is False, "the checkout's eval package is importable in the isolated interpreter"
    assert res["failed"] == {}, res["failed"]
    assert {"sglang_er.demo", "sglang_er.cli", "sglang_er.evaluation.math_eval"} <= set(res["modules"])
    assert res["console_scripts"] == {"sglang-er": "sglang_er.cli:main"}
    assert res["sample"] == 50
    assert "SGLANG_ER_DATA" in res["gsm8k_error"] and "SGLANG_ER_DATA" in res["train_error"]

    for args, want in (
        (["-m", "sglang_er.cli", "--help"], "calibrate"),
        (["-m", "sglang_er.cli", "calibrate", "--help"], "--model-path"),
        (["-m", "sglang_er.cli", "eval", "--help"], "--base-url"),
        (["-m", "sglang_er.demo", "--help"], "--questions"),
    ):
        r = run(*args)
        assert r.returncode == 0 and want in r.stdout, (
            f"{args}: rc {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
        )


def test_the_checkout_package_does_not_import_eval():
    """The same static check on the working tree, without building anything (fast)."""
    assert eval_imports(REPO / "sglang_er") == []
