"""Cost model, live correction, acceptance model, γ chooser and hardware profiles: fast, engine-free (no SGLang)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from sglang_er.gamma import (
    KV_READ_RULE,
    AcceptanceModel,
    BatchStats,
    CostModel,
    GammaChooser,
    ModelCost,
    batch_stats,
)
from sglang_er.gamma.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from sglang_er.gamma.calibration import fit_profile
from sglang_er.gamma.hardware_profile import HardwareProfile

QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def qwen():
    return ModelCost.from_config(QWEN2_05B)


def _chooser(profile: str, model: ModelCost, alpha: float = 0.8, gamma_max: int = 4, **kw) -> GammaChooser:
    cm = CostModel(builtin_profile(profile), model)
    return GammaChooser(cm, AcceptanceModel(gamma_max, prior_alpha=alpha), **kw)


def _fresh_choice(chooser: GammaChooser, seq_lens, rids=None):
    """The chooser's decision for a batch on its own: no previous γ to keep (``reset``, as after a
    drafter change); ``chooser`` has ``explore_every=0``, so nothing else carries over either."""
    assert chooser.explore_every == 0
    chooser.reset()
    return chooser.choose(seq_lens, rids)


def _crossover(chooser: GammaChooser, seq_len: int, max_batch: int = 4096) -> int | None:
    """Smallest batch of ``seq_len``-token requests at which ``chooser`` (deciding each batch on
    its own) decodes plainly; None if it still speculates at ``max_batch``. (The first such batch:
    per-sequence overheads and KV-bound verifies can make speculation pay again at very large
    batches, so the set need not be an interval.)"""
    batches = range(1, max_batch + 1)
    return next((b for b in batches if _fresh_choice(chooser, BatchStats.uniform(b, seq_len)).gamma == 0), None)


def _shared(lens: list[int], prompt_keys: list) -> BatchStats:
    """The batch as the controller summarises it: requests with the same prompt share its KV pages."""
    from sglang_er.gamma.controller import shared_prefix_tokens

    st = batch_stats(lens)
    return BatchStats(st.batch, st.sum_len, st.max_len, shared_prefix_tokens(prompt_keys))


def test_gamma_modules_do_not_import_sglang():
    # The γ choice must be usable (and testable) without the engine, and light to import.
    code = (
        "import sys, sglang_er.gamma, sglang_er.gamma.builtin_profiles, sglang_er.gamma.calibration, "
        "sglang_er.gamma.hardware_profile; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'torch')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------- model cost
def test_model_cost_qwen2_05b(qwen):
    assert qwen.head_dim == 64 and qwen.attention_bias and qwen.tie_word_embeddings
    # tied: the lm_head is the embedding, so one forward streams every one of the 494M bf16 weights once
    assert abs(qwen.target_read_bytes / 2 - 494e6) / 494e6 < 0.01
    assert qwen.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2  # K+V · layers · kv heads · hd · bf16
    # W4 linears: 0.5 byte/param + (bf16 scale + bf16 zero) per group of 128 input channels
    lin = 24 * qwen.layer_linear_params
    assert qwen.drafter_layer_bytes == pytest.approx(lin * 0.5 + lin / 128 * 4.0)
    assert qwen.head_bytes == 151936 * 896 * 2  # shared bf16 head
    assert qwen.draft_read_bytes < 0.5 * qwen.target_read_bytes
    w4h = ModelCost.from_config(QWEN2_05B, w4_head=True)
    assert w4h.head_bytes < qwen.head_bytes / 3.5
    assert qwen.flops_per_token == pytest.approx(2 * (lin + 151936 * 896))
    explicit = ModelCost(
        num_layers=24,
        hidden=896,
        intermediate=4864,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        vocab=151936,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    assert explicit == qwen


def test_a_tensor_parallel_rank_streams_its_share(qwen):
    """At TP 2 each rank holds half of every head, MLP and vocabulary shard: the cost model of a
    rank prices half the weight bytes (norms and biases are what is not split)."""
    half = qwen.shard(2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate, half.vocab) == (7, 1, 2432, 75968)
    assert half.head_dim == qwen.head_dim and half.hidden == qwen.hidden
    assert 0.49 < half.target_read_bytes / qwen.target_read_bytes < 0.51
    assert 0.49 < half.draft_read_bytes / qwen.draft_read_bytes < 0.51
    assert qwen.shard(1) is qwen
    with pytest.raises(ValueError, match="does not divide"):
        qwen.shard(3)


def test_model_cost_group_rule_matches_quantizer():
    from sglang_er.gamma import model_cost
    from sglang_er.quant.quantizer import SUPPORTED_GROUP_SIZES, choose_group_size

    assert model_cost._SUPPORTED_GROUPS == SUPPORTED_GROUP_SIZES
    for k in (576, 896, 1536, 4864, 1152, 160):
        assert model_cost._w4_group(k, 128) == choose_group_size(k, 128)


def test_model_cost_config_errors():
    bad = dict(QWEN2_05B)
    del bad["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelCost.from_config(bad)
    with pytest.raises(ValueError, match="dtype"):
        ModelCost.from_config({**QWEN2_05B, "torch_dtype": "int8"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelCost.from_config({**QWEN2_05B, "num_key_value_heads": 3})


# ---------------------------------------------------------------------- cost model
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
    alone, group = batch_stats(lens), _shared(lens, [(500, "prompt")] * 8)
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
    two = _shared(lens, [(500, "a")] * 5 + [(300, "b")] * 3)
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


# ---------------------------------------------------------------------- acceptance
def _geometric(rng, alphas, gamma):
    a = 0
    while a < gamma and rng.random() < alphas[a]:
        a += 1
    return a


@pytest.mark.parametrize("alphas", [[0.8] * 4, [0.9, 0.8, 0.65, 0.5]])
def test_acceptance_estimates_alpha(alphas):
    rng = random.Random(1)
    acc = AcceptanceModel(4, window=16384)
    for _ in range(1000):  # batches of 8 at γ = 4
        acc.observe(4, [_geometric(rng, alphas, 4) for _ in range(8)])
    est = acc.alphas()
    assert all(abs(e - a) < 0.03 for e, a in zip(est, alphas)), (est, alphas)
    e_true = 1 + sum(math.prod(alphas[:k]) for k in range(1, 5))
    assert acc.expected_tokens_table()[4] == pytest.approx(e_true, abs=0.08)


def test_acceptance_closed_form_and_cold_start():
    for alpha in (0.3, 0.7, 0.95):
        acc = AcceptanceModel(6, prior_alpha=alpha)  # cold start: every α_k is the prior
        assert acc.alphas() == pytest.approx([alpha] * 6)
        table = acc.expected_tokens_table()
        for g in range(7):
            assert table[g] == pytest.approx((1 - alpha ** (g + 1)) / (1 - alpha))
    acc = AcceptanceModel(4)
    with pytest.raises(ValueError, match="accept_len"):
        acc.observe(2, [3])
    with pytest.raises(ValueError, match="outside"):
        acc.observe(5, [1])


def test_acceptance_window_and_unvisited_positions():
    rng = random.Random(2)
    acc = AcceptanceModel(4, window=2000, prior_alpha=0.7)
    for _ in range(250):
        acc.observe(1, [_geometric(rng, [0.9] * 4, 1) for _ in range(8)])
    # only position 1 was ever tried (γ = 1): deeper positions follow the pooled rate, not 0.7
    assert all(abs(a - 0.9) < 0.03 for a in acc.alphas())
    for _ in range(250):  # the regime changes; the window forgets the old one
        acc.observe(4, [_geometric(rng, [0.3] * 4, 4) for _ in range(8)])
    assert acc.num_observations == 2000
    assert abs(acc.alphas()[0] - 0.3) < 0.05


def test_acceptance_per_request():
    """Per-request acceptance as the controller records it (``observe`` with rids) and the chooser
    reads it (``batch_expected_tokens``): a request's own counts are used once it has
    ``request_min_obs`` records, shrunk towards the server-wide rates."""
    acc = AcceptanceModel(4, prior_alpha=0.8, request_min_obs=8)
    rng = random.Random(3)
    for _ in range(500):
        acc.observe(4, [_geometric(rng, [0.8] * 4, 4) for _ in range(6)])

    def own(rid):  # E[L|γ=4] of one request, as the chooser sees it
        return acc.batch_expected_tokens(1, [rid])[4]

    def srv():  # server-wide E[L|γ=4]
        return acc.expected_tokens_table()[4]

    for i in range(7):
        acc.observe(4, [0], rids=["hard"])  # a request whose drafts are always rejected
    assert own("hard") == srv()  # not enough history yet
    acc.observe(4, [0], rids=["hard"])
    assert own("hard") < srv() - 1  # 8 records: shrunk halfway to the server's α
    for i in range(32):
        acc.observe(4, [0], rids=["hard"])
    assert own("hard") < 1.5 < srv()
    acc.observe(4, [4, 0], rids=["easy", "hard"])  # observe(rids=) records per request and server-wide
    assert acc.num_observations == 500 * 6 + 40 + 2
    assert own("hard") < 1.5
    s = srv()
    total = acc.batch_expected_tokens(3, ["hard", "x", "y"])
    assert total[4] == pytest.approx(acc.expected_tokens_table("hard")[4] + 2 * s)  # Σ_b of each table
    assert total[0] == 3.0
    assert acc.batch_expected_tokens(3, ["hard", "x", "y"]) == total  # the same batch, nothing new: cached
    acc.forget("hard")
    assert acc.batch_expected_tokens(3, ["hard", "x", "y"])[4] == pytest.approx(3 * s)  # forget clears it
    for _ in range(8):
        acc.observe(4, [0], rids=["x"])
    assert acc.batch_expected_tokens(3, ["hard", "x", "y"])[4] < 3 * s - 1  # so does a new record


# ---------------------------------------------------------------------- chooser
def test_chooser_switches_with_batch_and_hardware(qwen):
    cpu = _chooser("cpu", qwen, explore_every=0)
    d1 = _fresh_choice(cpu, [512])
    assert d1.gamma > 0 and d1.speedup > 1.2
    assert set(d1.predicted_tokens_per_s) == {0, 1, 2, 3, 4} and d1.reason
    assert _fresh_choice(cpu, [512] * 256).gamma == 0
    cross_cpu = _crossover(cpu, 512)
    h100 = _chooser("h100", qwen, explore_every=0)
    assert _fresh_choice(h100, [512]).gamma > 0
    cross_h100 = _crossover(h100, 512)
    assert cross_cpu is not None and cross_h100 is not None
    assert 2 <= cross_cpu < cross_h100
    # speculation at batch cross-1, none at cross
    assert _fresh_choice(cpu, [512] * (cross_cpu - 1)).gamma > 0
    assert _fresh_choice(cpu, [512] * cross_cpu).gamma == 0
    # acceptance matters: a drafter that is always wrong is never worth running
    assert _chooser("cpu", qwen, alpha=0.05).choose([512]).gamma == 0


def test_chooser_deterministic_with_hysteresis_gain_and_ladder(qwen):
    lens = [random.Random(4).randint(10, 2000) for _ in range(5)]
    a, b = _chooser("cpu", qwen), _chooser("cpu", qwen)
    assert a.choose(lens) == b.choose(lens)
    assert a.choose(lens) == a.choose(lens)

    # Hysteresis: having chosen γ>0, a batch where plain is only slightly better keeps γ
    pol = _chooser("cpu", qwen, hysteresis=0.5)
    g1 = pol.choose([512]).gamma
    twin = _chooser("cpu", qwen, hysteresis=0.5, explore_every=0)  # the same models, no memory
    cross = _crossover(twin, 512)
    d = _fresh_choice(twin, [512] * cross)
    assert d.gamma == 0 and d.predicted_tokens_per_s[0] < 1.5 * d.predicted_tokens_per_s[g1]
    kept = pol.choose([512] * cross)
    assert kept.gamma == g1 and "hysteresis" in kept.reason
    assert pol.choose([512] * 512).gamma == 0  # a large change still switches

    # min_gain: demand a 10× gain -> never speculate
    assert _chooser("cpu", qwen, min_gain=10.0).choose([512]).gamma == 0
    # the ladder restricts γ
    d = _chooser("cpu", qwen, ladder=[2]).choose([512])
    assert d.gamma == 2 and set(d.predicted_tokens_per_s) == {0, 2}
    with pytest.raises(ValueError, match="ladder"):
        _chooser("cpu", qwen, ladder=[1, 8])

    # per-request acceptance feeds the decision
    acc = AcceptanceModel(4, prior_alpha=0.8)
    rng = random.Random(5)
    for _ in range(125):
        acc.observe(4, [_geometric(rng, [0.8] * 4, 4) for _ in range(8)])
    for _ in range(40):
        acc.observe(4, [0], rids=["bad"])  # a request whose drafts are always rejected
    pol = GammaChooser(CostModel(builtin_profile("cpu"), qwen), acc, explore_every=0)
    assert _fresh_choice(pol, [512], ["bad"]).gamma == 0
    assert _fresh_choice(pol, [512], ["new"]).gamma > 0


def _python_calls_per_choice(qwen, batch, iterations=20):
    """Python function calls made by each of ``iterations`` consecutive ``choose`` (one batch)."""
    pol = _chooser("cpu", qwen)
    lens = list(range(100, 100 + batch))
    counts = []

    def profile(frame, event, arg):
        if event == "call":
            counts[-1] += 1

    for _ in range(iterations):
        counts.append(0)
        sys.setprofile(profile)
        try:
            pol.choose(lens)
        finally:
            sys.setprofile(None)
    return counts


def test_chooser_decision_is_cheap(qwen):
    # well under a forward: the batch is summarised by builtins (sum, max over the lengths), then the
    # decision is O(candidates), so the Python work per iteration does not grow with the batch
    # (the counts of two batch sizes differ by a call or two only where exploration branches differ)
    small, large = _python_calls_per_choice(qwen, 16), _python_calls_per_choice(qwen, 1024)
    assert max(large) <= max(small) + 4 and max(large) < 64, (small, large)  # a per-request loop: >= 1024


def test_hot_path_iteration_times_equal_the_phase_predictions(qwen):
    """The inlined per-iteration predictions equal the phase methods (t_plain, or t_draft +
    t_verify, plus the scheduler time), for both KV read rules and draft layouts, before and after
    live correction (multiplier, then affine)."""
    lens = [300, 420, 510, 800, 64, 1000]
    st = _shared(lens, [(200, "a")] * 3 + [(60, "b")] * 2 + [(1000, "c")])
    gammas = [0, 1, 3, 7]
    for rule in ("per_request", "shared_once"):
        for layout in ("padded", "ragged"):
            cm = CostModel(builtin_profile("cpu"), qwen, kv_read_rule=rule, draft_kv_layout=layout)
            outside = cm.correction.t_outside
            for step in range(6):  # step 0: profile only; then multipliers; then the affine fit
                got = cm.iteration_times(st, gammas)
                for g in gammas:
                    want = cm.t_draft(st, g) + cm.t_verify(st, g) if g else cm.t_plain(st)
                    assert got[g] == pytest.approx(want + outside(g, st.batch), rel=1e-12), (rule, layout, g)
                cm.observe("plain", lens[: step + 1], 0, 0.01 * (step + 1))
                cm.observe("draft", lens[: step + 1], 3, 0.004 * (step + 2))
                cm.observe("verify", lens[: step + 1], 3, 0.012 * (step + 1))
                cm.correction.observe_outside(step % 2, step + 1, 0.001 * step)


# ---------------------------------------------------------------------- profiles
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


def test_chooser_explores_when_a_low_acceptance_estimate_keeps_it_plain(qwen):
    """A stale low α would keep γ = 0 for good (no speculation, no new measurement): the 4th
    plain iteration in a batch-size octave where speculation never ran explores, then every
    explore_every-th plain iteration does, unless clearly compute-bound (there only the
    once-per-octave measurement); a better measured α then turns speculation back on. An
    exploration is EXPLORE_RUN speculative iterations in a row (the first one runs cold)."""
    from sglang_er.gamma import EXPLORE_RUN

    assert EXPLORE_RUN == 2
    acc = AcceptanceModel(4, prior_alpha=0.05)  # the estimate after a bad start
    pol = GammaChooser(CostModel(builtin_profile("cpu"), qwen), acc, explore_every=8, explore_floor=0.5)
    picks = [pol.choose([512]).gamma for _ in range(32)]
    explored = [i for i, g in enumerate(picks) if g > 0]
    assert explored == [3, 4, 12, 13, 21, 22, 30, 31], picks
    big = [pol.choose([512] * 4096).gamma for _ in range(40)]
    assert sum(g > 0 for g in big) == EXPLORE_RUN, big  # compute-bound: only the octave's one measurement
    for _ in range(64):  # the exploratory iterations measured a good drafter
        acc.observe(4, [4])
    assert pol.choose([512]).gamma > 0
    assert (
        GammaChooser(CostModel(builtin_profile("cpu"), qwen), AcceptanceModel(4, prior_alpha=0.05), explore_every=0)
        .choose([512])
        .gamma
        == 0
    )
    acc.reset()  # a new drafter: back to the prior
    assert acc.num_observations == 0 and acc.alphas() == pytest.approx([0.05] * 4)


def test_scheduler_time_outside_the_forwards_enters_the_decision(qwen):
    """A speculative iteration commits several tokens per request, so the scheduler's work around
    the forwards (result processing, streaming) costs it more than a plain one: measured per
    request and mode, it moves a marginal speculation decision back to plain."""
    pol = _chooser("cpu", qwen, alpha=0.8, explore_every=0)
    cm = pol.cost_model
    corr = cm.correction
    lens = [400] * 8
    assert corr.t_outside(3, 8) == 0.0  # nothing measured yet: neither mode is penalised
    corr.observe_outside(0, 8, 0.008)
    assert corr.t_outside(3, 8) == pytest.approx(0.008)  # the unmeasured mode borrows the other's
    for b in (1, 2, 4, 16, 32, 64):  # a + b·B is recovered from iterations of varied batch size
        corr.observe_outside(0, b, 0.004 + 0.0005 * b)
    assert corr.t_outside(0, 100) == pytest.approx(0.054, rel=0.05)
    d = _fresh_choice(pol, lens)
    g = max(pol.ladder, key=lambda k: d.predicted_tokens_per_s[k])
    t_spec = d.predicted_iter_s[g]
    assert t_spec == pytest.approx(cm.t_draft(lens, g) + cm.t_verify(lens, g) + 0.008)
    for _ in range(50):  # spec iterations measured far costlier outside the forwards
        corr.observe_outside(g, 8, 10 * t_spec)
    d = _fresh_choice(pol, lens)
    assert d.predicted_iter_s[g] > 10 * t_spec
    assert d.gamma == 0


def test_chooser_times_the_plain_step_while_speculating(qwen):
    """A profile that overestimates the plain step (its fixed overhead measured on a deeper
    model) would keep speculation on for good: while speculating, every 4th iteration is plain
    until plain has been timed, then every explore_every-th iteration; the first
    measurement replaces the profile's guess, and a plain step measured fast turns speculation off."""
    cm = CostModel(builtin_profile("cpu"), qwen)
    pol = GammaChooser(cm, AcceptanceModel(4, prior_alpha=0.8), explore_every=8, explore_floor=0.3)
    lens = [512] * 2
    picks = [pol.choose(lens).gamma for _ in range(6)]
    assert picks[:3] == [picks[0]] * 3 and picks[0] > 0 and picks[3] == 0 and picks[4] > 0, picks
    cm.observe("plain", lens, 0, 0.2 * cm.t_plain(lens, corrected=False))  # plain is 5x cheaper than thought
    assert cm.correction.multiplier["plain"] == pytest.approx(0.2)
    assert pol.choose(lens).gamma == 0


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


