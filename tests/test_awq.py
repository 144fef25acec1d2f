"""AWQ for the W4 drafter: activation statistics, the β search, norm folding. CPU only, fast."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sglang_er.quant.awq import FOLD_TARGET, LINEAR_GROUPS, ActivationStats, AWQQuantizer
from sglang_er.quant.awq_search import (
    awq_scales,
    fake_quant_f32,
    fold_into_norm,
    output_errors,
    scale_weight,
    search_scales,
)
from sglang_er.quant.live_stats import LiveStats
from sglang_er.quant.quantizer import quantize_rtn
from sglang_er.quant.w4linear import W4Linear


def _acts(t, k, seed=0, n_outliers=6, factor=20.0):
    """Activations [t, k] with a few input channels ``factor`` x larger (as in real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    idx = torch.randperm(k, generator=g)[:n_outliers]
    x[:, idx] *= factor
    return x


def _weight(n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def _w4(w, group, s=None):
    """The drafter's float32 W4 layer of ``w``: ``(x / s) Q(W·diag(s))ᵀ`` (plain RTN without ``s``)."""
    return W4Linear.from_float(w, group_size=group, input_scale=s, act_dtype=torch.float32)


def _rel_err(x, w, s, group):
    """Relative output error of the W4 layer (x/s) Q(W·diag(s))ᵀ on x."""
    y = x @ w.t()
    return float((y - _w4(w, group, s)(x)).pow(2).sum() / y.pow(2).sum())


def _rtn_err(awq, layer, group, weights):
    """Output error of plain RTN on the sample the quantizer scored (its rows and its group size)."""
    st = awq.stats[(layer, group)]
    return search_scales(weights, st.mean_abs(), st.sample(), betas=[0.0])[2]


def _rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


# ============================================================================ search
def test_awq_beats_rtn_with_outlier_channels():
    k, n, group = 512, 384, 128
    x = _acts(1536, k)
    w = _weight(n, k)
    st = ActivationStats(k, decay=1.0, max_tokens=256, reservoir_size=128)
    for chunk in x[:1024].split(128):
        st.update(chunk)
    s, beta, err, grid, errs = search_scales(w, st.mean_abs(), st.sample(), group, return_all=True)
    err_rtn = float(errs[grid.index(0.0)])
    assert beta > 0
    assert err <= 0.7 * err_rtn  # a clear margin on the sample (≈0.4x in practice)
    assert err == pytest.approx(float(errs.min()))
    # ... and on held-out rows the statistics never saw
    held = x[1024:]
    assert _rel_err(held, w, s, group) <= 0.75 * _rel_err(held, w, torch.ones(k), group)


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_rtn_on_the_sample(seed):
    # no outliers: AWQ has little to gain, but the choice can never lose to RTN on the sample
    k, n = 256, 128
    x = _acts(200, k, seed=seed, n_outliers=0)
    w = _weight(n, k, seed=seed + 10)
    s, beta, err, grid, errs = search_scales([w[:64], w[64:]], x.abs().mean(0), x[:128], 64, return_all=True)
    assert err <= float(errs[grid.index(0.0)])
    assert 0.0 in grid and len(grid) == 11


def test_beta_zero_is_rtn_exactly():
    k, n, group = 256, 96, 64
    x = _acts(64, k)
    w = _weight(n, k)
    m = x.abs().mean(0)
    s0 = awq_scales(m, 0.0)
    assert torch.equal(s0, torch.ones(k))
    assert torch.equal(_w4(scale_weight(w, s0), group).dequantize(), _w4(w, group).dequantize())
    s, beta, err = search_scales(w, m, x, group, betas=[0.0])
    assert beta == 0.0 and torch.equal(s, torch.ones(k))
    rtn = float((x @ w.t() - _w4(w, group)(x)).pow(2).sum())
    assert err == pytest.approx(rtn, rel=1e-5)
    # 0 is always added to the grid
    _, _, _, grid, _ = search_scales(w, m, x, group, betas=[0.5, 1.0], return_all=True)
    assert grid == [0.0, 0.5, 1.0]
    # a W4Linear with input_scale = ones stores exactly the RTN weight
    lin = W4Linear.from_float(w, group_size=group, input_scale=s0)
    assert torch.equal(lin.dequantize(), quantize_rtn(w, group).dequantize())


def test_fake_quant_f32_is_bit_identical_to_the_w4_weight():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 256, generator=g) * torch.logspace(-3, 2, 256)[None, :]
    w[0, :64] = 0.3  # constant group
    w[1, 64:128] = w[1, 64:128].abs() + 0.1  # all-positive: zero point clamps to 0
    w[2, 128:192] = -w[2, 128:192].abs() - 0.1  # all-negative
    w[3] = 0.0
    for group in (32, 64, 128):
        assert torch.equal(fake_quant_f32(w, group), _w4(w, group).dequantize())
        assert torch.equal(fake_quant_f32(w, group), quantize_rtn(w, group).dequantize())
    s = awq_scales(w.abs().mean(0), 0.7)
    assert torch.equal(fake_quant_f32(w * s, 64), _w4(w, 64, s).dequantize())


def test_scales_normalised_like_autoawq():
    m = torch.tensor([0.01, 0.1, 1.0, 10.0])
    s = awq_scales(m, 1.0)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(s / s[0], m / m[0], rtol=1e-5)
    assert bool((awq_scales(torch.zeros(4), 0.5) > 0).all())  # dead channels stay finite


def test_output_errors_matches_layer_outputs():
    k, n, group = 128, 64, 32
    x = _acts(32, k)
    w = _weight(n, k)
    s = awq_scales(x.abs().mean(0), 0.5)
    (err,) = output_errors(w, x, [s], group).tolist()
    lin = W4Linear.from_float(w, group_size=group, input_scale=s)
    direct = float((x @ w.t() - lin(x)).pow(2).sum())
    assert err == pytest.approx(direct, rel=1e-4)


class _CountTorchCalls(TorchFunctionMode):
    """Counts torch function and tensor-method calls made from Python while active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _update_and_search_calls(k, n=256):
    x = _acts(128, k, n_outliers=20)
    w = _weight(n, k)
    st = ActivationStats(k, max_tokens=64)
    t0 = time.perf_counter()
    with _CountTorchCalls() as upd:
        for _ in range(10):
            st.update(x)
    t_update = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    with _CountTorchCalls() as srch:
        s, beta, err = search_scales(w, st.mean_abs(), st.sample(), 128)
    print(f"k={k}: update {t_update * 1e3:.1f} ms, search {time.perf_counter() - t0:.2f} s")  # printed, never asserted
    assert s.shape == (k,) and torch.equal(s, awq_scales(st.mean_abs(), beta))
    return upd.calls, srch.calls


def test_vectorised_large_k_is_fast():
    # Qwen2-0.5B's down_proj input width; a per-channel Python loop would take minutes here. Vectorised
    # means the torch calls made from Python do not grow with k: the same count at k=4864 as at k=256
    # (a per-channel loop would make thousands more).
    small, large = _update_and_search_calls(256), _update_and_search_calls(4864)
    assert large == small, (small, large)
    assert max(large) < 4864 // 4, large


# ============================================================================ folding
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fold_into_norm_equals_input_scale(dtype, tol):
    k, n, group = 256, 192, 128
    h = _acts(16, k, seed=3).to(dtype)
    g = (1.0 + 0.3 * torch.randn(k, generator=torch.Generator().manual_seed(4))).to(dtype)
    w = _weight(n, k).to(dtype)
    s = awq_scales(_acts(256, k, seed=3).abs().mean(0), 0.5)

    g_before = g.clone()
    g_fold = fold_into_norm(g, s)
    assert g_fold.dtype == dtype and torch.equal(g, g_before)  # the target's norm is untouched
    folded = W4Linear.from_float(scale_weight(w, s), group_size=group, act_dtype=dtype)
    scaled = W4Linear.from_float(w, group_size=group, input_scale=s, act_dtype=dtype)
    assert torch.equal(folded.dequantize(), scaled.dequantize())  # same W4 weight
    y_fold = folded(_rms_norm(h, g_fold))
    y_scale = scaled(_rms_norm(h, g))
    assert y_fold.dtype == y_scale.dtype == dtype
    rel = float((y_fold.float() - y_scale.float()).norm() / y_scale.float().norm())
    assert rel < tol
    # both are the layer the search scored
    x = _rms_norm(h, g).float()
    ref = _w4(w.float(), group, s)(x)
    assert float((y_scale.float() - ref).norm() / ref.norm()) < tol


def test_requantize_with_input_scale():
    k, n, group = 256, 64, 64
    w = _weight(n, k)
    s = awq_scales(_acts(64, k).abs().mean(0), 0.4)
    lin = W4Linear.from_float(w, group_size=group, input_scale=torch.ones(k))
    lin.requantize_(w, input_scale=s)
    ref = W4Linear.from_float(w, group_size=group, input_scale=s)
    assert torch.equal(lin.dequantize(), ref.dequantize())
    assert torch.equal(lin.input_scale, ref.input_scale)


def test_fold_targets_documented():
    assert set(FOLD_TARGET) == set(LINEAR_GROUPS)
    assert FOLD_TARGET["qkv"] == "input_layernorm"
    assert FOLD_TARGET["gate_up"] == "post_attention_layernorm"
    assert FOLD_TARGET["o"] is None and FOLD_TARGET["down"] is None


# ============================================================================ statistics
def test_stats_running_mean_matches_torch_mean():
    k = 96
    st = ActivationStats(k, decay=1.0, max_tokens=10_000, reservoir_size=32)
    chunks = [_acts(t, k, seed=t) for t in (1, 7, 50, 3, 128)]
    for c in chunks:
        st.update(c.to(torch.bfloat16) if c.shape[0] == 3 else c)
    full = torch.cat([c.to(torch.bfloat16).float() if c.shape[0] == 3 else c for c in chunks])
    assert torch.allclose(st.mean_abs(), full.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert st.tokens_seen == st.tokens_used == full.shape[0]
    assert st.num_updates == len(chunks)


def test_stats_decay_weights_recent_updates():
    k, d = 8, 0.5
    st = ActivationStats(k, decay=d)
    a, b = torch.full((4, k), 1.0), torch.full((2, k), 4.0)
    st.update(a)
    st.update(b)
    expect = (d * 4 * 1.0 + 2 * 4.0) / (d * 4 + 2)
    assert torch.allclose(st.mean_abs(), torch.full((k,), expect))


def test_stats_sampling_bounds():
    k, m, r = 32, 16, 24
    st = ActivationStats(k, decay=1.0, max_tokens=m, reservoir_size=r, reservoir_per_update=5)
    x = torch.arange(100 * k, dtype=torch.float32).reshape(100, k)  # distinct rows
    st.update(x)
    assert st.tokens_seen == 100 and st.tokens_used == m
    assert st.reservoir_filled == m  # empty reservoir: fills with up to all sampled rows
    st.update(x)
    assert st.tokens_used == 2 * m
    assert st.reservoir_filled == r  # then fills the rest, capped at R
    for _ in range(5):
        st.update(x)
        assert st.reservoir_filled == r
    assert st.tokens_used == 7 * m
    rows = st.sample()
    assert rows.shape == (r, k)
    # every reservoir row is an input row, no zero (unwritten) rows remain
    ids = rows[:, 0] / k
    assert torch.equal(ids, ids.round()) and bool((rows[:, 1:] - rows[:, :1] == torch.arange(1, k)).all())
    assert len(set(ids.tolist())) > 1  # a random subset, not always the first rows


def test_stats_are_reproducible_per_seed():
    # the quantizer seeds each (layer, group) itself: the same traffic gives the same statistics
    k = 48
    a, b, c = (ActivationStats(k, decay=0.9, max_tokens=8, reservoir_size=16, seed=seed) for seed in (5, 5, 6))
    for i in range(4):
        x = _acts(20, k, seed=i)
        for o in (a, b, c):
            o.update(x)
    assert torch.equal(a.mean_abs(), b.mean_abs()) and torch.equal(a.sample(), b.sample())
    assert not torch.equal(a.sample(), c.sample())  # another seed draws other rows
    assert (a.tokens_seen, a.tokens_used, a.num_updates, a.reservoir_filled) == (80, 32, 4, 16)


def test_stats_under_inference_mode_and_no_host_sync_types():
    k = 16
    with torch.inference_mode():
        st = ActivationStats(k, max_tokens=4)
        st.update(torch.randn(10, k))
    st.update(torch.randn(3, 2, k))  # [..., K] inputs, outside inference mode afterwards
    assert st.tokens_seen == 16 and st.tokens_used == 8
    # the running weight stays a 0-d tensor (no float(): no host sync): decay * 4 rows + 4 rows
    assert isinstance(st.weight, torch.Tensor) and st.weight.dim() == 0
    assert float(st.weight) == pytest.approx(st.decay * 4 + 4)
    assert st.mean_abs().shape == (k,) and st.mean_abs().dtype == torch.float32
    with pytest.raises(ValueError):
        st.update(torch.randn(2, k + 1))


# ============================================================================ AWQQuantizer
def _toy_layer(seed, d=64, inter=128):
    return {
        "qkv": [_weight(d, d, seed), _weight(64, d, seed + 1), _weight(64, d, seed + 2)],
        "o": [_weight(d, d, seed + 3)],
        "gate_up": [_weight(inter, d, seed + 4), _weight(inter, d, seed + 5)],
        "down": [_weight(d, inter, seed + 6)],
    }


def test_quantizer_cold_start_then_search():
    layers = [_toy_layer(0), _toy_layer(10)]
    awq = AWQQuantizer(min_tokens=200, max_tokens=64, reservoir_size=64, betas=[0.25 * i for i in range(5)])
    choices = awq.search(layers)
    for lc in choices:
        for group, c in lc.items():
            assert c.fallback and c.beta == 0.0 and torch.equal(c.s, torch.ones_like(c.s))
    widths = {"qkv": 64, "o": 64, "gate_up": 64, "down": 128}
    for it in range(5):
        for li in range(2):
            for group, k in widths.items():
                awq.observe(li, group, _acts(100, k, seed=100 * it + li))
    assert awq.stats[(0, "qkv")].tokens_used == 5 * 64
    choices = awq.search(layers)
    assert [sorted(lc) for lc in choices] == [sorted(LINEAR_GROUPS)] * 2
    ratios = []
    for li, lc in enumerate(choices):
        for group, c in lc.items():
            assert not c.fallback and c.tokens == 320
            st = awq.stats[(li, group)]
            w = torch.cat(layers[li][group])
            ref = float((st.sample() @ w.t()).pow(2).sum())  # the output's own energy
            rtn = _rtn_err(awq, li, group, layers[li][group])
            assert c.err <= rtn < ref
            ratios.append(c.err / rtn)
            assert c.s.shape == (widths[group],)
    # outlier channels: AWQ wins clearly somewhere
    assert min(ratios) < 0.8
    assert all(c.candidates == 5 for lc in choices for c in lc.values())
    # the same weights and statistics give the same choice again
    c2 = awq.choose(1, "down", layers[1]["down"], full=True)
    assert c2.beta == choices[1]["down"].beta and torch.equal(c2.s, choices[1]["down"].s)
    with pytest.raises(ValueError):
        awq.observe(0, "lm_head", torch.randn(2, 64))


class _Proj(torch.nn.Linear):
    def __init__(self, k, n, seed):
        super().__init__(k, n, bias=False)
        self.weight.data = _weight(n, k, seed)


class _ToyLlama(torch.nn.Module):
    """The module layout of a transformers Llama (model.model.layers[i].self_attn.q_proj ...)."""

    def __init__(self, d=64, inter=128, n_layers=2):
        super().__init__()
        layers = []
        for i in range(n_layers):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            for j, (name, n) in enumerate((("q_proj", d), ("k_proj", 32), ("v_proj", 32), ("o_proj", d))):
                setattr(layer.self_attn, name, _Proj(d, n, 10 * i + j))
            layer.mlp = torch.nn.Module()
            for j, (name, k, n) in enumerate((("gate_proj", d, inter), ("up_proj", d, inter), ("down_proj", inter, d))):
                setattr(layer.mlp, name, _Proj(k, n, 10 * i + 5 + j))
            layers.append(layer)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(layers)

    def forward(self, h):
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            q, v = a.q_proj(h), a.v_proj(h)
            a.k_proj(h)
            h = h + a.o_proj(q * v.repeat(1, 2))
            h = h + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
        return h


def test_quantizer_warm_start_local_search():
    k = 128
    w = [_weight(96, k)]
    awq = AWQQuantizer(min_tokens=16, full_search_every=3)
    awq.observe(0, "o", _acts(64, k))
    n = []
    for step in range(7):
        w = [w[0] + 1e-4 * _weight(96, k, seed=step)]  # a small "RL update"
        c = awq.choose(0, "o", w)
        n.append(c.candidates)
        assert c.err <= _rtn_err(awq, 0, "o", w)
    full_beta = awq.choose(0, "o", w, full=True)
    assert n[0] == 11 and n[3] == 11 and n[6] == 11  # full grid every 3rd search
    assert all(2 <= m <= 4 for i, m in enumerate(n) if i % 3)  # {0, β-0.1, β, β+0.1}
    assert full_beta.candidates == 11 and abs(full_beta.beta - c.beta) <= 0.1 + 1e-9
    always_full = AWQQuantizer(min_tokens=16, local_step=None)
    always_full.observe(0, "o", _acts(64, k))
    assert [always_full.choose(0, "o", w).candidates for _ in range(2)] == [11, 11]


def _layer_weights(model):
    """``[{group: [W_i ...]}]`` per decoder layer of the toy Llama, in the drafter's groups."""
    return [
        {
            "qkv": [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight],
            "o": [layer.self_attn.o_proj.weight],
            "gate_up": [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight],
            "down": [layer.mlp.down_proj.weight],
        }
        for layer in model.model.layers
    ]


def test_live_stats_feed_every_group():
    model = _ToyLlama()
    view = SimpleNamespace(  # what LiveStats reads of a ModelView: each layer's target modules
        layers=[
            SimpleNamespace(
                linears={
                    "qkv": layer.self_attn.q_proj,
                    "o": layer.self_attn.o_proj,
                    "gate_up": layer.mlp.gate_proj,
                    "down": layer.mlp.down_proj,
                }
            )
            for layer in model.model.layers
        ]
    )
    awq = AWQQuantizer(min_tokens=8)
    live = LiveStats(view, awq, sample_every=2)
    with torch.no_grad():
        model(_acts(24, 64, seed=6))  # outside a window: nothing observed
        assert not awq.stats
        for seed in (7, 8, 9):  # the 1st and 3rd windows are sampled
            with live.window():
                model(_acts(24, 64, seed=seed))
    assert (live.forwards, live.sampled) == (3, 2)
    assert sorted(awq.stats) == sorted((i, g) for i in range(2) for g in LINEAR_GROUPS)
    assert all(st.tokens_seen == 48 for st in awq.stats.values())
    assert live.ready(2) and live.tokens() == 48
    weights = _layer_weights(model)
    assert [w.shape[0] for w in weights[0]["qkv"]] == [64, 32, 32]
    choices = awq.search(weights)
    for li, lc in enumerate(choices):
        for group, c in lc.items():
            assert not c.fallback and c.err <= _rtn_err(awq, li, group, weights[li][group])
    # the reported error is the output error of the fused qkv W4 layer with the chosen s
    c = choices[0]["qkv"]
    x = awq.stats[(0, "qkv")].sample()
    w = torch.cat(weights[0]["qkv"]).detach()
    err = float((x @ w.t() - _w4(w, 64, c.s)(x)).pow(2).sum())
    assert err == pytest.approx(c.err, rel=1e-4)
