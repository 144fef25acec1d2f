"""sglang_er.sampler: SGLang-exact target distribution + lossless verification.

Importing ``sglang.srt.layers.sampler`` costs ~15 s of SGLang start-up on CPU,
so SGLang's own code is loaded straight from the installed source file with
``ast`` (the very same function objects' source, executed against torch).
"""

import ast
import importlib.metadata
import math
import typing
from types import SimpleNamespace

import pytest
import torch

from sglang_er import sampler as S
from sglang_er.sampler import SamplingParamsTensor as P

# ----------------------------------------------------------------------------
# SGLang source access without importing the SGLang runtime
# ----------------------------------------------------------------------------


def _sglang_file(rel):
    path = importlib.metadata.distribution("sglang").locate_file(f"sglang/{rel}")
    return path.read_text()


def _sglang_def(rel, name):
    """Source of top-level def/assignment ``name`` in sglang/<rel>."""
    text = _sglang_file(rel)
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(text, node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.get_source_segment(text, node)
    raise LookupError(f"{name} not in sglang/{rel}")


@pytest.fixture(scope="module")
def sgl_torch_sampling():
    """SGLang's ``top_k_top_p_min_p_sampling_from_probs_torch``."""
    src = _sglang_def("srt/layers/sampler.py", "top_k_top_p_min_p_sampling_from_probs_torch")
    ns = {"torch": torch, "Optional": typing.Optional}
    exec(compile(src, "sglang/srt/layers/sampler.py", "exec"), ns)
    return ns["top_k_top_p_min_p_sampling_from_probs_torch"]


def test_constants_match_sglang():
    ns = {}
    exec(_sglang_def("srt/sampling/sampling_params.py", "TOP_K_ALL"), ns)
    exec(_sglang_def("srt/sampling/sampling_params.py", "_SAMPLING_EPS"), ns)
    assert S.TOP_K_ALL == ns["TOP_K_ALL"]
    assert S.SAMPLING_EPS == ns["_SAMPLING_EPS"]


def test_sglang_sampler_pipeline_order_unchanged():
    """Tripwire: target_probs assumes Sampler.forward scales by temperature,
    then softmaxes, then filters. Fail loudly if an SGLang upgrade moves it."""
    src = _sglang_def("srt/layers/sampler.py", "Sampler")
    i_greedy = src.index("batch_next_token_ids = torch.argmax(logits, -1)")
    i_div = src.index("logits.div_(sampling_info.temperatures)")
    i_soft = src.index("sampler_softmax(logits)")
    i_filter = src.index("top_k_top_p_min_p_sampling_from_probs_torch(")
    assert i_greedy < i_div < i_soft < i_filter
    norm = _sglang_file("srt/sampling/sampling_params.py")
    assert "self.temperature = 1.0\n            self.top_k = 1" in norm


# ----------------------------------------------------------------------------
# target_probs == SGLang's distribution
# ----------------------------------------------------------------------------

# (temperature, top_p, top_k, min_p) as a user would send them.
COMBOS = [
    (1.0, 1.0, -1, 0.0),
    (0.7, 1.0, -1, 0.0),
    (1.3, 1.0, -1, 0.0),
    (1.0, 0.9, -1, 0.0),
    (0.7, 1.0, 3, 0.0),
    (1.3, 1.0, -1, 0.1),
    (0.8, 0.9, 5, 0.05),
    (1.0, 0.5, 3, 0.3),
    (0.0, 1.0, -1, 0.0),  # greedy
    (0.9, 1.0, 1, 0.0),  # top_k=1 is greedy too
]


def _sglang_reference(fn, logits, params):
    """Replicates Sampler.forward's standard path, calling SGLang's filter
    with return_filtered_probs=True to read back its exact kept weights."""
    x = logits.clone().float()
    if params.is_all_greedy:
        return S._one_hot(torch.argmax(x, -1), x.shape[-1])
    x.div_(params.temperature.view(-1, 1))
    probs = torch.softmax(x, dim=-1)
    if not (params.need_top_k_sampling or params.need_top_p_sampling or params.need_min_p_sampling):
        return probs
    _, w, idx, _ = fn(
        probs,
        params.top_k.to(torch.int32),
        params.top_p,
        params.min_p,
        params.need_min_p_sampling,
        None,
        None,
        return_filtered_probs=True,
    )
    w = w / w.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, idx.long(), w)


