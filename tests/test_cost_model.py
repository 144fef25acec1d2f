"""Predicted phase times and their live correction (sglang_er.gamma.cost_model, correction): engine-free."""

from __future__ import annotations

import math
import random

import pytest
from gamma_helpers import chooser_for, fresh_choice, shared_batch

from sglang_er.gamma import (
    KV_READ_RULE,
    CostModel,
    batch_stats,
)
from sglang_er.gamma.builtin_profiles import builtin_profile
from sglang_er.gamma.hardware_profile import HardwareProfile


def test_cost_uses_each_requests_length(qwen):
    cm = CostModel(builtin_profile("cpu"), qwen)
    # Attention traffic is linear in every length: the same total costs the same ...
    assert cm.t_plain([100, 3900]) == pytest.approx(cm.t_plain([2000, 2000]))
    assert cm.t_plain([1000] * 3 + [5000]) > cm.t_plain([1000] * 4)
    # ... but the padded drafter streams max(L)+γ for every request: skew costs it
    assert cm.t_draft([100, 3900], 2) > cm.t_draft([2000, 2000], 2)
    import torch

    assert cm.t_verify(torch.tensor([7, 300, 4000]), 3) == cm.t_verify([7, 300, 4000], 3)
    # roofline: verifying γ+1 tokens at batch 1 costs about one plain forward, not γ+1
    assert cm.t_verify([512], 4) < 1.2 * cm.t_plain([512])
    with pytest.raises(ValueError, match="non-negative integers"):
        cm.t_plain([10, -1])
    with pytest.raises(ValueError, match="empty"):
        cm.t_plain([])
    with pytest.raises(ValueError, match="γ"):
        cm.t_verify([10], 0)


def test_kv_read_rule_per_request_vs_shared_once(qwen):
    assert KV_READ_RULE == {
        "torch_native": "per_request",
        "flashinfer": "per_request",
        "flashinfer_cascade": "shared_once",
        "triton": "per_request",
    }
    prof = builtin_profile("h100")
    per_req = CostModel(prof, qwen, kv_read_rule="per_request")
    shared = CostModel(prof, qwen, kv_read_rule="shared_once")
    assert CostModel(prof, qwen, attention_backend="flashinfer_cascade").kv_read_rule == "shared_once"
    assert CostModel(prof, qwen, attention_backend="triton").kv_read_rule == "per_request"
    assert CostModel(builtin_profile("cpu"), qwen).kv_read_rule == "per_request"  # torch_native

    lens = [600] * 8  # GRPO: 8 samples of one 500-token prompt, 100 tokens generated each
    alone, group = batch_stats(lens), shared_batch(lens, [(500, "prompt")] * 8)
    kv = qwen.kv_bytes_per_token

    def moved(cm, phase, st, gamma=0):  # the bytes a forward moves, as the calibration samples count them
        return cm.calibration_sample(phase, st, gamma, 1.0).bytes

    # per_request: shared pages are still read by every request -> sharing changes nothing
    assert moved(per_req, "plain", group) == moved(per_req, "plain", alone)
    assert per_req.t_plain(group) == per_req.t_plain(alone)
    # shared_once: the 500-token prefix is read once instead of 8 times
    saved = moved(shared, "plain", alone) - moved(shared, "plain", group)
    assert saved == pytest.approx(7 * 500 * kv * shared.kv_traffic_factor)
    saved_v = moved(shared, "verify", alone, 3) - moved(shared, "verify", group, 3)
    assert saved_v == pytest.approx(saved)  # the verify reads each KV page once for its γ+1 queries
    assert shared.t_plain(group) < shared.t_plain(alone)
    # the padded drafter gathers per request whatever the target backend does
    assert shared.t_draft(group, 3) == shared.t_draft(alone, 3)
    # two prompts: each group reads its own prompt once
    two = shared_batch(lens, [(500, "a")] * 5 + [(300, "b")] * 3)
    saved2 = moved(shared, "plain", alone) - moved(shared, "plain", two)
    assert saved2 == pytest.approx((4 * 500 + 2 * 300) * kv * shared.kv_traffic_factor)
    with pytest.raises(ValueError, match="kv_read_rule"):
        CostModel(prof, qwen, kv_read_rule="sometimes")
    with pytest.raises(ValueError, match="no known KV read rule"):
        CostModel(prof, qwen, attention_backend="my_backend")


def _slow_twin(p: HardwareProfile, k: float) -> HardwareProfile:
    """The same machine, k× slower in everything: every prediction scales by exactly k."""
    return p.model_copy(
        update=dict(
            bandwidth_bytes_per_s=p.bandwidth_bytes_per_s / k,
            flops_per_s={c: f / k for c, f in p.flops_per_s.items()},
            fixed_plain_s=p.fixed_plain_s * k,
            fixed_draft_step_s=p.fixed_draft_step_s * k,
            fixed_verify_s=p.fixed_verify_s * k,
            per_seq_s=p.per_seq_s * k,
            per_seq_draft_s=p.per_seq_draft_s * k,
        )
    )


