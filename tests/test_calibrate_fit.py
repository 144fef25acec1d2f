"""``sglang-er calibrate --csv`` on simulated sweeps: recovery, refusal, sweeps as users have them.

A simulated sweep is the cost model's own roofline prediction (the one formula,
:func:`sglang_er.gamma.roofline.roofline_seconds`) under known device parameters, times seeded
multiplicative noise (2% lognormal) with a few outliers (x2.5, x0.4), on a batch x context x γ grid
like a real sweep. The fit must recover each device within the goals (T_T MAPE <= 3%, T_D and T_V
<= 5%, toggle-sign accuracy >= 0.97 at α = 0.8, judged against the noise-free truth); sweeps that
do not follow the roofline form must be refused, and only those. No wall-clock assertions.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from gamma_helpers import QWEN2_05B

from sglang_er.cli import main
from sglang_er.cli.calibrate import REFUSED_EXIT, SweepRow, evaluate, write_sweep_csv
from sglang_er.cli.quality import cost_model
from sglang_er.gamma import BatchStats
from sglang_er.gamma.hardware_profile import HardwareProfile
from sglang_er.gamma.robust_fit import BANDWIDTH_BOUNDS, FLOPS_BOUNDS

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GAMMAS = (1, 3, 5, 7)


def _device(name, bw, bf16, w4, fixed_ms, per_seq_us, backend="flashinfer"):
    return HardwareProfile(
        name=name,
        device=name,
        bandwidth_bytes_per_s=bw,
        flops_per_s={"bf16": bf16, "w4": w4},
        fixed_plain_s=fixed_ms[0] * 1e-3,
        fixed_draft_step_s=fixed_ms[1] * 1e-3,
        fixed_verify_s=fixed_ms[2] * 1e-3,
        per_seq_s=per_seq_us[0] * 1e-6,
        per_seq_draft_s=per_seq_us[1] * 1e-6,
        attention_backend=backend,
    )


# (truth, model, batch sizes, contexts, --device): effective numbers below each datasheet, as measured
DEVICES = {
    "a100": (
        _device("a100-like", 1.7e12, 250e12, 120e12, (2.5, 0.35, 3.0), (4, 1)),
        LLAMA_8B,
        (1, 2, 4, 8, 16, 32, 64, 128),
        (256, 1024, 4096),
        "NVIDIA A100-SXM4-80GB",
    ),
    "h100": (
        _device("h100-like", 2.9e12, 700e12, 300e12, (2.0, 0.3, 2.4), (3, 1)),
        LLAMA_8B,
        (1, 2, 4, 8, 16, 32, 64, 128),
        (256, 1024, 4096),
        "NVIDIA H100 80GB HBM3",
    ),
    "l40s": (
        _device("l40s-like", 0.75e12, 250e12, 110e12, (2.5, 0.4, 3.0), (5, 1)),
        LLAMA_8B,
        (1, 2, 4, 8, 16, 32, 64),
        (256, 1024, 4096),
        "NVIDIA L40S",
    ),
    "cpu": (
        _device("cpu-like", 14e9, 1.5e11, 0.7e11, (18, 1.2, 20), (300, 20), backend="torch_native"),
        QWEN2_05B,
        (1, 2, 4, 8, 16),
        (64, 256, 1024),
        "cpu-4core",
    ),
}


def truth_rows(truth: HardwareProfile, config: dict, batches, contexts) -> list[SweepRow]:
    """The noise-free sweep: the cost model's uncorrected roofline prediction of every row."""
    cm = cost_model(truth, config)
    rows = []
    for b in batches:
        for s in contexts:
            st = BatchStats.uniform(b, s)
            rows.append(SweepRow(b, s, 0, "target_decode", cm.t_plain(st, corrected=False) * 1e3))
            for g in GAMMAS:
                rows.append(SweepRow(b, s, g, "drafter_decode", cm.t_draft(st, g, corrected=False) / g * 1e3))
                rows.append(SweepRow(b, s, g, "target_verify", cm.t_verify(st, g, corrected=False) * 1e3))
    return rows


