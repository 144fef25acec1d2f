"""The torch stand-ins for Triton helpers equal a plain-torch reference or SGLang's original."""

import inspect
import pkgutil

import pytest
import torch

from sglang_er.engine import hooks
from sglang_er.engine.cpu import ops as cpu_ops
from sglang_er.engine.cpu.ops import assign_req_to_token_pool


def _reference(req_pool_indices, req_to_token, start, end, out_cache_loc):
    ofs = 0
    for r, s, e in zip(req_pool_indices.tolist(), start.tolist(), end.tolist()):
        req_to_token[r, s:e] = out_cache_loc[ofs : ofs + e - s]
        ofs += e - s


def test_assign_req_to_token_pool_matches_reference():
    g = torch.Generator().manual_seed(0)
    for bs in (1, 3, 8):
        req_to_token = torch.zeros(10, 64, dtype=torch.int32)
        expected = req_to_token.clone()
        idx = torch.randperm(10, generator=g)[:bs].to(torch.int64)
        start = torch.randint(0, 30, (bs,), generator=g)
        end = start + torch.randint(0, 20, (bs,), generator=g)  # zero-length requests included
        total = int((end - start).sum())
        out = torch.randint(1, 1000, (total + 5,), generator=g).to(torch.int64)  # padded tail ignored
        _reference(idx, expected, start, end, out)
        assign_req_to_token_pool(idx, req_to_token, start, end, out, bs)
        assert torch.equal(req_to_token, expected)


# --- TorchNativeAttnBackend._run_sdpa_forward_extend --------------------------------------


def _extend_inputs(prefixes, extends, heads, kv_heads, head_dim, dtype, seed):
    """Random KV pool, a shuffled req_to_token (pool rows out of order) and packed queries."""
    g = torch.Generator().manual_seed(seed)
    bs = len(prefixes)
    seq = [p + e for p, e in zip(prefixes, extends)]
    slots = sum(seq) + 16
    k_cache = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    req_to_token = torch.randint(0, slots, (bs + 3, max(seq) + 32), generator=g).to(torch.int32)
    pool = torch.randperm(bs + 3, generator=g)[:bs].to(torch.int64)
    free = torch.randperm(slots - 1, generator=g) + 1
    ofs = 0
    for b, n in enumerate(seq):
        req_to_token[pool[b], :n] = free[ofs : ofs + n].to(torch.int32)
        ofs += n
    query = torch.randn(sum(extends), heads, head_dim, generator=g).to(dtype)
    return (
        query,
        k_cache,
        v_cache,
        req_to_token,
        pool,
        torch.tensor(seq),
        torch.tensor(prefixes),
        torch.tensor(extends),
    )


def _run_both(
    prefixes, extends, *, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, causal=True, window=None, seed=0
):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)  # the method reads no state
    query, k_cache, v_cache, r2t, pool, seq, pre, ext = _extend_inputs(
        prefixes, extends, heads, kv_heads, head_dim, dtype, seed
    )
    kw = dict(scaling=head_dim**-0.5, enable_gqa=heads != kv_heads, causal=causal, sliding_window_size=window)
    outs = []
    for fn in (cpu_ops.sglang_sdpa_forward_extend(), cpu_ops.sdpa_forward_extend):
        out = torch.full(query.shape, float("nan"), dtype=dtype)
        ret = fn(backend, query, out, k_cache, v_cache, r2t, pool, seq, pre, ext, None, **kw)
        assert ret is out
        outs.append(out)
    return outs


CASES = {
    "prefill": ([0], [9]),
    "prefix_extend": ([13], [5]),
    "verify_width": ([40], [4]),
    "decode_like": ([21], [1]),
    "mixed_batch": ([0, 7, 30, 2], [6, 3, 1, 12]),
    "verify_batch": ([37, 40, 35], [4, 4, 4]),
    "verify_batch_wide": ([3, 90, 41, 0, 17, 64, 8, 29, 55], [8] * 9),
    "empty_request": ([5, 0, 8], [3, 0, 2]),
}


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@pytest.mark.parametrize("case", list(CASES))
def test_extend_attention_matches_sglang(case, window):
    ref, new = _run_both(*CASES[case], window=window)
    assert not new.isnan().any()
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-5)