def test_target_probs_matches_sglang_filter_exactly(sgl_torch_sampling):
    g = torch.Generator().manual_seed(0)
    V = 12
    logits = torch.randn(len(COMBOS), V, generator=g) * 2.0
    cols = list(zip(*COMBOS))
    mixed = P.from_lists(*cols)
    # One combo per batch (own flags) and all combos in one mixed batch.
    for params, lg in [(P.from_lists(*map(list, zip(c))), logits[i : i + 1]) for i, c in enumerate(COMBOS)] + [
        (mixed, logits)
    ]:
        ours = S.target_probs(lg, params)
        ref = _sglang_reference(sgl_torch_sampling, lg, params)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        assert torch.allclose(ours.sum(-1), torch.ones(len(params)), atol=1e-5)
    # Spot-check the semantics, not just agreement.
    p = S.target_probs(logits, mixed)
    assert (p[4] > 0).sum() == 3  # top_k 3
    for row in (8, 9):  # greedy rows -> one-hot at argmax
        assert p[row].max() == 1.0 and p[row].argmax() == logits[row].argmax()


def test_target_probs_monte_carlo_against_sglang_sampler(sgl_torch_sampling):
    """Draw with SGLang's own function (its multinomial) and compare the
    empirical distribution with target_probs."""
    torch.manual_seed(1)
    V, N = 12, 40_000
    logits = torch.randn(1, V) * 1.5
    for combo in COMBOS:
        params = P.from_lists(*map(list, zip(combo)))
        expect = S.target_probs(logits, params)[0]
        if params.is_all_greedy:
            continue  # covered analytically; SGLang uses argmax there
        x = (logits / params.temperature.view(-1, 1)).expand(N, V)
        probs = torch.softmax(x, -1).contiguous()
        ids = sgl_torch_sampling(
            probs,
            params.top_k.to(torch.int32).expand(N),
            params.top_p.expand(N),
            params.min_p.expand(N),
            params.need_min_p_sampling,
            None,
            None,
        )
        freq = torch.bincount(ids.long(), minlength=V).double() / N
        assert freq[expect == 0].sum() == 0, combo
        tv = 0.5 * (freq - expect.double()).abs().sum().item()
        assert tv < 0.02, (combo, tv)


def test_target_probs_3d_and_topk_shortcut():
    g = torch.Generator().manual_seed(2)
    B, T, V = 4, 4, 50
    logits = torch.randn(B, T, V, generator=g)
    params = P.from_lists([0.7, 1.2, 0.0, 1.0], [0.9, 1.0, 1.0, 1.0], [7, 20, -1, -1], [0.0, 0.1, 0.0, 0.0])
    assert params.max_top_k is None  # one row has top_k = all
    out = S.target_probs(logits, params)
    assert out.shape == (B, T, V)
    for t in range(T):
        torch.testing.assert_close(out[:, t], S.target_probs(logits[:, t], params))
    # All-finite top_k -> SGLang's torch.topk shortcut; same distribution.
    p2 = P.from_lists([0.7, 1.2], top_k=[7, 3])
    assert p2.max_top_k == 7
    import dataclasses

    full = S.target_probs(logits[:2], dataclasses.replace(p2, max_top_k=None))
    torch.testing.assert_close(S.target_probs(logits[:2], p2), full)