def noisy(rows: list[SweepRow], seed: int, sigma: float = 0.02, outliers: int = 3) -> list[SweepRow]:
    rng = np.random.default_rng(seed)
    ms = [r.median_ms * float(np.exp(rng.normal(0.0, sigma))) for r in rows]
    for i in rng.choice(len(rows), outliers, replace=False):
        ms[i] *= float(rng.choice([2.5, 0.4]))  # a GC pause, a mis-logged row
    return [SweepRow(r.batch, r.seq, r.gamma, r.mode, m) for r, m in zip(rows, ms)]


def _fit(tmp_path, rows, config, *extra):
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_sweep_csv(tmp_path / "sweep.csv", rows)
    out = tmp_path / "profile.json"
    args = ["calibrate", "--csv", str(tmp_path / "sweep.csv"), "--model-config", str(tmp_path / "config.json")]
    rc = main([*args, "--out", str(out), *extra])
    return rc, out


@pytest.mark.parametrize("kind", sorted(DEVICES))
def test_simulated_sweep_is_recovered_within_the_goals(tmp_path, capsys, kind):
    truth, config, batches, contexts, device = DEVICES[kind]
    exact = truth_rows(truth, config, batches, contexts)
    rc, out = _fit(tmp_path, noisy(exact, seed=sorted(DEVICES).index(kind)), config, "--device", device, "--json")
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0, rep["failures"]
    assert out.exists() and rep["failures"] == [] and not rep["refused"]
    p = HardwareProfile.load(out)
    assert (
        not p.forced
        and p.fit_holdout_mape
        and set(p.fit_holdout_mape)
        == {
            "target_decode",
            "drafter_decode",
            "target_verify",
        }
    )
    ev = evaluate(cost_model(p, config), exact, 0.8)  # against the noise-free truth
    assert ev["mape"]["target_decode"] <= 0.03
    assert ev["mape"]["drafter_decode"] <= 0.05 and ev["mape"]["target_verify"] <= 0.05
    t = ev["toggle"]
    assert t["cases"] == len(batches) * len(contexts) * len(GAMMAS)
    # the sign, where the true gain is clear of 1x by the margin the γ chooser needs to act on it;
    # nearer 1x a sign error costs under that margin, and every gain must be close anyway
    assert t["clear_cases"] >= 0.5 * t["cases"] and t["clear_accuracy"] >= 0.97
    assert all(abs(c["predicted_gain"] / c["measured_gain"] - 1) <= 0.03 for c in t["detail"])
    gains = [c["measured_gain"] for c in t["detail"]]
    assert min(gains) < 1.0 < max(gains)  # the grid straddles the toggle: accuracy is not trivial
    assert p.bandwidth_bytes_per_s == pytest.approx(truth.bandwidth_bytes_per_s, rel=0.1)
    assert "bandwidth_bytes_per_s" in p.fitted
    # every rate is fitted or held with a reason, never left at an arbitrary default
    for k in ("bf16", "w4"):
        name = f"flops_per_s.{k}"
        assert (name in p.fitted) != (name in p.held), name
        assert (name in rep["held"]) == (name in p.held)


def _not_roofline(kind: str, exact: list[SweepRow], seed: int) -> list[SweepRow]:
    if kind == "quadratic":  # time grows with the square of the batch
        return [SweepRow(r.batch, r.seq, r.gamma, r.mode, r.median_ms * (1 + (r.batch / 16) ** 2)) for r in exact]
    rng = np.random.default_rng(seed)  # "random": timings unrelated to the work
    return [SweepRow(r.batch, r.seq, r.gamma, r.mode, float(rng.uniform(1.0, 50.0))) for r in exact]


@pytest.mark.parametrize("kind", ["quadratic", "random"])
def test_sweep_off_the_roofline_is_refused_and_force_writes_it_labelled(tmp_path, capsys, kind):
    truth, config, batches, contexts, device = DEVICES["a100"]
    rows = _not_roofline(kind, truth_rows(truth, config, batches, contexts), seed=7)
    rc, out = _fit(tmp_path, rows, config, "--device", device)
    cap = capsys.readouterr()
    assert rc == REFUSED_EXIT and not out.exists()
    assert "no profile was written" in cap.err and "MAPE" in cap.err and "--force" in cap.err
    rc, out = _fit(tmp_path, rows, config, "--device", device, "--force")
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and "FORCED" in text
    p = HardwareProfile.load(out)
    assert p.forced and p.name.endswith("-forced") and "FORCED" in p.measured_with
    # however bad the sweep, every rate stays physical
    assert BANDWIDTH_BOUNDS[0] <= p.bandwidth_bytes_per_s <= BANDWIDTH_BOUNDS[1]
    for k in ("bf16", "w4"):
        assert FLOPS_BOUNDS[k][0] <= p.flops_per_s[k] <= FLOPS_BOUNDS[k][1]


