"""The chain verify input meets SGLang's TARGET_VERIFY contract, checked through the backends' own code.

For a small batch on CPU tensors, the verify batch is prepared as the worker prepares it for a
GPU backend (:func:`sglang_er.engine.forwards.as_target_verify`), and each backend's metadata
code turns it into what its kernel reads; the check is then semantic: query j of request b
must see exactly the KV slots of positions 0 .. prefix_b + j, sit at position prefix_b + j, and
write its K/V where ``req_to_token`` says position prefix_b + j lives.

- triton: ``TritonAttnBackend.init_forward_metadata`` runs as is (its TARGET_VERIFY branch is
  pure torch) on a backend object holding only the buffers that branch reads.
- flashinfer: ``FlashInferIndicesUpdaterPrefill.update_single_wrapper`` runs as is, and with it
  ``generate_attn_arg_prefill``; the paged wrapper's ``begin_forward`` (a CUDA plan) is recorded
  instead of run.
- fa3: ``flashattention_backend`` does not import without CUDA ``sgl_kernel`` (``common_ops``), so
  its TARGET_VERIFY metadata is rebuilt from the lines it runs (flashattention_backend.py
  1036-1078): SGLang's own ``build_ragged_target_verify_geometry`` when the input carries a
  ragged layout, else the static-width formula it uses without one.

KV-index gathers are Triton kernels in SGLang; :class:`_TorchTranslator` does the same gather in
torch (out[indptr[i] + k] = req_to_token[row_i, k] for k < len_i) with the lengths the backend passes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_er.engine import forwards
from sglang_er.engine.verify_input import ChainVerifyInput, chain_mask

PREFIX = [5, 1, 9]  # committed tokens with KV per request
STATIC_WIDTH = 5  # γmax + 1


class _TorchTranslator:
    """``KVIndexTranslator.pack_read_stream`` for an untranslated pool, in torch."""

    def __init__(self, req_to_token: torch.Tensor):
        self.req_to_token = req_to_token
        self.reads_are_translated = False

    def pack_read_stream(self, plan, *, req_pool_indices, seq_lens, indptr, out, kv_start_idx=None, **_):
        for i, n in enumerate(seq_lens.tolist()):
            start = 0 if kv_start_idx is None else int(kv_start_idx[i])
            row = self.req_to_token[int(req_pool_indices[i]), start : start + n]
            out[int(indptr[i]) : int(indptr[i]) + n] = row.to(out.dtype)
        return False


def _verify_batch(width: int, with_mask: bool, prepare=forwards.as_target_verify):
    """A decode batch as the scheduler hands it over, prepared for a width-token verify."""
    g = torch.Generator().manual_seed(width)
    bs = len(PREFIX)
    req_to_token = torch.zeros(bs + 2, 32, dtype=torch.int32)
    rows = torch.randperm(bs + 2, generator=g)[:bs]
    free = torch.randperm(200, generator=g) + 1
    ofs = 0
    for r, p in zip(rows.tolist(), PREFIX):  # the scheduler pre-allocated the verify's slots too
        req_to_token[r, : p + width] = free[ofs : ofs + p + width].to(torch.int32)
        ofs += p + width
    prefix = torch.tensor(PREFIX, dtype=torch.int64)
    batch = SimpleNamespace(
        req_pool_indices=rows,
        seq_lens=prefix.clone(),
        seq_lens_cpu=prefix.clone(),
        seq_lens_sum=sum(PREFIX),
    )
    ids = torch.randint(0, 50, (bs * width,), generator=g)
    prepare(batch, ids, prefix, width, STATIC_WIDTH, with_mask)
    cols = prefix[:, None] + torch.arange(width)
    batch.out_cache_loc = req_to_token[rows[:, None], cols].to(torch.int64).flatten()  # batch_view.slots
    batch.batch_size = bs
    batch.kv_loc_plan = None
    batch.encoder_lens = None
    batch.positions = batch.spec_info.positions  # ForwardBatch.init_new takes spec_info.positions
    return batch, req_to_token


def _expected(batch, req_to_token, width):
    """Per (request, query j): the KV slots of positions 0 .. prefix + j."""
    return [
        [req_to_token[int(r), : p + j + 1].tolist() for j in range(width)]
        for r, p in zip(batch.req_pool_indices, PREFIX)
    ]


def _masked(keys: list, mask_row: torch.Tensor | None, causal_visible: int) -> list:
    if mask_row is None:
        return keys[:causal_visible]
    return [k for k, m in zip(keys, mask_row.tolist()) if m]


def _mask_rows(custom_mask, mask_indptr_b: int, b: int, j: int, kv_len: int):
    if custom_mask is None:
        return None
    start = mask_indptr_b + j * kv_len
    return custom_mask[start : start + kv_len]


def triton_view(batch, req_to_token, width):
    """What TritonAttnBackend's TARGET_VERIFY extend kernel attends: prefix rows from kv_indices
    (all visible), then the verify tokens' own K/V (out_cache_loc) causally or by the mask."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    assert batch.forward_mode == ForwardMode.TARGET_VERIFY
    be = object.__new__(TritonAttnBackend)
    be.__dict__.update(
        dllm_attention=None,
        window_kv_indptr=None,
        sliding_window_size=None,
        device=torch.device("cpu"),
        max_context_len=req_to_token.shape[1],
        mask_indptr=torch.zeros(16, dtype=torch.int64),
        kv_indptr=torch.zeros(16, dtype=torch.int32),
        kv_index_translator=_TorchTranslator(req_to_token),
        target_verify_num_tokens_per_req=STATIC_WIDTH,
        use_sliding_window_kv_pool=False,
        dcp_size=1,
    )
    be.init_forward_metadata(batch)
    md = be.forward_metadata
    assert md.max_extend_len == width
    out, bs = [], len(PREFIX)
    for b in range(bs):
        q0, q1 = int(md.qo_indptr[b]), int(md.qo_indptr[b + 1])
        assert q1 - q0 == width
        prefix_keys = md.kv_indices[int(md.kv_indptr[b]) : int(md.kv_indptr[b + 1])].tolist()
        keys = prefix_keys + batch.out_cache_loc[q0:q1].tolist()
        rows = []
        for j in range(width):
            mask_row = _mask_rows(md.custom_mask, int(md.mask_indptr[b]), b, j, len(keys))
            rows.append(_masked(keys, mask_row, len(prefix_keys) + j + 1))
        out.append(rows)
    return out