def test_chooser_measures_again_however_low_its_estimate(qwen):
    """An estimate below the exploration floor (here: acceptance ~0) is still re-measured once
    every FORCED_EXPLORE_PERIODS · explore_every plain iterations, after the batch-size octave's
    first measurement (the 4th plain iteration)."""
    from sglang_er.gamma import FORCED_EXPLORE_PERIODS

    pol = GammaChooser(
        CostModel(builtin_profile("cpu"), qwen),
        AcceptanceModel(4, prior_alpha=0.001),
        explore_every=4,
        explore_floor=0.99,
    )
    n = FORCED_EXPLORE_PERIODS * 4 + 1  # + the exploration's second (timed) iteration
    picks = [pol.choose([512]).gamma for _ in range(3 * n)]
    assert [i for i, g in enumerate(picks) if g > 0] == [3, 4, 3 + n, 4 + n, 3 + 2 * n, 4 + 2 * n], picks


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


def test_a_draft_vocabulary_subset_shrinks_the_heads_bytes_and_flops():
    full = ModelCost.from_config(QWEN2_05B, w8_head=True)
    sub = ModelCost.from_config(QWEN2_05B, w8_head=True, draft_vocab=32768)
    assert sub.head_bytes == pytest.approx(full.head_bytes * 32768 / 151936)
    assert full.draft_read_bytes - sub.draft_read_bytes == pytest.approx(full.head_bytes - sub.head_bytes)
    assert sub.draft_head_flops_per_token == 2.0 * 32768 * 896
    assert sub.head_flops_per_token == full.head_flops_per_token  # the target still scores every token
    # a subset as large as the vocabulary is the whole head
    assert (
        ModelCost.from_config(QWEN2_05B, draft_vocab=151936).head_bytes == ModelCost.from_config(QWEN2_05B).head_bytes
    )