def _user_csv(path, rows: list[SweepRow]) -> None:
    """The common layout: model and mean columns, percentiles, warm-up rows, a mode not modelled."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "batch", "seq", "gamma", "mode", "mean_ms", "median_ms", "p90_ms", "note"])
        w.writerow(["llama-8b", 0, 0, 0, "target_decode", 99.0, 99.0, 120.0, "warm-up"])
        w.writerow(["llama-8b", 1, 0, 1, "target_verify", 50.0, 50.0, 60.0, "warm-up"])
        for r in rows:
            w.writerow(["llama-8b", r.batch, r.seq, r.gamma, r.mode, r.median_ms * 1.01, r.median_ms, 0, ""])
            if r.mode == "target_decode":
                w.writerow(["llama-8b", r.batch, r.seq, 0, "prefill", 30.0, 30.0, 31.0, ""])
        w.writerow(["llama-8b", 2, 256, 3, "drafter_decode", "", "", "", "OOM"])


def test_user_layout_csv_skips_and_counts_rows_it_cannot_use(tmp_path, capsys):
    truth, config, batches, contexts, device = DEVICES["a100"]
    rows = truth_rows(truth, config, batches, contexts)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _user_csv(tmp_path / "user.csv", rows)
    args = ["calibrate", "--csv", str(tmp_path / "user.csv"), "--model-config", str(tmp_path / "config.json")]
    out = tmp_path / "p.json"
    assert main([*args, "--device", device, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n_prefill = len(batches) * len(contexts)
    assert f"skipped {n_prefill + 3} rows:" in text
    assert "2 warm-up (batch or seq 0)" in text and f"{n_prefill} unknown mode 'prefill'" in text
    assert "1 without a timing" in text and out.exists()
    assert main([*args, "--device", device, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["skipped"]["warm-up (batch or seq 0)"] == 2 and sum(rep["rows"].values()) == len(rows)
    # validate reads the same file the same way
    assert main(["calibrate", "--validate", str(out), *args[1:]]) == 0
    assert f"skipped {n_prefill + 3} rows:" in capsys.readouterr().out


def test_sweep_that_cannot_identify_the_model_names_what_is_missing(tmp_path, capsys):
    truth, config, batches, contexts, _ = DEVICES["a100"]
    rows = [r for r in truth_rows(truth, config, batches, contexts) if r.mode != "drafter_decode"]
    rc, out = _fit(tmp_path, rows, config)
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert "cannot determine a profile" in err and "no drafter_decode rows (T_D" in err
    one_batch = [r for r in truth_rows(truth, config, batches, contexts) if r.batch == 4]
    rc, _ = _fit(tmp_path, one_batch, config)
    assert rc == 1 and "a single batch size" in capsys.readouterr().err


def test_csv_with_several_models_needs_one_picked(tmp_path, capsys):
    truth, config, batches, contexts, device = DEVICES["cpu"]
    rows = truth_rows(truth, config, batches, contexts)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open(tmp_path / "two.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "batch", "seq", "gamma", "mode", "median_ms"])
        for r in rows:
            w.writerow(["qwen-0.5b", r.batch, r.seq, r.gamma, r.mode, r.median_ms])
            w.writerow(["other-7b", r.batch, r.seq, r.gamma, r.mode, r.median_ms * 9])
    args = ["calibrate", "--csv", str(tmp_path / "two.csv"), "--model-config", str(tmp_path / "config.json")]
    assert main(args) == 1
    assert "pick one with --sweep-model" in capsys.readouterr().err
    assert main([*args, "--sweep-model", "qwen-0.5b", "--device", device, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["skipped"] == {"of another model": len(rows)} and rep["failures"] == []
