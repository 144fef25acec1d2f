"""The torch stand-ins for Triton helpers equal a plain-torch reference."""

import torch

from sglang_er.cpu_ops import assign_req_to_token_pool


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