def test_from_sampling_info_reads_sglang_fields():
    info = SimpleNamespace(
        temperatures=torch.tensor([[0.7], [1.0]]),
        top_ps=torch.tensor([0.9, 1.0]),
        top_ks=torch.tensor([5, 1], dtype=torch.int32),
        min_ps=torch.tensor([0.0, 0.0]),
        is_all_greedy=False,
        need_top_p_sampling=True,
        need_top_k_sampling=True,
        need_min_p_sampling=False,
        sampling_seed=None,
        sampling_mask_batch_indices=None,
        max_top_k=5,
    )
    p = P.from_sampling_info(info, backend="pytorch")
    ref = P.from_lists([0.7, 0.0], [0.9, 1.0], [5, -1], [0.0, 0.0])
    assert p.temperature.shape == (2,) and p.top_k.dtype == torch.int64
    assert p.is_greedy.tolist() == [False, True]
    assert p.max_top_k == 5 and p.backend == "pytorch"
    assert torch.equal(p.temperature, ref.temperature) and torch.equal(p.top_k, ref.top_k)
    info.sampling_seed = torch.tensor([1, 2])
    assert P.from_sampling_info(info, backend="pytorch").max_top_k is None


def test_flashinfer_min_p_path_is_sequential_renorm():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log()
    # top_k 2 renorm -> [4/7, 3/7]; top_p 0.5: exclusive cumsum 4/7 > 0.5 drops
    # token 1 (the joint pytorch path keeps it: 0.4 <= 0.5).
    fi = P.from_lists([1.0], [0.5], [2], [0.01], backend="flashinfer")
    pt = P.from_lists([1.0], [0.5], [2], [0.01], backend="pytorch")
    torch.testing.assert_close(S.target_probs(logits, fi), torch.tensor([[1.0, 0, 0, 0]]))
    torch.testing.assert_close(S.target_probs(logits, pt), torch.tensor([[4 / 7, 3 / 7, 0, 0]]))


def _rand_dist(g, *shape, sparsity=0.3):
    w = torch.rand(*shape, generator=g) ** 2
    w = w * (torch.rand(*shape, generator=g) > sparsity)
    w[..., 0] += 1e-3  # never an all-zero row
    return w / w.sum(-1, keepdim=True)


def _draft(q, g):
    """Draw draft tokens x_k ~ q_k: q [N, G, V] -> [N, G]."""
    return S.sample(q, generator=g)


def _tv(tokens, p, V):
    freq = torch.bincount(tokens, minlength=V).double() / tokens.numel()
    return 0.5 * (freq - p.double()).abs().sum().item()


def _chi2_pvalue(tokens, p, V):
    """Pearson chi-square p-value of counts vs probabilities p (Wilson-Hilferty)."""
    n = tokens.numel()
    obs = torch.bincount(tokens, minlength=V).double()
    exp = p.double() * n
    keep = exp > 0
    if obs[~keep].sum() > 0:
        return 0.0  # a token the target can never produce: certainly wrong
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    k = int(keep.sum()) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


N_TRIALS = 200_000
# Seeds are fixed, so these tests are deterministic on a given torch build;
# ALPHA keeps them robust if an RNG stream changes. Wrong rules score p ~ 0.
ALPHA = 1e-3


def _trials(verify_fn, V=10, gamma=3, seed=1, n=N_TRIALS):
    """N_TRIALS independent decodes of the first two stream tokens.

    The target is context-independent but position-dependent: the token at
    stream position j must be ~ p_abs[j], independently of earlier tokens.
    Call 1 drafts positions 0..G-1; rows whose first draft was rejected have
    emitted one token only, so a second verify call starting at position 1
    (as the worker would do) supplies their second token.
    Returns p_abs [G+2, V], accept_len of call 1, out of call 1, stream [N, 2].
    """
    g = torch.Generator().manual_seed(seed)
    L = gamma + 2
    p_abs = _rand_dist(g, L, V)
    q_abs = _rand_dist(g, L, V)

    def call(start):
        P_ = p_abs[start : start + gamma + 1].expand(n, -1, -1)
        Q_ = q_abs[start : start + gamma].expand(n, -1, -1)
        x = _draft(Q_, g)
        return verify_fn(x, Q_, P_, generator=g)

    acc1, out1 = call(0)
    _, out2 = call(1)
    second = torch.where(acc1 >= 1, out1[:, 1], out2[:, 0])
    stream = torch.stack([out1[:, 0], second], dim=1)
    return p_abs, acc1, out1, stream


