"""W4 quantizer (RTN, grouped, asymmetric) and W4Linear kernels, CPU only."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from sglang_er.quant import int4pack, w4linear
from sglang_er.quant import quantizer as qmod
from sglang_er.quant.quantizer import (
    QuantizedTensor,
    choose_group_size,
    pack_awq,
    quantize_rtn,
)
from sglang_er.quant.w4linear import W4Linear, marlin_padded_n, select_kernel

# (name, K=in, N=out) of every linear layer.
SMOLLM2_135M = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]
TINY = [("qkv", 128, 256), ("o", 128, 128), ("gate_up", 128, 768), ("down", 384, 128)]
QWEN2_05B = [("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728), ("down", 4864, 896), ("lm_head", 896, 151936)]
LINEAR_SHAPES = [
    pytest.param(k, n, id=f"{m}-{name}-{k}x{n}")
    for m, shapes in (("smollm2", SMOLLM2_135M), ("tiny", TINY))
    for name, k, n in shapes
]


def _weight(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :: max(1, k // 7)] *= 8  # a few outlier channels, as in real LLM weights
    return w.to(dtype)


def _reference_quant(w: torch.Tensor, g: int):
    """The paper's formula, one group at a time (slow, obviously-correct)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8)
    s = torch.empty(n, k // g)
    z = torch.empty(n, k // g, dtype=torch.uint8)
    for r in range(n):
        for j in range(k // g):
            grp = w[r, j * g : (j + 1) * g].float()
            sc = torch.clamp(grp.max() - grp.min(), min=1e-5) / 15
            zp = torch.clamp(torch.round(-grp.min() / sc), 0, 15)
            q[r, j * g : (j + 1) * g] = torch.clamp(torch.round(grp / sc) + zp, 0, 15).to(torch.uint8)
            s[r, j], z[r, j] = sc, zp
    return q, s, z


# ----------------------------------------------------------------------------- quantizer
def test_rtn_matches_reference_formula():
    w = _weight(6, 256, seed=1)
    w[0, :64] = 0.3  # constant group: range clamps to 1e-5
    w[1, 64:128] = w[1, 64:128].abs() + 0.1  # all-positive group: zero point clamps to 0
    w[2, 128:192] = -w[2, 128:192].abs() - 0.1  # all-negative group: q clamps to 0 at the top
    for g in (32, 64, 128):
        qt = quantize_rtn(w, g)
        q, s, z = _reference_quant(w, g)
        assert qt.q.dtype == torch.uint8 and qt.zeros.dtype == torch.uint8 and qt.scales.dtype == torch.float32
        assert qt.q.shape == (6, 256) and qt.scales.shape == qt.zeros.shape == (6, 256 // g)
        assert torch.equal(qt.q, q) and torch.equal(qt.scales, s) and torch.equal(qt.zeros, z)
        assert int(qt.q.max()) <= 15 and int(qt.zeros.max()) <= 15
        deq = (q.float().view(6, -1, g) - z.float()[..., None]) * s[..., None]
        assert torch.equal(qt.dequantize(), deq.view(6, 256))
        assert torch.equal(W4Linear.from_float(w, group_size=g).dequantize(), deq.view(6, 256))  # what the layer holds


def test_rtn_error_bound_and_dtypes():
    w = _weight(64, 576, seed=2, dtype=torch.bfloat16)
    qt = quantize_rtn(w, 64)
    err = (qt.dequantize() - w.float()).abs().view(64, 9, 64)
    # Zero points stay in [0, 15] for these zero-straddling groups, so RTN is within half a step.
    assert torch.all(err <= qt.scales[..., None] * 0.5 + 1e-6)
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_rtn_blocked_rows_equal_one_shot(monkeypatch):
    w = _weight(300, 256, seed=3)
    whole = quantize_rtn(w, 64)
    monkeypatch.setattr(qmod, "_BLOCK_ELEMS_CPU", 256 * 7)  # 7 rows per block, ragged tail
    blocked = quantize_rtn(w, 64)
    assert torch.equal(whole.q, blocked.q) and torch.equal(whole.scales, blocked.scales)
    assert torch.equal(whole.zeros, blocked.zeros)


def test_rtn_bad_shapes():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rtn(torch.randn(8, 100), 64)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(2, 8, 64), 64)


@pytest.mark.parametrize(
    "k, g",
    [(576, 64), (1536, 128), (896, 128), (4864, 128), (128, 128), (384, 128), (96, 32), (160, 32), (192, 64)],
)
def test_choose_group_size(k, g):
    assert choose_group_size(k) == g
    assert k % g == 0


def test_choose_group_size_all_real_shapes():
    for _, k, _n in SMOLLM2_135M + TINY + QWEN2_05B:
        g = choose_group_size(k)
        assert k % g == 0 and g in (32, 64, 128)
        assert g == 128 or k % 128 != 0  # 128 whenever possible


def test_choose_group_size_errors():
    assert choose_group_size(896, preferred=64) == 64
    assert choose_group_size(896, preferred=32) == 32
    with pytest.raises(ValueError, match="in_features=100"):
        choose_group_size(100)
    with pytest.raises(ValueError, match="not supported"):
        choose_group_size(1024, preferred=256)


# ----------------------------------------------------------------------------- AWQ layout
def _sglang_awq_dequantize_decomposition():
    """SGLang's pure-torch AWQ dequant, lifted from its source so that triton is not imported."""
    spec = importlib.util.find_spec("sglang")
    path = os.path.join(spec.submodule_search_locations[0], "kernels", "ops", "quantization", "awq_triton.py")
    # sglang is pinned (pyproject): its AWQ reference is always there; a move is a failure, not a skip
    assert os.path.exists(path), f"sglang's awq_triton.py not found at {path}: the pinned sglang moved it"
    tree = ast.parse(open(path).read())
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "awq_dequantize_decomposition"]
    assert fn, f"awq_dequantize_decomposition not in {path}: the pinned sglang renamed it"
    ns = {"torch": torch}
    exec(compile(ast.Module(body=fn, type_ignores=[]), path, "exec"), ns)
    return ns["awq_dequantize_decomposition"]


def test_awq_pack_round_trip():
    """SGLang's AWQ decoder reads back exactly the integers and the (fp16) scales that were packed."""
    dequant = _sglang_awq_dequantize_decomposition()
    for n, k, g in [(960, 576, 64), (256, 128, 128), (64, 384, 32)]:
        qt = quantize_rtn(_weight(n, k, seed=4), g)
        qweight, qzeros, scales = pack_awq(qt)
        assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        assert qweight.shape == (k, n // 8) and qzeros.shape == (k // g, n // 8) and scales.shape == (k // g, n)
        ones = torch.ones(k // g, n)
        q_only = pack_awq(QuantizedTensor(qt.q, qt.scales, torch.zeros_like(qt.zeros), g))
        assert torch.equal(dequant(q_only[0], ones, q_only[1]), qt.q.float().t())  # q
        q_minus_z = (qt.q.float().view(n, k // g, g) - qt.zeros.float()[..., None]).view(n, k)
        assert torch.equal(dequant(qweight, ones, qzeros), q_minus_z.t())  # and so z
        half = QuantizedTensor(qt.q, qt.scales.half().float(), qt.zeros, g)
        assert torch.equal(dequant(qweight, scales.float(), qzeros), half.dequantize().t())


def test_awq_nibble_order():
    q = torch.zeros(8, 32, dtype=torch.uint8)
    for col in range(8):
        q[col, 0] = col + 1
    qt = QuantizedTensor(q, torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.uint8), 32)
    word = int(pack_awq(qt)[0][0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * p)) & 0xF for p in range(8)]
    assert nibbles == [c + 1 for c in (0, 2, 4, 6, 1, 3, 5, 7)]


def test_awq_layout_matches_sglang_dequant():
    dequant = _sglang_awq_dequantize_decomposition()
    for n, k, g in [(960, 576, 64), (128, 384, 128)]:
        qt = quantize_rtn(_weight(n, k, seed=5), g)
        qweight, qzeros, scales = pack_awq(qt, scale_dtype=torch.float32)
        assert torch.equal(dequant(qweight, scales, qzeros), qt.dequantize().t())


# ----------------------------------------------------------------------------- W4Linear
def _fake_quant(w, g):
    """Quantize then dequantize ``w``: float32, the weight every kernel is checked against."""
    return quantize_rtn(w, g).dequantize(torch.float32)


def _ref_linear(x, w, g, bias=None):
    """Dequantize-then-matmul reference in float32."""
    return F.linear(x.float(), _fake_quant(w, g), None if bias is None else bias.float())


@pytest.mark.parametrize("k, n", LINEAR_SHAPES)
def test_cpu_int4pack_bf16_vs_reference(k, n):
    w = _weight(n, k, seed=k + n, dtype=torch.bfloat16)
    b = (torch.randn(n, generator=torch.Generator().manual_seed(7)) * 0.1).to(torch.bfloat16)
    m = W4Linear.from_float(w, b)
    assert m.kernel == "cpu_int4pack", m.kernel_reason
    g = m.group_size
    for bs in (1, 5):
        x = torch.randn(bs, k, generator=torch.Generator().manual_seed(bs)).to(torch.bfloat16)
        y = m(x)
        assert y.dtype == torch.bfloat16 and y.shape == (bs, n)
        ref = _ref_linear(x, w, g, b)
        # The kernel holds scale and float zero (8 - z) * s in bf16: the zero's rounding (up to
        # s/64, same sign over a group) gives ~0.5 % relative error, the bf16 output ~0.2 %.
        rel = (y.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, rel
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("k, n", LINEAR_SHAPES)
def test_torch_fp32_exact(k, n):
    w = _weight(n, k, seed=k * n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(8)) * 0.1
    m = W4Linear.from_float(w, b)
    assert m.kernel == "torch" and m.w_dequant is not None
    for bs in (1, 5):
        x = torch.randn(bs, k, generator=torch.Generator().manual_seed(bs))
        assert torch.equal(m(x), _ref_linear(x, w, m.group_size, b))
    uncached = W4Linear.from_float(w, b, cache_dequantized=False)
    assert uncached.w_dequant is None
    assert torch.equal(uncached(x), m(x))


def test_forward_shapes_and_dtype_mismatch():
    k, n = 128, 256
    w = _weight(n, k, seed=9, dtype=torch.bfloat16)
    m = W4Linear.from_float(w)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    y = m(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.reshape(6, n), m(x.reshape(6, k)))
    # An fp32 input to a bf16-built layer is served exactly by the torch path.
    x32 = torch.randn(4, k)
    assert torch.equal(m(x32), _ref_linear(x32, w, m.group_size))
    # Non-contiguous activations (e.g. a slice of a fused projection).
    xs = torch.randn(4, 2 * k, dtype=torch.bfloat16)[:, ::2]
    torch.testing.assert_close(m(xs), m(xs.contiguous()), rtol=0, atol=0)
    assert m(torch.empty(0, k, dtype=torch.bfloat16)).shape == (0, n)


def test_cpu_int4pack_fp32_on_request():
    w = _weight(256, 128, seed=10)
    m = W4Linear.from_float(w, kernel="cpu_int4pack")
    assert m.kernel == "cpu_int4pack" and m.w_dequant is None
    x = torch.randn(3, 128)
    torch.testing.assert_close(m(x), _ref_linear(x, w, m.group_size), rtol=1e-5, atol=1e-5)


def test_kernel_selection_rules():
    cpu = torch.device("cpu")
    assert select_kernel(cpu, torch.bfloat16, 960, 576, 64)[0] == "cpu_int4pack"
    assert select_kernel(cpu, torch.float32, 960, 576, 64)[0] == "torch"
    assert select_kernel(cpu, torch.bfloat16, 100, 576, 64)[0] == "torch"  # N % 16
    if not torch.cuda.is_available():
        assert select_kernel(torch.device("cuda"), torch.bfloat16, 960, 576, 64)[0] == "torch"
    m = W4Linear.from_float(_weight(100, 128).to(torch.bfloat16))
    assert m.kernel == "torch" and "N=100" in m.kernel_reason
    with pytest.raises(ValueError):
        W4Linear.from_float(_weight(100, 128), kernel="cpu_int4pack")
    # Marlin (CUDA): N padded to the kernel's thread tile where only N is off.
    assert marlin_padded_n(960, 576, 64) == 1024
    assert marlin_padded_n(576, 576, 64) == 640
    assert marlin_padded_n(3072, 576, 64) == 3072
    assert marlin_padded_n(576, 1536, 128) == 576
    for _, k, n in QWEN2_05B + TINY:
        assert marlin_padded_n(n, k, choose_group_size(k)) == n
    assert marlin_padded_n(128, 96, 32) is None


# CUDA-only kernel: its rules and inputs are checked here; its output only on a GPU (eval.gpu_check).
def test_cuda_int4pack_rules_and_choice_without_a_gpu(monkeypatch):
    assert [int4pack.cuda_inner_k_tiles(k) for k in (1536, 8960, 96, 64, 48)] == [8, 8, 2, 4, None]
    assert int4pack.cuda_supports(2048, 1536, 128) and not int4pack.cuda_supports(100, 1536, 128)  # N % 8
    # the CUDA op is fed the even column in the high nibble
    assert int4pack.cuda_nibbles(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)).tolist() == [[0x12, 0x34]]
    # the (scale, float zero) pairs both devices read reproduce (q - z) * s as (q - 8) * s + zero
    qt = quantize_rtn(_weight(16, 256, seed=12), 64)
    sz = int4pack.scale_zeros(qt, torch.float32).transpose(0, 1)  # [N, K/g, 2]
    q = qt.q.view(16, 4, 64).float()
    w = ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(16, 256)
    torch.testing.assert_close(w, qt.dequantize(), rtol=0, atol=1e-6)
    # an sm80 GPU without SGLang: torch's kernel, saying why Marlin is not used
    cuda = torch.device("cuda")
    monkeypatch.setattr(w4linear, "_marlin_available", lambda: False)
    monkeypatch.setattr(int4pack, "cuda_device_ok", lambda: True)
    kernel, why = select_kernel(cuda, torch.bfloat16, 2048, 1536, 128)
    assert kernel == "cuda_int4pack" and "Marlin unavailable" in why, why
    assert select_kernel(cuda, torch.float16, 2048, 1536, 128)[0] == "torch"
    assert select_kernel(cuda, torch.bfloat16, 100, 1536, 128)[0] == "torch"
    monkeypatch.setattr(w4linear, "_marlin_available", lambda: True)
    assert select_kernel(cuda, torch.bfloat16, 2048, 1536, 128)[0] == "marlin"
    kernel, why = select_kernel(cuda, torch.bfloat16, 256, 96, 32)  # Marlin refuses K=96
    assert kernel == "cuda_int4pack" and "K=96" in why, why
    with pytest.raises(ValueError):
        W4Linear.from_float(_weight(256, 128, dtype=torch.bfloat16), kernel="cuda_int4pack")  # a CPU weight


def test_broken_kernel_falls_back(monkeypatch):
    def bad_buffers(self, qt):
        good = orig(self, qt)
        good["int4_scale_zeros"] = good["int4_scale_zeros"].flip(1)  # wrong layout
        return good

    orig = W4Linear._kernel_buffers
    monkeypatch.setattr(W4Linear, "_kernel_buffers", bad_buffers)
    w = _weight(256, 128, seed=11, dtype=torch.bfloat16)
    m = W4Linear.from_float(w)
    assert m.kernel == "torch" and "failed" in m.kernel_reason
    assert not any(name.startswith("int4_") for name, _ in m.named_buffers())
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert torch.equal(m(x), F.linear(x, _fake_quant(w, 128).to(torch.bfloat16)))


def _ptrs(m):
    return {name: b.data_ptr() for name, b in m.named_buffers()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_requantize_in_place(dtype):
    k, n = 576, 960
    w0, w1 = _weight(n, k, seed=12, dtype=dtype), _weight(n, k, seed=13, dtype=dtype)
    b = torch.randn(n).to(dtype)
    s = torch.rand(k) + 0.5
    m = W4Linear.from_float(w0, b, input_scale=torch.ones(k))
    before = _ptrs(m)
    assert {"q_u4", "scales", "zeros", "bias", "input_scale"} <= set(before)
    m.requantize_(w1, input_scale=s)
    assert _ptrs(m) == before
    fresh = W4Linear.from_float(w1, b, input_scale=s)
    for name, buf in fresh.named_buffers():
        assert torch.equal(buf, getattr(m, name)), name
    x = torch.randn(5, k).to(dtype)
    assert torch.equal(m(x), fresh(x))
    m.requantize_(w0)  # drops the scale back to ones, still in place
    assert _ptrs(m) == before and torch.equal(m.input_scale, torch.ones(k))
    plain = W4Linear.from_float(w0, b)
    with pytest.raises(ValueError, match="without input_scale"):
        plain.requantize_(w1, input_scale=s)


def test_input_scale_path():
    k, n = 576, 576
    w = _weight(n, k, seed=14)
    b = torch.randn(n) * 0.1
    s = torch.rand(k, generator=torch.Generator().manual_seed(15)) * 2 + 0.25
    x = torch.randn(5, k)
    m = W4Linear.from_float(w, b, input_scale=s)
    g = m.group_size
    ref = F.linear(x / s, _fake_quant(w * s[None, :], g), b)
    assert torch.equal(m(x), ref)
    assert torch.equal(m.dequantize(), _fake_quant(w * s[None, :], g))
    mb = W4Linear.from_float(w.to(torch.bfloat16), b.to(torch.bfloat16), input_scale=s)
    assert mb.kernel == "cpu_int4pack"
    xb = x.to(torch.bfloat16)
    refb = F.linear(
        (xb / s).to(torch.bfloat16).float(),
        _fake_quant(w.to(torch.bfloat16).float() * s[None, :], g),
        b.to(torch.bfloat16).float(),
    )
    assert (mb(xb).float() - refb).norm() / refb.norm() < 1e-2
    # A quantized tensor from elsewhere loads into an existing layer, input scale and all.
    qt = quantize_rtn(w * s[None, :], g)
    mq = W4Linear.from_float(torch.zeros_like(w), b, input_scale=torch.ones(k))
    mq.load_quantized_(qt, input_scale=s)
    assert torch.equal(mq(x), ref)


# ---------------------------------------------------------------------- W8 head, AWQ scaling
def test_w8_head_matches_reference_and_requantizes_in_place():
    from sglang_er.quant.w8linear import W8Linear, quantize_int8_rows

    torch.manual_seed(0)
    w = torch.randn(1000, 256, dtype=torch.bfloat16)
    q, s = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and (q.float() * s[:, None] - w.float()).abs().max() <= s.max() / 2 + 1e-6
    lin = W8Linear(w)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = x.float() @ lin.dequantize().t()
    y = lin(x)
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()) < 1e-2
    ptr = lin.q.data_ptr()
    lin.requantize_(w * 2)
    assert lin.q.data_ptr() == ptr and torch.allclose(lin(x).float(), 2 * y.float(), rtol=2e-2, atol=1e-1)


def test_rtn_col_scale_equals_quantizing_the_scaled_weight():
    from sglang_er.quant.quantizer import quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(300, 256, dtype=torch.bfloat16)
    s = torch.rand(256) + 0.5
    a = quantize_rtn(w, 128, col_scale=s)
    b = quantize_rtn(w.float() * s[None, :], 128)
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_awq_search_on_a_row_subset_picks_the_same_scaling():
    from sglang_er.quant.awq import AWQQuantizer

    torch.manual_seed(0)
    w = torch.randn(4096, 256)
    full, sub = AWQQuantizer(min_tokens=8, max_rows=None), AWQQuantizer(min_tokens=8, max_rows=256)
    x = torch.randn(256, 256)
    x[:, :4] *= 40  # outlier channels
    for qz in (full, sub):
        qz.observe(0, "qkv", x)
    a, b = full.choose(0, "qkv", w), sub.choose(0, "qkv", w)
    assert a.beta > 0 and abs(a.beta - b.beta) <= 0.1
