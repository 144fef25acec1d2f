"""Hardware profiles: schema, loaders, built-in and generic ones, the exact fit: engine-free."""

from __future__ import annotations

import json

import pytest

from sglang_er.gamma import (
    BatchStats,
    CostModel,
)
from sglang_er.gamma.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from sglang_er.gamma.calibration import fit_profile
from sglang_er.gamma.hardware_profile import HardwareProfile


def test_profile_json_round_trip(tmp_path):
    for name, p in BUILTIN_PROFILES.items():
        path = p.save(tmp_path / f"{name}.json")
        q = HardwareProfile.load(path)
        assert q == p
        assert HardwareProfile.from_json(p.to_json()) == p
    assert builtin_profile("cpu").bandwidth_bytes_per_s == 16e9
    assert builtin_profile("cpu").fixed_plain_s == pytest.approx(19e-3)
    with pytest.raises(ValueError, match="unknown built-in"):
        builtin_profile("tpu")


def test_gpu_without_builtin_profile_gets_labelled_generic_one(caplog):
    from sglang_er.gamma.builtin_profiles import GENERIC_GPU, builtin_profile_for_device

    with caplog.at_level("WARNING", logger="sglang_er.gamma.builtin_profiles"):
        assert builtin_profile_for_device(None).name == "cpu-2core"
        assert builtin_profile_for_device("NVIDIA A100-SXM4-80GB").name == "a100-80gb"
        assert builtin_profile_for_device("NVIDIA H100 80GB HBM3").name == "h100-sxm"
        assert not caplog.records  # the GPUs that have a profile get it silently
        prof = builtin_profile_for_device("NVIDIA B200")
    # never another GPU's numbers: a placeholder that says what it is, and a warning naming the fix
    assert prof.name == GENERIC_GPU and prof != BUILTIN_PROFILES["h100-sxm"]
    assert "sglang-er calibrate" in prof.measured_with and "no built-in profile" in prof.device
    (rec,) = caplog.records
    assert rec.levelname == "WARNING"
    assert "NVIDIA B200" in rec.getMessage() and "sglang-er calibrate" in rec.getMessage()
    assert "SGLANG_ER_PROFILE" in rec.getMessage()
    caplog.clear()
    assert builtin_profile_for_device("NVIDIA L4", warn=False).name == GENERIC_GPU and not caplog.records


@pytest.mark.parametrize(
    "gpu, key",
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("nvidia  a100 80gb pcie", "a100-80gb-pcie"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L40", None),  # not an L40S: half its compute
        ("NVIDIA GH200 480GB", None),  # not an H200
        ("NVIDIA B200", None),
    ],
)
def test_gpu_names_get_their_own_datasheet_profile(gpu, key, caplog):
    from sglang_er.gamma.builtin_profiles import GENERIC_GPU, builtin_profile_for_device, gpu_profile_name

    assert gpu_profile_name(gpu) == key
    with caplog.at_level("INFO", logger="sglang_er.gamma.builtin_profiles"):
        prof = builtin_profile_for_device(gpu)
    assert prof.name == (key or GENERIC_GPU)
    if key:  # labelled as datasheet numbers, corrected online; the log line says so
        assert "public specifications" in prof.measured_with and "corrected online" in prof.measured_with
        assert "public specifications" in caplog.text and not any(r.levelname == "WARNING" for r in caplog.records)
    else:
        assert "sglang-er calibrate" in caplog.text and caplog.records[-1].levelname == "WARNING"