def test_sample_matches_probs():
    g = torch.Generator().manual_seed(5)
    p = _rand_dist(g, 1, 10)[0]
    tok = S.sample(p.expand(N_TRIALS, -1), generator=g)
    assert tok.dtype == torch.int64 and tok.shape == (N_TRIALS,)
    assert _chi2_pvalue(tok, p, 10) > ALPHA
    onehot = torch.zeros(4, 10)
    onehot[torch.arange(4), torch.tensor([3, 0, 9, 3])] = 1.0
    assert S.sample(onehot).tolist() == [3, 0, 9, 3]


def test_sample_unnormalised_sparse_and_batched_rows():
    """Inverse-CDF sampling: weights need no normalisation, zero-weight entries (leading,
    inside, trailing as after top-k) are never drawn, [..., V] shapes keep their leading dims."""
    g = torch.Generator().manual_seed(11)
    w = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0e-6, 5.0, 0.0, 0.0])
    tok = S.sample(w.expand(N_TRIALS, -1), generator=g)
    assert set(tok.unique().tolist()) <= {2, 4, 5}
    assert _chi2_pvalue(tok[(tok == 2) | (tok == 5)], torch.tensor([0, 0, 3 / 8, 0, 0, 5 / 8, 0, 0]), 8) > ALPHA
    w3 = torch.zeros(4, 5, 9)
    w3[..., 8] = 2.0  # only the last entry: u * total may round up to total
    assert (S.sample(w3, generator=g) == 8).all() and S.sample(w3).shape == (4, 5)


def test_verify_first_and_second_token_distribution():
    V = 10
    p, acc, out, stream = _trials(S.verify, V=V)
    assert out.shape == (N_TRIALS, 4) and out.dtype == torch.int64
    # Structure: -1 exactly after the emitted token.
    pos = torch.arange(4).view(1, -1)
    assert ((out == -1) == (pos > acc.view(-1, 1))).all()
    # Non-trivial case: accepts and rejects at every depth happen.
    assert set(acc.unique().tolist()) == {0, 1, 2, 3}
    # First emitted token ~ p_0.
    assert _chi2_pvalue(stream[:, 0], p[0], V) > ALPHA
    assert _tv(stream[:, 0], p[0], V) < 0.01
    # Second stream token ~ p_1, and the pair ~ p_0(x) p_1(y).
    assert _chi2_pvalue(stream[:, 1], p[1], V) > ALPHA
    joint = stream[:, 0] * V + stream[:, 1]
    assert _chi2_pvalue(joint, torch.outer(p[0], p[1]).flatten(), V * V) > ALPHA
    assert _tv(joint, torch.outer(p[0], p[1]).flatten(), V * V) < 0.02
    # Deeper: given all three drafts accepted the bonus is ~ p_3.
    full = acc == 3
    assert _chi2_pvalue(out[full, 3], p[3], V) > ALPHA


def test_wrong_rule_fails_the_same_test():
    """'Accept every draft' emits q, not p: the checks must catch it."""

    def accept_all(x, q, p, generator=None):
        bsz, gamma = x.shape
        bonus = S.sample(p[:, gamma], generator=generator)
        return torch.full((bsz,), gamma), torch.cat([x, bonus[:, None]], 1)

    V = 10
    p, _, _, stream = _trials(accept_all, V=V, n=50_000)
    assert _chi2_pvalue(stream[:, 0], p[0], V) < 1e-6
    assert _tv(stream[:, 0], p[0], V) > 0.01

    def no_residual(x, q, p, generator=None):
        # Correct acceptance but resample from p (not max(p - q, 0)) on rejection.
        acc, out = S.verify(x, q, p, generator)
        bsz = x.shape[0]
        fresh = S.sample(p[torch.arange(bsz), acc], generator=generator)
        rejected = acc < x.shape[1]
        out[rejected, acc[rejected]] = fresh[rejected]
        return acc, out

    p, _, _, stream = _trials(no_residual, V=V, n=50_000)
    assert _chi2_pvalue(stream[:, 0], p[0], V) < 1e-6