def test_live_correction_follows_a_2x_slower_machine(qwen):
    prof = builtin_profile("cpu")
    cm = CostModel(prof, qwen)
    truth = CostModel(_slow_twin(prof, 2.0), qwen)
    rng = random.Random(0)
    for _ in range(20):
        lens = [rng.randint(50, 3000) for _ in range(rng.randint(1, 24))]
        g = rng.randint(1, 4)
        noise = lambda: 1.0 + rng.uniform(-0.03, 0.03)  # noqa: E731
        cm.observe("plain", lens, 0, truth.t_plain(lens) * noise())
        cm.observe("draft", lens, g, truth.t_draft(lens, g) * noise())
        obs = cm.observe("verify", lens, g, truth.t_verify(lens, g) * noise())
    assert 0 < obs.bw_util < 1 and obs.rel_err_raw == pytest.approx(0.5, abs=0.03)
    for phase in ("plain", "draft", "verify"):
        assert cm.correction.multiplier[phase] == pytest.approx(2.0, rel=0.05)
    lens = [1234, 77, 2900]
    assert cm.t_plain(lens) == pytest.approx(truth.t_plain(lens), rel=0.06)
    st = batch_stats(lens)
    assert cm.iteration_times(st, [3])[3] == pytest.approx(truth.iteration_times(st, [3])[3], rel=0.06)
    assert cm.t_plain(lens, corrected=False) == pytest.approx(truth.t_plain(lens) / 2)

    stats = cm.correction.error_stats()
    for phase in ("plain", "draft", "verify"):
        s = stats[phase]
        assert s["n"] == 20 and s["window"] == 20
        assert s["mean_rel_err_raw"] == pytest.approx(0.5, abs=0.03)  # the profile alone: off by 2×
        assert s["mean_rel_err_corrected"] < s["mean_rel_err_raw"]
        assert cm.correction.error_stats(last=5)[phase]["mean_rel_err_corrected"] < 0.06  # after convergence
        assert 0 < s["bw_util"] < 1

    # bounded: one absurd measurement (a GC pause) cannot push a multiplier outside [0.2, 5]
    m_before = cm.correction.multiplier["plain"]
    cm.observe("plain", [100], 0, 1e3)
    assert m_before < cm.correction.multiplier["plain"] <= 5.0
    for _ in range(100):
        cm.observe("plain", [100], 0, 1e3)
    assert cm.correction.multiplier["plain"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="phase"):
        cm.observe("prefill", [10], 0, 0.1)
    with pytest.raises(ValueError, match="positive"):
        cm.observe("plain", [10], 0, float("nan"))


def test_hot_path_iteration_times_equal_the_phase_predictions(qwen):
    """The inlined per-iteration predictions equal the phase methods (t_plain, or t_draft +
    t_verify, plus the scheduler time; raw: the same uncorrected, without it), for both KV read
    rules and draft layouts, before and after live correction (multiplier, then affine)."""
    lens = [300, 420, 510, 800, 64, 1000]
    st = shared_batch(lens, [(200, "a")] * 3 + [(60, "b")] * 2 + [(1000, "c")])
    gammas = [0, 1, 3, 7]
    for rule in ("per_request", "shared_once"):
        for layout in ("padded", "ragged"):
            cm = CostModel(builtin_profile("cpu"), qwen, kv_read_rule=rule, draft_kv_layout=layout)
            outside = cm.correction.t_outside
            for step in range(6):  # step 0: profile only; then multipliers; then the affine fit
                raw: dict = {}
                got = cm.iteration_times(st, gammas, raw)
                for g in gammas:
                    want = cm.t_draft(st, g) + cm.t_verify(st, g) if g else cm.t_plain(st)
                    assert got[g] == pytest.approx(want + outside(g, st.batch), rel=1e-12), (rule, layout, g)
                    want_raw = (
                        cm.t_draft(st, g, corrected=False) + cm.t_verify(st, g, corrected=False)
                        if g
                        else cm.t_plain(st, corrected=False)
                    )
                    assert raw[g] == pytest.approx(want_raw, rel=1e-12), (rule, layout, g)
                cm.observe("plain", lens[: step + 1], 0, 0.01 * (step + 1))
                cm.observe("draft", lens[: step + 1], 3, 0.004 * (step + 2))
                cm.observe("verify", lens[: step + 1], 3, 0.012 * (step + 1))
                cm.correction.observe_outside(step % 2, step + 1, 0.001 * step)