def test_server_profile_for_unknown_gpu_and_from_env(monkeypatch, tmp_path, caplog):
    import torch

    from sglang_er.gamma import controller
    from sglang_er.gamma.builtin_profiles import GENERIC_GPU
    from sglang_er.gamma.hardware_profile import profile_from_env

    monkeypatch.delenv("SGLANG_ER_PROFILE", raising=False)
    monkeypatch.setattr(controller.torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    with caplog.at_level("WARNING", logger="sglang_er.gamma.builtin_profiles"):
        assert controller.default_profile(torch.device("cuda")).name == GENERIC_GPU
    assert "sglang-er calibrate" in caplog.text
    assert controller.default_profile(torch.device("cpu")).name == "cpu-2core"
    # SGLANG_ER_PROFILE: the one loader, for the startup check and the worker alike
    cpu_json = str(builtin_profile("cpu").save(tmp_path / "cpu.json"))
    assert profile_from_env("cpu", {}) is None
    assert profile_from_env("cpu", {"SGLANG_ER_PROFILE": cpu_json}).name == "cpu-2core"
    with pytest.raises(ValueError, match="measured on 'cpu-2core' but this server runs on cuda"):
        profile_from_env("cuda:0", {"SGLANG_ER_PROFILE": cpu_json})
    monkeypatch.setenv("SGLANG_ER_PROFILE", str(_corrupt(tmp_path, "{")))
    with pytest.raises(ValueError, match=r"^SGLANG_ER_PROFILE=.*not valid JSON.*unset SGLANG_ER_PROFILE"):
        controller.default_profile(torch.device("cpu"))


def _corrupt(tmp_path, text: str, name="p.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(bandwidth_bytes_per_s="16e9"), "bandwidth_bytes_per_s"),
        (lambda d: d.update(bandwidth_bytes_per_s=-1.0), "bandwidth_bytes_per_s"),
        (lambda d: d.update(bandwidth_bytes_per_s=16.0), "bandwidth_bytes_per_s"),  # GB/s written as bytes/s
        (lambda d: d.update(fixed_plain_s=19.0), "fixed_plain_s"),  # ms written as s
        (lambda d: d.update(flops_per_s={"fp32": 1e11}), "bf16"),
        (lambda d: d.update(flops_per_s={"bf16": 2e11, "int3": 1e9}), "int3"),
        (lambda d: d.update(bandwidth_bytes_per_s=2e11, flops_per_s={"bf16": 16e9}), "implausible"),  # swapped
        (lambda d: d.update(bandwith=1.0), "bandwith"),  # misspelt field
        (lambda d: d.pop("fixed_verify_s"), "fixed_verify_s"),
        (lambda d: d.update(schema_version=2), "schema_version 2"),
    ],
)
def test_profile_rejects_bad_fields(tmp_path, mutate, match):
    d = json.loads(builtin_profile("cpu").to_json())
    mutate(d)
    path = _corrupt(tmp_path, json.dumps(d))
    with pytest.raises(ValueError, match=match) as e:
        HardwareProfile.load(path)
    assert str(path) in str(e.value)


def test_profile_rejects_corrupt_or_mismatched(tmp_path):
    good = builtin_profile("h100").to_json()
    with pytest.raises(ValueError, match="not valid JSON"):
        HardwareProfile.load(_corrupt(tmp_path, good[: len(good) // 2]))
    with pytest.raises(ValueError, match="finite"):
        HardwareProfile.load(_corrupt(tmp_path, good.replace("3350000000000.0", "NaN")))
    with pytest.raises(ValueError, match="JSON object"):
        HardwareProfile.load(_corrupt(tmp_path, "[1, 2]"))
    with pytest.raises(ValueError, match="cannot read"):
        HardwareProfile.load(tmp_path / "missing.json")
    path = _corrupt(tmp_path, good)
    assert HardwareProfile.load(path, device="nvidia  H100 80GB HBM3").name == "h100-sxm"
    with pytest.raises(ValueError, match="measured on 'NVIDIA H100 80GB HBM3' but this machine is 'NVIDIA A100"):
        HardwareProfile.load(path, device="NVIDIA A100-SXM4-80GB")


def test_fit_profile_recovers_roofline(qwen):
    true = builtin_profile("cpu").model_copy(
        update=dict(
            bandwidth_bytes_per_s=11e9,
            flops_per_s={"bf16": 1.5e11, "w4": 0.8e11},
            fixed_plain_s=25e-3,
            fixed_verify_s=30e-3,
            fixed_draft_step_s=2e-3,
            per_seq_s=0.5e-3,
            per_seq_draft_s=0.1e-3,
        )
    )
    cm = CostModel(true, qwen)
    samples = []
    for B in (1, 2, 4, 8, 16, 32, 64, 128):
        for L in (64, 512, 2048):
            st = BatchStats.uniform(B, L)
            w = cm.work_plain(st)
            samples.append((w.bytes, w.flops["target"], B, cm.t_plain(st)))  # tuple form = plain
            samples.append(cm.calibration_sample("verify", st, 3, cm.t_verify(st, 3)))
            d = cm.calibration_sample("draft", st, 2, cm.t_draft(st, 2, corrected=False))
            assert d.forwards == 2 and set(d.flops) == {"w4", "bf16"}  # W4 layers, bf16 head
            samples.append(d.model_dump())  # dict form
    fit = fit_profile(samples, name="fit", device="test-box", measured_with="synthetic")
    assert fit.fit_rel_rms < 1e-3
    assert fit.bandwidth_bytes_per_s == pytest.approx(11e9, rel=0.02)
    assert fit.flops_per_s["bf16"] == pytest.approx(1.5e11, rel=0.02)
    assert fit.flops_per_s["w4"] == pytest.approx(0.8e11, rel=0.05)
    assert fit.flops_per_s["fp32"] == BUILTIN_PROFILES["cpu-2core"].flops_per_s["fp32"]  # not measured
    for f in ("fixed_plain_s", "fixed_verify_s", "fixed_draft_step_s", "per_seq_s", "per_seq_draft_s"):
        assert getattr(fit, f) == pytest.approx(getattr(true, f), rel=0.05, abs=2e-5), f
    assert "bandwidth_bytes_per_s" in fit.fitted and "flops_per_s.fp32" not in fit.fitted
    assert HardwareProfile.from_json(fit.to_json()) == fit
    with pytest.raises(ValueError, match="at least 2"):
        fit_profile([(1e9, 1e9, 1, 0.1)])