def flashinfer_view(batch, req_to_token, width):
    """What FlashInfer's paged prefill wrapper attends in TARGET_VERIFY: kv_indices rows from
    ``generate_attn_arg_prefill``, bottom-right causal (``causal=True``) or the custom mask."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferIndicesUpdaterPrefill

    planned = {}

    class Wrapper:
        is_cuda_graph_enabled = False
        _custom_mask_buf = None

        def begin_forward(self, qo_indptr, kv_indptr, kv_indices, last_page_len, *a, custom_mask=None, **kw):
            planned.update(qo=qo_indptr.clone(), kv=kv_indptr.clone(), idx=kv_indices.clone(), mask=custom_mask)

    bs = len(PREFIX)
    up = object.__new__(FlashInferIndicesUpdaterPrefill)
    up.__dict__.update(
        attn_backend=SimpleNamespace(kv_index_translator=_TorchTranslator(req_to_token), dq_paged_kernel_lens=None),
        kv_indptr=[torch.zeros(bs + 1, dtype=torch.int32)],
        qo_indptr=[torch.zeros(bs + 1, dtype=torch.int32)],
        kv_last_page_len=torch.ones(bs, dtype=torch.int32),
        prefill_wrapper_ragged=None,
        _swa_kv_pool=None,
        num_qo_heads=2,
        num_kv_heads=1,
        head_dim=8,
        q_data_type=torch.float32,
        data_type=torch.float32,
    )
    # flashinfer_backend.py:1025-1036, the TARGET_VERIFY branch of init_forward_metadata
    up.update_single_wrapper(
        batch.req_pool_indices,
        batch.seq_lens,
        batch.seq_lens_cpu,
        batch.seq_lens_sum,
        prefix_lens=None,
        prefill_wrappers=[Wrapper()],
        use_ragged=False,
        encoder_lens=None,
        spec_info=batch.spec_info,
        plan=None,
    )
    out, mask_ofs = [], 0
    for b in range(bs):
        qo_len = int(planned["qo"][b + 1] - planned["qo"][b])
        assert qo_len == width
        keys = planned["idx"][int(planned["kv"][b]) : int(planned["kv"][b + 1])].tolist()
        rows = []
        for j in range(width):
            m = planned["mask"]
            mask_row = None if m is None else m[mask_ofs + j * len(keys) : mask_ofs + (j + 1) * len(keys)]
            rows.append(_masked(keys, mask_row, len(keys) - qo_len + j + 1))
        mask_ofs += qo_len * len(keys)
        out.append(rows)
    return out


def fa3_view(batch, req_to_token, width):
    """FA3's TARGET_VERIFY (topk ≤ 1): page_table[b, :cache_seqlens[b]], bottom-right causal."""
    from sglang.srt.speculative.ragged_verify import build_ragged_target_verify_geometry

    spec = batch.spec_info
    if spec.ragged_verify_layout is not None:
        geo = build_ragged_target_verify_geometry(seq_lens=batch.seq_lens, layout=spec.ragged_verify_layout)
        cache_seqlens, cu_q = geo.cache_seqlens_int32, geo.cu_seqlens_q
    else:  # the static-width formula: right only when the verify is that wide
        cache_seqlens = (batch.seq_lens + STATIC_WIDTH).to(torch.int32)
        cu_q = torch.arange(0, len(PREFIX) * STATIC_WIDTH + 1, STATIC_WIDTH, dtype=torch.int32)
    page_table = req_to_token[batch.req_pool_indices, : int(cache_seqlens.max())]
    out = []
    for b in range(len(PREFIX)):
        qo_len = int(cu_q[b + 1] - cu_q[b])
        assert qo_len == width
        keys = page_table[b, : int(cache_seqlens[b])].tolist()
        out.append([keys[: len(keys) - qo_len + j + 1] for j in range(width)])
    return out


