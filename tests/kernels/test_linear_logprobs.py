"""linear_token_logprobs: Triton (interpreter) and torch paths vs fp64 log_softmax(hidden @ W.T + b), fwd and bwd,
and a check that no [N, V]-sized tensor is ever created."""
import math

import pytest
import torch

from largest_tensor import LargestTensor

from srpo_fast.kernels import linear_token_logprobs


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SRPO_FAST_KERNELS", request.param)
    return request.param


def reference(hidden, weight, bias, targets, temperature):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), entropy


def make(n, hdim, vocab, dtype, seed, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=gen) * 0.4).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[0] = vocab - 1
    if n > 1:
        targets[1] = 0
    return hidden, weight, bias, targets


def run_both(hidden, weight, bias, targets, temperature, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    g_logp, g_ent = torch.randn(2, hidden.shape[0], generator=gen, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp, ent = linear_token_logprobs(leaves[0], leaves[1], targets, temperature, bias=leaves[2], **kw)
    (logp.double() @ g_logp + ent.double() @ g_ent).backward()
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_logp, ref_ent = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], targets, temperature)
    (ref_logp @ g_logp + ref_ent @ g_ent).backward()
    ours = [logp, ent] + [t.grad if t is not None else None for t in leaves]
    refs = [ref_logp, ref_ent] + [t.grad if t is not None else None for t in ref_leaves]
    return ours, refs


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("n,hdim,vocab,temperature,with_bias,seed", [
    (1, 24, 97, 1.0, False, 0),      # one row; V smaller than one tile
    (21, 40, 700, 0.8, True, 1),     # ragged N, H, V against every block size; several vocab chunks
    (37, 17, 517, 1.3, False, 2),
])
def test_fp32_matches_fp64_reference(backend, n, hdim, vocab, temperature, with_bias, seed):
    ours, refs = run_both(*make(n, hdim, vocab, torch.float32, seed, with_bias), temperature, seed, chunk_size=256)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[0].shape == (n,)
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, refs):
        if b is not None:
            assert a.dtype == (torch.float32), name
            assert rel_err(a, b) < 1e-5, name


def test_bf16_inputs(backend):
    hidden, weight, bias, targets = make(19, 32, 600, torch.bfloat16, 4)
    ours, refs = run_both(hidden, weight, bias, targets, 0.9, 4, chunk_size=256)
    # logits of the same bf16 values are exact in fp32 accumulation: fp32-level forward agreement
    assert rel_err(ours[0], refs[0]) < 1e-5 and rel_err(ours[1], refs[1]) < 1e-5
    for a, b in zip(ours[2:], refs[2:]):  # gradients go through bf16 (dz tiles, outputs): bf16-level agreement
        assert a.dtype == torch.bfloat16 and rel_err(a, b) < 2e-2


def test_gradcheck_fp64(backend):
    hidden, weight, bias, targets = make(3, 5, 40, torch.float64, 5)
    leaves = tuple(t.requires_grad_() for t in (hidden, weight, bias))

    def fn(h, w, b):
        logp, ent = linear_token_logprobs(h, w, targets, 0.7, bias=b)
        return logp + 0.5 * ent

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_partial_requires_grad_and_single_output(backend):
    """Frozen LM head (only hidden needs grad); entropy off; gradient through the entropy alone."""
    hidden, weight, _, targets = make(9, 16, 300, torch.float32, 6, with_bias=False)
    h = hidden.clone().requires_grad_()
    logp = linear_token_logprobs(h, weight, targets.int(), return_entropy=False)  # int32 targets accepted
    assert isinstance(logp, torch.Tensor)
    logp.sum().backward()
    hr = hidden.double().requires_grad_()
    ref_logp, ref_ent = reference(hr, weight, None, targets, 1.0)
    ref_logp.sum().backward()
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(h.grad, hr.grad) < 1e-5 and weight.grad is None
    h.grad, hr.grad = None, None
    _, ent = linear_token_logprobs(h, weight, targets)
    ent.sum().backward()
    reference(hr, weight, None, targets, 1.0)[1].sum().backward()
    assert rel_err(h.grad, hr.grad) < 1e-5


def test_masked_vocab_bias(backend):
    """A -inf bias masks part of the vocabulary (a whole leading chunk here): finite values and gradients."""
    hidden, weight, bias, targets = make(7, 12, 600, torch.float32, 8)
    bias[:300] = float("-inf")
    targets = torch.randint(300, 600, (7,), generator=torch.Generator().manual_seed(0))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = linear_token_logprobs(h, w, targets, bias=bias, chunk_size=256)
    (logp.sum() + ent.sum()).backward()
    hr, wr = hidden.double().requires_grad_(), weight[300:].double().requires_grad_()
    ref_logp, ref_ent = reference(hr, wr, bias[300:], targets - 300, 1.0)
    (ref_logp.sum() + ref_ent.sum()).backward()
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5
    assert rel_err(h.grad, hr.grad) < 1e-5 and rel_err(w.grad[300:], wr.grad) < 1e-5
    assert (w.grad[:300] == 0).all()