def test_verify_greedy_is_argmax_matching():
    g = torch.Generator().manual_seed(7)
    B, G, V = 64, 4, 20
    logits = torch.randn(B, G + 1, V, generator=g)
    tgt = logits.argmax(-1)
    # Drafts agree with the target for a random prefix length, then differ.
    n_match = torch.randint(0, G + 1, (B,), generator=g)
    drafts = tgt[:, :G].clone()
    for b in range(B):
        if n_match[b] < G:
            drafts[b, n_match[b]] = (tgt[b, n_match[b]] + 1) % V
            drafts[b, n_match[b] + 1 :] = torch.randint(0, V, (G - n_match[b] - 1,), generator=g)
    greedy = P.from_lists([0.0] * B)
    p = S.target_probs(logits, greedy)
    q = S._one_hot(drafts.flatten(), V).view(B, G, V)
    for seed in range(3):  # randomness must not matter for one-hot p, q
        acc, out = S.verify(drafts, q, p, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(acc, n_match)
        for b in range(B):
            a = int(acc[b])
            assert out[b, :a].tolist() == drafts[b, :a].tolist()
            assert out[b, a] == tgt[b, a]
            assert (out[b, a + 1 :] == -1).all()
    acc2, out2 = S.verify_greedy(drafts, logits)
    assert torch.equal(acc2, acc) and torch.equal(out2, out)


def test_gamma_zero():
    g = torch.Generator().manual_seed(8)
    V = 10
    p = _rand_dist(g, 1, 1, V)
    x = torch.empty(N_TRIALS, 0, dtype=torch.long)
    q = torch.empty(N_TRIALS, 0, V)
    acc, out = S.verify(x, q, p.expand(N_TRIALS, -1, -1), generator=g)
    assert out.shape == (N_TRIALS, 1) and (acc == 0).all()
    assert _chi2_pvalue(out[:, 0], p[0, 0], V) > ALPHA
    acc, out = S.verify_greedy(x[:2], torch.randn(2, 1, V))
    assert out.shape == (2, 1) and (acc == 0).all()


def test_mixed_batch_one_call():
    """Greedy and sampled rows (different temperatures / filters) together."""
    g = torch.Generator().manual_seed(9)
    V, G, reps = 12, 3, 20_000
    combos = [(0.0, 1.0, -1, 0.0), (0.7, 1.0, -1, 0.0), (1.3, 0.9, 5, 0.05)]
    base_t = torch.randn(len(combos), G + 1, V, generator=g) * 2
    base_d = base_t + 0.7 * torch.randn(len(combos), G + 1, V, generator=g)
    params = P.from_lists(*map(list, zip(*combos)))
    p = S.target_probs(base_t, params)  # [3, G+1, V]
    q = S.target_probs(base_d[:, :G], params)  # draft: same sampling params
    # Replicate each request `reps` times in one batch.
    idx = torch.arange(len(combos)).repeat_interleave(reps)
    P_, Q_ = p[idx], q[idx]
    x = S.sample(Q_, generator=g)
    acc, out = S.verify(x, Q_, P_, generator=g)
    for r in range(len(combos)):
        rows = idx == r
        tok0 = out[rows, 0]
        if r == 0:  # greedy: deterministic argmax of the target
            assert (tok0 == base_t[0, 0].argmax()).all()
            greedy_acc = S.verify_greedy(x[rows][:1], base_t[:1])[0]
            assert (acc[rows] == greedy_acc).all()
        else:
            assert _chi2_pvalue(tok0, p[r, 0], V) > ALPHA
            assert _tv(tok0, p[r, 0], V) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")
def test_cuda_smoke():
    g = torch.Generator(device="cuda").manual_seed(0)
    params = P.from_lists([0.0, 0.8, 1.0], [1.0, 0.9, 1.0], [-1, 10, -1], [0.0, 0.0, 0.1], device="cuda")
    logits = torch.randn(3, 5, 1000, device="cuda")
    p = S.target_probs(logits, params)
    q = S.target_probs(logits[:, :4] + 0.1 * torch.randn(3, 4, 1000, device="cuda"), params)
    x = S.sample(q, generator=g)
    acc, out = S.verify(x, q, p, generator=g)
    assert acc.device.type == "cuda" and out.shape == (3, 5)
    torch.testing.assert_close(p.cpu(), S.target_probs(logits.cpu(), params.to("cpu")), atol=1e-5, rtol=1e-4)