VIEWS = {"triton": triton_view, "flashinfer": flashinfer_view, "fa3": fa3_view}


def check_backends(width: int, with_mask: bool, prepare=forwards.as_target_verify, views=VIEWS) -> None:
    batch, req_to_token = _verify_batch(width, with_mask, prepare)
    spec = batch.spec_info
    prefix = torch.tensor(PREFIX)
    # the fields ForwardBatch.init_new, the logits processor and the backends read
    assert spec.is_verify_input() and spec.draft_token_num == width
    assert spec.num_tokens_per_req == spec.num_tokens_for_logprob_per_req == width
    assert spec.tree_topk == 1 and spec.draft_token.shape == (len(PREFIX) * width,)
    assert spec.positions.dtype == torch.int64
    assert torch.equal(spec.positions, (prefix[:, None] + torch.arange(width)).flatten())
    written = batch.out_cache_loc.view(len(PREFIX), width)
    for b, (r, p) in enumerate(zip(batch.req_pool_indices.tolist(), PREFIX)):
        assert written[b].tolist() == req_to_token[r, p : p + width].tolist()  # K/V lands at its position
    expected = _expected(batch, req_to_token, width)
    for name in views:
        assert VIEWS[name](batch, req_to_token, width) == expected, name


@pytest.mark.parametrize("width", [1, 3, STATIC_WIDTH])
@pytest.mark.parametrize("with_mask", [False, True])
def test_backends_see_the_causal_prefix(width, with_mask):
    check_backends(width, with_mask)


@pytest.mark.parametrize("backend", list(VIEWS))
def test_wrong_seq_lens_convention_is_caught(backend):
    """seq_lens = prefix + width (the EXTEND convention) makes each GPU backend read the draft
    slots as prefix, or past them."""

    def extend_convention(batch, ids, prefix, width, static_width, with_mask):
        forwards.as_target_verify(batch, ids, prefix, width, static_width, with_mask)
        batch.seq_lens = batch.seq_lens + width
        batch.seq_lens_cpu = batch.seq_lens_cpu + width
        batch.seq_lens_sum += width * len(PREFIX)

    for width in (3, STATIC_WIDTH):
        check_backends(width, False, views=[backend])
        with pytest.raises(AssertionError, match=backend):
            check_backends(width, False, extend_convention, views=[backend])


def test_a_static_width_fa3_verify_is_caught_below_full_width():
    """Without the ragged layout FA3 sizes a verify by speculative_num_draft_tokens: wrong for γ < γmax."""

    def no_layout(batch, ids, prefix, width, static_width, with_mask):
        forwards.as_target_verify(batch, ids, prefix, width, static_width, with_mask)
        batch.spec_info.ragged_verify_layout = None

    check_backends(STATIC_WIDTH, False, no_layout, views=["fa3"])  # full width needs none
    with pytest.raises(AssertionError):
        check_backends(3, False, no_layout, views=["fa3"])


def test_chain_mask_is_causal_over_prefix_and_chain():
    prefix = torch.tensor([2, 0, 3])
    mask = chain_mask(prefix, 3)
    ofs = 0
    for p in prefix.tolist():
        rows = mask[ofs : ofs + 3 * (p + 3)].view(3, p + 3)
        want = torch.cat([torch.ones(3, p, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool).tril()], 1)
        assert torch.equal(rows, want)
        ofs += 3 * (p + 3)
    assert ofs == mask.numel()


class _Backend:
    pass


@pytest.mark.parametrize(
    "name, route, mask",
    [
        ("TorchNativeAttnBackend", "extend", None),
        ("TritonAttnBackend", "target_verify", False),
        ("FlashInferAttnBackend", "target_verify", False),
        ("FlashAttentionBackend", "target_verify", False),
        ("IntelAMXAttnBackend", "target_verify", True),
    ],
)
def test_verify_route_by_backend(name, route, mask):
    runner = SimpleNamespace(attn_backend=type(name, (_Backend,), {})())
    backend, needs_mask = forwards.verify_attention_backend(runner)
    assert backend == name
    assert ("extend" if backend in forwards.EXTEND_VERIFY_BACKENDS else "target_verify") == route
    if mask is not None:
        assert needs_mask == mask


def test_ragged_layout_only_below_full_width():
    """At γmax + 1 the static-width paths apply and FA3 avoids the ragged path's host sync."""
    v = ChainVerifyInput.build(torch.arange(10), torch.tensor([4, 7]), STATIC_WIDTH, STATIC_WIDTH)
    assert v.ragged_verify_layout is None and v.custom_mask is None
    v = ChainVerifyInput.build(torch.arange(6), torch.tensor([4, 7]), 3, STATIC_WIDTH)
    layout = v.ragged_verify_layout
    assert layout.verify_lens_cpu == [3, 3] and layout.qo_indptr_device.tolist() == [0, 3, 6]