def test_scheduler_time_outside_the_forwards_enters_the_decision(qwen):
    """A speculative iteration commits several tokens per request, so the scheduler's work around
    the forwards (result processing, streaming) costs it more than a plain one: measured per
    request and mode, it moves a marginal speculation decision back to plain."""
    pol = chooser_for("cpu", qwen, alpha=0.8, explore_every=0)
    cm = pol.cost_model
    corr = cm.correction
    lens = [400] * 8
    assert corr.t_outside(3, 8) == 0.0  # nothing measured yet: neither mode is penalised
    corr.observe_outside(0, 8, 0.008)
    assert corr.t_outside(3, 8) == pytest.approx(0.008)  # the unmeasured mode borrows the other's
    for b in (1, 2, 4, 16, 32, 64):  # a + b·B is recovered from iterations of varied batch size
        corr.observe_outside(0, b, 0.004 + 0.0005 * b)
    assert corr.t_outside(0, 100) == pytest.approx(0.054, rel=0.05)
    d = fresh_choice(pol, lens)
    g = max(pol.ladder, key=lambda k: d.predicted_tokens_per_s[k])
    t_spec = d.predicted_iter_s[g]
    assert t_spec == pytest.approx(cm.t_draft(lens, g) + cm.t_verify(lens, g) + 0.008)
    for _ in range(50):  # spec iterations measured far costlier outside the forwards
        corr.observe_outside(g, 8, 10 * t_spec)
    d = fresh_choice(pol, lens)
    assert d.predicted_iter_s[g] > 10 * t_spec
    assert d.gamma == 0


def test_live_correction_fixes_the_profiles_shape_not_just_its_scale(qwen):
    """A profile whose fixed overhead is too large and per-request slope too small (measured on
    a deeper model): measured over several batch sizes, the correction (a + b·raw) predicts a new
    batch size within 5%, where one factor cannot fit both ends."""
    cm = CostModel(builtin_profile("cpu"), qwen)

    def true_plain(b):  # the machine: 40% of the profile's fixed part, 3x its slope
        raw1, raw0 = cm.t_plain([256] * b, corrected=False), cm.t_plain([256], corrected=False)
        return 0.4 * raw0 + 3.0 * (raw1 - raw0)

    for b in (1, 4, 16, 64, 1, 64):
        cm.observe("plain", [256] * b, 0, true_plain(b))
    assert cm.t_plain([256] * 32) == pytest.approx(true_plain(32), rel=0.05)
    assert cm.t_plain([256]) == pytest.approx(true_plain(1), rel=0.05)


def test_warmup_measurements_do_not_train_the_correction(qwen):
    """With ``warmup`` / ``outside_warmup`` = 2, the first two phase / outside-time measurements are
    reported but do not move the correction (the server skips outside-time ones: one-time work such
    as the drafter's AWQ switch must not be learnt as a per-iteration cost)."""
    cm = CostModel(builtin_profile("cpu"), qwen, warmup=2, outside_warmup=2)
    corr = cm.correction
    corr.draft_setup = 0.0  # κ = 0: a draft costs γ of the profile's steps, as the factors below assume
    lens = [300]
    raw = cm.t_draft(lens, 4, corrected=False)
    for _ in range(2):
        obs = cm.observe("draft", lens, 4, 3.0 * raw)
        assert obs.rel_err_raw == pytest.approx(2 / 3) and corr.multiplier["draft"] == 1.0
    cm.observe("draft", lens, 4, 1.1 * raw)  # the third one is learnt from
    assert corr.multiplier["draft"] == pytest.approx(1.1)
    cm.observe("draft", lens, 4, 0.9 * raw)  # and so is every later one (EMA with weight ema)
    assert corr.multiplier["draft"] == pytest.approx(math.exp(0.8 * math.log(1.1) + 0.2 * math.log(0.9)))
    for _ in range(2):  # the AWQ switch or a first allocation inside an iteration's wall
        corr.observe_outside(4, 1, 0.17)
    assert corr.t_outside(4, 1) == 0.0
    corr.observe_outside(4, 1, 0.002)
    assert corr.t_outside(4, 1) == pytest.approx(0.002)


def test_draft_correction_is_per_step_with_a_measured_setup(qwen):
    """A draft of γ steps costs (γ + κ) steps, κ the first step's KV gather. Measured only at γ = 1
    across batch sizes, a correction fitted per iteration extrapolates its B-slope to γ (a
    gsm8k-lm server priced γ = 7 at B = 1 at 4x its cost and stayed at γ = 1); per step it
    predicts γ = 7 from γ = 1 within the setup's share. κ follows first-step vs rest timings."""
    from sglang_er.gamma import DRAFT_SETUP_PRIOR

    cm = CostModel(builtin_profile("cpu"), qwen)
    corr = cm.correction
    assert corr.draft_setup == DRAFT_SETUP_PRIOR

    def measured(lens, g):  # steps 1.5x the profile's plus 2 ms each, κ = 1
        return (1.5 * cm.t_draft(lens, 1, corrected=False) + 0.002) * (g + 1.0)

    for k in range(40):  # the first step takes 2x each later one: κ = 1
        corr.observe_draft_setup(4e-3, 6e-3, 4)
    assert corr.draft_setup == pytest.approx(1.0, abs=0.01)
    for b in (1, 2, 4, 8, 16, 32) * 3:
        cm.observe("draft", [300] * b, 1, measured([300] * b, 1))
    for b in (1, 8, 32):
        lens = [300] * b
        assert cm.t_draft(lens, 7) == pytest.approx(measured(lens, 7), rel=0.02)
    corr.observe_draft_setup(5e-3, 1e-9, 2)  # an outlier moves κ by at most ema · DRAFT_SETUP_MAX
    assert corr.draft_setup <= 1.0 + corr.ema * 4.0