def test_never_materializes_n_by_v(backend):
    n, hdim, vocab = 24, 16, 3000
    hidden, weight, bias, targets = make(n, hdim, vocab, torch.float32, 9)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with LargestTensor() as probe:
        logp, ent = linear_token_logprobs(h, w, targets, bias=b, chunk_size=256)
        (logp.sum() + ent.sum()).backward()
    # inputs and their gradients (V x H) are allowed, and one [N, chunk] block; a logits-sized tensor is not
    assert probe.nbytes <= 4 * max(vocab * hdim, n * 256)
    assert n * vocab > max(vocab * hdim, n * 256)


def test_bad_inputs_raise_clear_errors(backend):
    hidden, weight, bias, targets = make(4, 8, 50, torch.float32, 0)
    with pytest.raises(TypeError, match="weight dtype"):
        linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match=r"weight must be \[V, H=8\]"):
        linear_token_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="targets has 3 rows"):
        linear_token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match=r"bias must be \[V=50\]"):
        linear_token_logprobs(hidden, weight, targets, bias=bias[:49])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\); found 50"):
        linear_token_logprobs(hidden, weight, torch.tensor([0, 50, 1, 2]))
    with pytest.raises(ValueError, match="empty input"):
        linear_token_logprobs(hidden[:0], weight, targets[:0])
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        linear_token_logprobs(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(hidden, weight, targets, chunk_size=100)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(hidden, weight, targets, temperature=-1.0)
    with pytest.raises(ValueError, match="weight is on meta"):
        linear_token_logprobs(hidden, weight.to("meta"), targets)


def test_non_contiguous_inputs(backend):
    """A row-strided hidden view is read in place; a transposed weight view is copied first."""
    hidden, weight, _, targets = make(6, 10, 200, torch.float32, 3, with_bias=False)
    wide = torch.cat([hidden, torch.randn(6, 5)], dim=1)[:, :10]
    w_t = weight.T.contiguous().T
    assert wide.stride(0) == 15 and w_t.stride(-1) != 1
    logp, ent = linear_token_logprobs(wide, w_t, targets)
    ref_logp, ref_ent = reference(hidden, weight, None, targets, 1.0)
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


def test_merge_of_vocab_range_partials_handles_empty_ranges():
    """The forward kernel's per-range base-2 partials (max, sum 2^(z-m), sum 2^(z-m)(z-m)), one range empty
    (m = NEG, s = u = 0, as an empty trailing split) and one all-masked (every z = NEG), merge exactly."""
    from srpo_fast.kernels.linear_logprobs import LN2, LOG2E, NEG, _merge_splits

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 90, generator=gen, dtype=torch.float64) * 3
    z2 = z * LOG2E
    ranges = [z2[:, :40], z2[:, 40:41], z2[:, 41:], torch.full((5, 7), NEG, dtype=z.dtype)]
    m, s, u = [], [], []
    for part in ranges:
        mx = part.max(1).values
        e = torch.exp2(part - mx[:, None])
        m.append(mx)
        s.append(e.sum(1))
        u.append((e * (part - mx[:, None])).sum(1))
    m.append(torch.full((5,), NEG, dtype=z.dtype))
    s.append(torch.zeros(5, dtype=z.dtype))
    u.append(torch.zeros(5, dtype=z.dtype))
    lse2, ent = _merge_splits(torch.stack(m), torch.stack(s), torch.stack(u))
    log_p = torch.log_softmax(z, -1)
    assert torch.allclose(lse2 * LN2, torch.logsumexp(z, -1), rtol=1e-12)
    assert torch.allclose(ent, -(log_p.exp() * log_p).sum(-1), rtol=1e-12)


def peaked(n, hdim, vocab, seed):
    """A confident model: most probabilities far below 2^-12, so the gradient filter has tiles to drop."""
    hidden, weight, bias, targets = make(n, hdim, vocab, torch.float32, seed)
    return hidden * 3, weight * 3, bias, targets


@pytest.mark.parametrize("eps", [2.0 ** -12, 2.0 ** -6])
def test_grad_filter_error_is_within_its_bound(backend, eps):
    """grad_filter_eps drops only entries with p < eps away from targets: forward unchanged, every gradient
    entry within the documented bound of the exact one, and something actually dropped."""
    n, hdim, vocab, temperature = 5, 16, 1400, 0.9
    hidden, weight, bias, targets = peaked(n, hdim, vocab, 11)
    gen = torch.Generator().manual_seed(0)
    g_logp, g_ent = torch.randn(2, n, generator=gen)
    grads = {}
    for key in (None, eps):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = linear_token_logprobs(h, w, targets, temperature, bias=bias, chunk_size=256,
                                          grad_filter_eps=key)
        (logp @ g_logp + ent @ g_ent).backward()
        grads[key] = (logp.detach(), ent.detach(), h.grad, w.grad)
    exact, filt = grads[None], grads[eps]
    assert torch.equal(exact[0], filt[0]) and torch.equal(exact[1], filt[1])
    # per dropped entry |dz| <= eps (|g_logp| + |g_ent| (|ln eps| + H)) / T
    per_row = eps * (g_logp.abs() + g_ent.abs() * (abs(math.log(eps)) + exact[1].abs())) / temperature
    dh_bound = per_row[:, None] * weight.abs().sum(0)[None, :]
    dw_bound = (per_row[:, None] * hidden.abs()).sum(0)[None, :].expand(vocab, hdim)
    slack = 1e-5  # fp32 rounding of the two computations
    assert ((filt[2] - exact[2]).abs() <= dh_bound + slack * exact[2].abs().max()).all()
    assert ((filt[3] - exact[3]).abs() <= dw_bound + slack * exact[3].abs().max()).all()
    assert (filt[3] != exact[3]).any()  # some tile was dropped
    assert (filt[3][targets] != 0).any(1).all()  # tiles holding a target are always kept
    assert rel_err(filt[2], exact[2].double()) < (5e-2 if eps > 1e-3 else 2e-3)


