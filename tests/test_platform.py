"""The portable CPU platform activates only when it should."""

import subprocess
import sys

from sglang_er.engine.cpu import platform


def test_activates_without_accelerator_or_when_named(monkeypatch):
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    monkeypatch.setattr(platform, "accelerator_present", lambda: None)
    assert platform.activate() == platform.PLATFORM_CLASS
    monkeypatch.setattr(platform, "accelerator_present", lambda: "cuda")
    assert platform.activate() is None  # a GPU machine is left alone
    monkeypatch.setenv("SGLANG_PLATFORM", "portable_cpu")
    assert platform.activate() == platform.PLATFORM_CLASS  # unless asked for


def test_stays_out_when_another_platform_is_named(monkeypatch):
    monkeypatch.setattr(platform, "accelerator_present", lambda: None)
    monkeypatch.setenv("SGLANG_PLATFORM", "some_other_platform")
    assert platform.activate() is None
    monkeypatch.delenv("SGLANG_PLATFORM")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    assert platform.activate() is None


def _resolved(env_extra):
    code = "from sglang.srt.platforms import current_platform as p; print(type(p).__name__, p.is_out_of_tree())"
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLATFORM", "SGLANG_USE_CPU_ENGINE")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_sglang_resolves_it_here():
    out = _resolved({})
    assert out.stdout.split() == ["PortableCpuPlatform", "True"], out.stderr[-2000:]


def test_sglang_does_not_resolve_it_when_cpu_engine_is_asked():
    out = _resolved({"SGLANG_USE_CPU_ENGINE": "1"})
    assert out.stdout.split()[0] == "CpuSRTPlatform", out.stderr[-2000:]


def test_doctor_reports_platform_and_kernels():
    out = subprocess.run([sys.executable, "-m", "sglang_er.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PortableCpuPlatform" in out.stdout and "int4 CPU matmul" in out.stdout