def test_widest_verify_runs_batched(monkeypatch):
    """A verify at sglang_er.config.MAX_GAMMA (γ + 1 tokens per request) takes the batched path."""
    from sglang_er.config import MAX_GAMMA

    calls = []
    batched = cpu_ops._batched_short_extend
    monkeypatch.setattr(cpu_ops, "_batched_short_extend", lambda *a: calls.append(a[8]) or batched(*a))
    ref, new = _run_both([20, 64, 33], [MAX_GAMMA + 1] * 3)
    assert calls == [MAX_GAMMA + 1]
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_extend_attention_heads_and_bf16(heads, kv_heads):
    ref, new = _run_both([0, 11, 3], [7, 4, 4], heads=heads, kv_heads=kv_heads, seed=1)
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-5)
    ref, new = _run_both([0, 11, 3], [7, 4, 4], heads=heads, kv_heads=kv_heads, dtype=torch.bfloat16, seed=2)
    torch.testing.assert_close(new.float(), ref.float(), rtol=0, atol=2e-2)


def test_extend_attention_noncausal_is_sglangs():
    # Encoder-only layers (causal=False) go to SGLang's own code: identical output.
    ref, new = _run_both([0, 6], [5, 3], causal=False)
    assert torch.equal(new, ref)


def _call_shape(fn) -> list:
    """What a caller relies on: parameter names, kinds and defaults (annotations are spelled as
    each file's author wrote them: ``Optional[int]`` in SGLang, ``int | None`` here)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_extend_attention_target_resolves_with_same_signature():
    # HookRegistry only logs a target it cannot resolve; make a stale path fail here.
    obj_path, attr = hooks.target_of("sglang_er.engine.cpu.ops:sdpa_forward_extend").rsplit(".", 1)
    cls = pkgutil.resolve_name(obj_path)
    original = inspect.unwrap(cls.__dict__[attr])
    assert original is cpu_ops.sglang_sdpa_forward_extend()
    assert _call_shape(cpu_ops.sdpa_forward_extend) == _call_shape(original)
    # apply_hooks rebinds any module global that is the original to the wrapper; the fallback
    # must not be reachable that way (it would recurse into the replacement).
    assert all(value is not original for value in vars(cpu_ops).values())


def test_device_as_str():
    from sglang_er.engine.cpu.ops import device_as_str

    assert device_as_str(lambda: torch.device("cpu")) == "cpu"
    assert device_as_str(lambda i=None: "cuda:1", 1) == "cuda:1"


# --- TorchNativeAttnBackend._run_sdpa_forward_decode --------------------------------------


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@pytest.mark.parametrize("heads,kv_heads,dtype", [(4, 4, torch.float32), (6, 2, torch.float32), (8, 2, torch.bfloat16)])
def test_decode_attention_matches_sglang(heads, kv_heads, dtype, window):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)
    prefixes = [0, 7, 30, 2, 64, 11]  # decode: each request's one query at position seq_len - 1
    query, k_cache, v_cache, r2t, pool, seq, _, _ = _extend_inputs(
        prefixes, [1] * len(prefixes), heads, kv_heads, 16, dtype, seed=3
    )
    kw = dict(scaling=16**-0.5, enable_gqa=heads != kv_heads, causal=False, sliding_window_size=window)
    outs = []
    for fn in (cpu_ops.sglang_sdpa_forward_decode(), cpu_ops.sdpa_forward_decode):
        out = torch.full(query.shape, float("nan"), dtype=dtype)
        assert fn(backend, query, out, k_cache, v_cache, r2t, pool, seq, None, **kw) is out
        outs.append(out.float())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_decode_attention_target_resolves_with_same_signature():
    import inspect

    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    original = inspect.unwrap(TorchNativeAttnBackend.__dict__["_run_sdpa_forward_decode"])
    assert original is cpu_ops.sglang_sdpa_forward_decode()
    assert _call_shape(cpu_ops.sdpa_forward_decode) == _call_shape(original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_rows_gather_equals_indexing(dtype):
    from sglang_er.draft import kv_rows

    g = torch.Generator().manual_seed(0)
    buf = torch.randn(50, 4, 8, generator=g).to(dtype)
    idx = torch.randint(0, 50, (37,), generator=g)
    assert torch.equal(kv_rows.gather(buf, idx), buf[idx])
    assert torch.equal(kv_rows.gather(buf, idx.to(torch.int32)), buf[idx])
    strided = buf.transpose(1, 2)  # not contiguous: the row-block view does not apply
    assert torch.equal(kv_rows.gather(strided, idx), strided[idx])