def test_grad_filter_eps_validated(backend):
    hidden, weight, _, targets = make(4, 8, 50, torch.float32, 0, with_bias=False)
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="grad_filter_eps"):
            linear_token_logprobs(hidden, weight, targets, grad_filter_eps=bad)


def test_n_bucket_and_backward_chunk_budget():
    from srpo_fast.kernels.linear_logprobs import MEMORY_BUDGET, N_BUCKETS, backward_chunk, n_bucket

    assert [n_bucket(n) for n in (1, 256, 257, 16384, 16385, 10 ** 6)] == [256, 256, 512, 16384, 32768, 65536]
    assert all(n_bucket(b) == b for b in N_BUCKETS)
    for hdim in (2048, 3584, 5120):
        for vocab in (151_936, 152_064):
            chunk = backward_chunk(hdim, vocab, 2)
            n = 16384
            extra = 4 * n * hdim + 2 * n * chunk
            assert chunk % 256 == 0 and extra <= MEMORY_BUDGET * 4 * n * vocab
            assert 4 * n * hdim + 2 * n * (chunk + 256) > MEMORY_BUDGET * 4 * n * vocab  # the largest that fits
    assert backward_chunk(5120, 2000, 2) == 256  # budget impossible: the smallest chunk
    assert backward_chunk(64, 100_000, 4) == 4864  # fp32: (0.2 V - 4 H) / 4 = 4936, down to a multiple of 256


def test_prewarm_runs_each_bucket_once(backend):
    from srpo_fast.kernels.linear_logprobs import prewarm

    _, weight, bias, _ = make(1, 16, 96, torch.float32, 2)
    buckets = prewarm(weight, [3, 200, 300, 256], bias=bias)
    assert buckets == ([256, 512] if backend == "triton" else [])
    assert weight.grad is None  # the caller's parameters are left untouched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 152_064), (torch.bfloat16, 151_936)])
def test_cuda_matches_reference(dtype, vocab):
    hidden, weight, bias, targets = make(37, 256, vocab, dtype, 0)
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, refs = run_both(hidden.cuda(), weight.cuda(), bias.cuda(), targets.cuda(), 0.8)
    tol_fwd, tol_bwd = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 2e-2)
    assert rel_err(ours[0].cpu(), refs[0].cpu()) < tol_fwd and rel_err(ours[1].cpu(), refs[1].cpu()) < tol_fwd
    for a, b in zip(ours[2:], refs[2:]):
        assert rel_err(a.cpu(), b.cpu()) < tol_bwd


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 65_536])
def test_cuda_row_count_extremes(n):
    hidden, weight, _, targets = make(n, 64, 4099, torch.bfloat16, 1, with_bias=False)
    ours, refs = run_both(hidden.cuda(), weight.cuda(), None, targets.cuda(), 1.0)
    assert rel_err(ours[0].cpu(), refs[0].cpu()) < 1e-4 and rel_err(ours[1].cpu(), refs[1].cpu()) < 1e-4
    assert rel_err(ours[2].cpu(), refs[2].cpu()) < 2e-2 and rel_err(ours[3].cpu(), refs[3].cpu()) < 2e-2


@pytest.mark.gpu
def test_cuda_filtered_backward_and_prewarm():
    """On a GPU: the skip GEMMs (at the autotuned tile) stay within the filter's error bound of the exact
    backward, and prewarm tunes each bucket once."""
    from srpo_fast.kernels.linear_logprobs import prewarm

    hidden, weight, bias, targets = peaked(300, 64, 4099, 3)
    hidden, weight, targets = hidden.cuda().bfloat16(), weight.cuda().bfloat16(), targets.cuda()
    assert prewarm(weight, [200, 300]) == [256, 512]
    grads = {}
    for eps in (None, 2.0 ** -12):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = linear_token_logprobs(h, w, targets, grad_filter_eps=eps)
        (logp.sum() + ent.sum()).backward()
        grads[eps] = (h.grad.float(), w.grad.float())
    for exact, filt in zip(grads[None], grads[2.0 ** -12]):
        assert rel_err(filt.cpu(), exact.cpu().double()) < 2e-2
