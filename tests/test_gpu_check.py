"""``eval.gpu_check`` on the CPU: its dry run writes complete reports without SGLang, and its
exactness check fails when the W4 kernel is wrong. (On a GPU it times; here nothing is timed.)"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval.gpu_check as gpu_check
from sglang_er.quant import int4pack
from sglang_er.quant.w4linear import W4Linear

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_names_neither_sglang_nor_the_engine():
    tree = ast.parse((ROOT / "eval" / "gpu_check.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert names and not [m for m in names if m.split(".")[0] == "sglang" or m.startswith("sglang_er.engine")]


def test_dry_run_writes_the_reports_with_sglang_absent(tmp_path):
    out = tmp_path / "out"
    # sys.modules["sglang"] = None makes every `import sglang...` fail, as on a machine without it
    code = "import sys; sys.modules['sglang'] = None; from eval.gpu_check import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--out", str(out), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    prov = res["provenance"]
    assert "gpu_check" in prov["command"] and "--dry-run" in prov["command"] and prov["commit"]
    assert res["torch"] == torch.__version__ and res["device"] == "cpu"
    assert res["dry_run"] and not res["timings_meaningful"] and "mean nothing" in md and "DRY RUN" in md
    assert res["ok"] and res["failures"] == [] and res["exactness"]["ok"]
    rows = res["exactness"]["rows"]
    assert {r["case"] for r in rows} == {"tiny.qkv", "tiny.o", "tiny.gate_up", "tiny.down", "tiny.lm_head"}
    for r in rows:
        assert r["kernel"] == "cpu_int4pack", r
        assert r["rel_err"] <= res["tolerance"]["rel_err"] and r["max_abs_err"] <= 0.05 * r["max_abs_ref"]
    t = res["timing"]["tiny"]
    assert t["shape"]["layers"] == 4 and t["layers_timed"] == 2 and "scaled from 2 timed layers" in md
    assert {k for k, _ in t["kernels"].values()} == {"cpu_int4pack"}
    assert [r["B"] for r in t["rows"]] == list(gpu_check.BATCHES) and t["skipped"] == []
    for r in t["rows"]:
        # the step is the layer stack scaled to the full depth plus the head; r is its ratio
        assert r["target_step_ms"] == pytest.approx(2 * r["target_layers_ms"] + r["target_head_ms"])
        assert r["draft_step_ms"] == pytest.approx(2 * r["draft_layers_ms"] + r["draft_head_ms"])
        assert math.isfinite(r["r"]) and r["r"] == pytest.approx(r["draft_step_ms"] / r["target_step_ms"])
        assert f"| {r['B']} | {r['target_step_ms']:.3f} |" in md
    q = res["requantize"]["tiny"]  # the drafter's own re-quantization, every layer, RTN and AWQ
    assert q["layers"] == 4 and q["awq_groups_searched"] == 16
    assert all(q[k] > 0 for k in ("rtn_s", "awq_first_s", "awq_warm_s"))
    assert "## Re-quantization after a weight update" in md and f"| tiny | 4 | 16 | {q['rtn_s']:.3f} |" in md
    assert res["imports"]["sglang"] == []
    assert set(res["imports"]["sglang_er.engine"]) <= {"sglang_er.engine", "sglang_er.engine.kernels"}


def _negated_zero(qt, dtype):
    sz = REAL_SCALE_ZEROS(qt, dtype)
    sz[..., 1] = -sz[..., 1]  # the zero point applied with the wrong sign
    return sz


REAL_SCALE_ZEROS = int4pack.scale_zeros


@pytest.mark.parametrize("validated", [False, True], ids=["kernel-used", "kernel-refused"])
def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch, validated):
    """A kernel computing the wrong weights: used as is, the exactness rows fail; caught by
    W4Linear's own validation, the layer falls back to the dequantized path, which fails too."""
    monkeypatch.setattr(int4pack, "scale_zeros", _negated_zero)
    if not validated:
        monkeypatch.setattr(W4Linear, "_validate_kernel", lambda self: None)
    rc = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--batches", "1"])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and not res["ok"] and not res["exactness"]["ok"]
    assert "FAIL" in (tmp_path / "gpu_check.md").read_text()
    if validated:
        assert {r["kernel"] for r in res["exactness"]["rows"]} == {"torch"}
        assert any("no 4-bit kernel" in f for f in res["failures"])
    else:
        assert all(r["kernel"] == "cpu_int4pack" and r["rel_err"] > 0.1 for r in res["exactness"]["rows"])
        assert any("rel" in f for f in res["failures"])
