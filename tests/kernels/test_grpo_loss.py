"""grpo_loss: hand-computed cases, an independent per-sequence fp64 reference, Liger's GRPO losses, errors."""
import itertools
import math

import pytest
import torch

from srpo_fast.kernels import grpo_loss, token_logprobs


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SRPO_FAST_KERNELS", request.param)
    return request.param


def cu_from(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


# ---------------------------------------------------------------- hand-computed example
# Two sequences: seq0 has 3 tokens (the last masked out), A=+1; seq1 has 3 tokens, A=-2. clip 0.2 / 0.2.
# Token ratios r = exp(logp - old): seq0 [1.5, 0.5, e^-30 (masked)], seq1 [1.1, 0.7, 1.0].
#   seq0 r=1.5, A>0: -min(1.5, 1.2) = -1.2, clipped high -> grad 0
#   seq0 r=0.5, A>0: -min(0.5, 0.8) = -0.5, grad -A r = -0.5
#   seq1 r=1.1, A<0: -min(-2.2, -2.2) = 2.2, grad -A r = 2.2
#   seq1 r=0.7, A<0: -min(-1.4, -1.6) = 1.6, clipped low -> grad 0
#   seq1 r=1.0, A<0: 2.0, grad 2.0
# Masked-token sum = -1.2 - 0.5 + 2.2 + 1.6 + 2.0 = 4.1 over n = (2, 3) tokens.
HAND_RATIOS = [1.5, 0.5, math.exp(-30.0), 1.1, 0.7, 1.0]
HAND_MASK = [1, 1, 0, 1, 1, 1]
HAND_ADV = [1.0, -2.0]
HAND_TOKEN_GRAD = [0.0, -0.5, 0.0, 2.2, 0.0, 2.0]


def hand_inputs():
    old = torch.tensor([-1.0, -2.0, 0.0, -0.5, -3.0, -1.5], dtype=torch.float64)
    logp = old + torch.tensor(HAND_RATIOS, dtype=torch.float64).log()
    return logp, old, torch.tensor(HAND_ADV, dtype=torch.float64), torch.tensor(HAND_MASK, dtype=torch.bool), \
        cu_from([3, 3])


@pytest.mark.parametrize("aggregation,expected_loss,token_scale", [
    ("token-mean", 4.1 / 5, [1 / 5] * 6),
    ("seq-mean-token-mean", (-1.7 / 2 + 5.8 / 3) / 2, [1 / 4] * 3 + [1 / 6] * 3),
    ("seq-mean-token-sum-norm", 4.1 / (2 * 3), [1 / 6] * 6),  # S=2 sequences, L_max = 3 masked tokens
])
def test_hand_computed_token_level(backend, aggregation, expected_loss, token_scale):
    logp, old, adv, mask, cu = hand_inputs()
    logp.requires_grad_()
    loss, metrics = grpo_loss(logp, old, adv, mask, cu, aggregation=aggregation)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    expected_grad = [g * s for g, s in zip(HAND_TOKEN_GRAD, token_scale)]
    assert logp.grad.tolist() == pytest.approx(expected_grad, rel=1e-12, abs=1e-15)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert metrics["clip_frac_dual"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.0) / 5, rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(1.5, rel=1e-6)
    expected_akl = sum(r - 1 - math.log(r) for r, m in zip(HAND_RATIOS, HAND_MASK) if m) / 5
    assert metrics["approx_kl"].item() == pytest.approx(expected_akl, rel=1e-6)
    assert "kl" not in metrics and "entropy_mean" not in metrics
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in metrics.values())


def test_hand_computed_sequence_level(backend):
    """GSPO: s_i = exp(mean masked log-ratio) = geometric mean of the masked ratios; every token of the
    sequence sees r = s_i and gets gradient -A s_i (when not clipped) times its aggregation weight."""
    logp, old, adv, mask, cu = hand_inputs()
    logp.requires_grad_()
    s0 = math.sqrt(1.5 * 0.5)             # 0.866 in [0.8, 1.2]: not clipped
    s1 = (1.1 * 0.7 * 1.0) ** (1 / 3)     # 0.917: not clipped
    loss, metrics = grpo_loss(logp, old, adv, mask, cu, is_level="sequence")
    loss.backward()
    assert loss.item() == pytest.approx((2 * (-1.0 * s0) + 3 * (2.0 * s1)) / 5, rel=1e-12)
    expected = [-s0 / 5, -s0 / 5, 0.0, 2 * s1 / 5, 2 * s1 / 5, 2 * s1 / 5]
    assert logp.grad.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert metrics["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * s1) / 5, rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(s1, rel=1e-6)
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 0.0
    # a tighter GSPO-style clip range clips seq1 from below (A < 0, s1 < 1 - 0.05): its tokens get no gradient
    logp.grad = None
    loss, metrics = grpo_loss(logp, old, adv, mask, cu, is_level="sequence", clip_low=0.05, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((2 * (-1.0 * s0) + 3 * (2.0 * 0.95)) / 5, rel=1e-12)
    assert logp.grad.tolist() == pytest.approx([-s0 / 5, -s0 / 5, 0, 0, 0, 0], rel=1e-12, abs=1e-15)
    assert metrics["clip_frac_low"].item() == pytest.approx(3 / 5)


def test_hand_computed_dual_clip_kl_entropy(backend):
    """One sequence of 3 tokens, A = -1: r = 5 is capped by the dual clip c = 3 (loss 3, grad 0), r = 2
    stays (loss 2, grad 2), r = 1 gives loss 1, grad 1. KL k3 with d = ref - logp, entropy bonus."""
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    logp = (old + torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64).log()).requires_grad_()
    d = [0.5, -0.3, 0.0]
    ref = logp.detach() + torch.tensor(d, dtype=torch.float64)
    ent = torch.tensor([0.7, 1.2, 0.1], dtype=torch.float64, requires_grad=True)
    mask, cu, adv = torch.ones(3), cu_from([3]), torch.tensor([-1.0], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, old, adv, mask, cu, ref, dual_clip=3.0, kl_coef=0.1, entropy=ent,
                              entropy_coef=0.01)
    loss.backward()
    k3 = [math.exp(x) - x - 1 for x in d]
    assert loss.item() == pytest.approx((3 + 2 + 1 + 0.1 * sum(k3) - 0.01 * (0.7 + 1.2 + 0.1)) / 3, rel=1e-12)
    expected = [(pg + 0.1 * (1 - math.exp(x))) / 3 for pg, x in zip([0.0, 2.0, 1.0], d)]
    assert logp.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert ent.grad.tolist() == pytest.approx([-0.01 / 3] * 3, rel=1e-12)
    assert metrics["clip_frac_dual"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac_high"].item() == 0.0 and metrics["clip_frac_low"].item() == 0.0
    assert metrics["kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-6)
    assert metrics["entropy_mean"].item() == pytest.approx(2.0 / 3, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_hand_computed_kl_estimators(backend, estimator):
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.7], dtype=torch.float64)
    x = [a - b for a, b in zip([-1.0, -2.0], [-1.5, -1.7])]  # logp - ref
    value, grad = {"k1": (lambda v: v, lambda v: 1.0), "k2": (lambda v: v * v / 2, lambda v: v),
                   "k3": (lambda v: math.exp(-v) + v - 1, lambda v: 1 - math.exp(-v))}[estimator]
    loss, metrics = grpo_loss(lp, lp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(2), cu_from([2]),
                              ref, kl_coef=0.5, kl_estimator=estimator)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (value(x[0]) + value(x[1])) / 2, rel=1e-12)
    assert lp.grad.tolist() == pytest.approx([0.5 * grad(v) / 2 for v in x], rel=1e-12)


def test_normalizer_makes_micro_batches_exact(backend):
    """Token-mean over a batch split into micro-batches: summing per-micro-batch losses that use the global
    token count as normalizer equals the full-batch loss and gradient."""
    gen = torch.Generator().manual_seed(4)
    lengths = [7, 3, 11, 5]
    total = sum(lengths)
    logp = -torch.rand(total, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(total, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.rand(total, generator=gen) > 0.3
    full_lp = logp.clone().requires_grad_()
    full, _ = grpo_loss(full_lp, old, adv, mask, cu_from(lengths))
    full.backward()
    split_lp = logp.clone().requires_grad_()
    global_tokens = mask.sum()  # a tensor: no host sync needed
    a = grpo_loss(split_lp[:10], old[:10], adv[:2], mask[:10], cu_from(lengths[:2]), normalizer=global_tokens)[0]
    b = grpo_loss(split_lp[10:], old[10:], adv[2:], mask[10:], cu_from(lengths[2:]), normalizer=global_tokens)[0]
    (a + b).backward()
    assert (a + b).item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(split_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)
    # Dr.GRPO with an explicit generation budget: sum / (S * budget)
    loss, _ = grpo_loss(logp, old, adv, mask, cu_from(lengths), aggregation="seq-mean-token-sum-norm",
                        max_response_len=16)
    tok, _ = grpo_loss(logp, old, adv, mask, cu_from(lengths))
    assert loss.item() == pytest.approx(tok.item() * mask.sum().item() / (4 * 16), rel=1e-12)


# ---------------------------------------------------------------- independent fp64 reference
def loop_reference(logp, old, adv, mask, lengths, ref, entropy, *, clip_low, clip_high, dual_clip, kl_coef,
                   kl_estimator, entropy_coef, aggregation, is_level):
    """Written per sequence with Python loops and autograd, straight from the formulas."""
    total_loss, start, n_all, per_token = 0.0, 0, float(sum(mask.tolist())), adv.shape[0] == logp.shape[0]
    max_len = max(sum(mask[s:s + n].tolist()) for s, n in zip(itertools.accumulate([0] + lengths), lengths))
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        start += n
        m = mask[sl].double()
        if m.sum() == 0:
            continue
        lp, lr = logp[sl], logp[sl] - old[sl]
        a = adv[sl] if per_token else adv[i].expand(n)
        if is_level == "sequence":
            s = torch.exp((lr.detach() * m).sum() / m.sum())
            r = s * torch.exp(lp - lp.detach())
        else:
            r = torch.exp(lr)
        pg = torch.max(-a * r, -a * r.clamp(1 - clip_low, 1 + clip_high))
        if dual_clip is not None:
            pg = torch.where(a < 0, torch.min(pg, -dual_clip * a), pg)
        loss_t = pg
        if ref is not None:
            x = lp - ref[sl]
            kl = {"k1": x, "k2": x * x / 2, "k3": torch.exp(-x) + x - 1}[kl_estimator]
            loss_t = loss_t + kl_coef * kl
        if entropy is not None:
            loss_t = loss_t - entropy_coef * entropy[sl]
        seq_sum = (loss_t * m).sum()
        if aggregation == "token-mean":
            total_loss = total_loss + seq_sum / n_all
        elif aggregation == "seq-mean-token-mean":
            total_loss = total_loss + seq_sum / m.sum() / len(lengths)
        else:
            total_loss = total_loss + seq_sum / (len(lengths) * max_len)
    return total_loss


CONFIGS = [
    dict(aggregation="token-mean", is_level="token", dual_clip=None, kl_estimator="k3", adv_per_token=False),
    dict(aggregation="seq-mean-token-mean", is_level="token", dual_clip=2.5, kl_estimator="k1",
         adv_per_token=True),
    dict(aggregation="seq-mean-token-sum-norm", is_level="token", dual_clip=3.0, kl_estimator="k2",
         adv_per_token=False),
    dict(aggregation="token-mean", is_level="sequence", dual_clip=None, kl_estimator="k3", adv_per_token=False),
    dict(aggregation="seq-mean-token-mean", is_level="sequence", dual_clip=None, kl_estimator="k2",
         adv_per_token=False),
    dict(aggregation="seq-mean-token-sum-norm", is_level="sequence", dual_clip=1.5, kl_estimator="k1",
         adv_per_token=True),
]


@pytest.mark.parametrize("cfg_id", range(len(CONFIGS)))
def test_random_configs_match_loop_reference(backend, cfg_id):
    cfg = dict(CONFIGS[cfg_id])
    adv_per_token = cfg.pop("adv_per_token")
    gen = torch.Generator().manual_seed(100 + cfg_id)
    lengths = [int(x) for x in torch.randint(1, 70, (5,), generator=gen)]
    lengths[2] = 0  # an empty sequence
    total = sum(lengths)
    base = -torch.rand(total, generator=gen) * 4
    logp = base.clone().requires_grad_()
    old = base + 0.4 * torch.randn(total, generator=gen)
    ref = base + 0.3 * torch.randn(total, generator=gen)
    entropy = (torch.rand(total, generator=gen) * 2).requires_grad_()
    adv = torch.randn(total if adv_per_token else 5, generator=gen)
    mask = torch.rand(total, generator=gen) > 0.25
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, entropy_coef=0.003, **cfg)
    loss, metrics = grpo_loss(logp, old, adv, mask, cu_from(lengths), ref, entropy=entropy, **kw)
    loss.backward()
    lp64, ent64 = base.double().requires_grad_(), entropy.detach().double().requires_grad_()
    expected = loop_reference(lp64, old.double(), adv.double(), mask, lengths, ref.double(), ent64, **kw)
    expected.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (logp.grad.double() - lp64.grad).abs().max() <= 1e-5 * lp64.grad.abs().max()
    assert (entropy.grad.double() - ent64.grad).abs().max() <= 1e-5 * ent64.grad.abs().max()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_gradcheck_fp64(backend):
    gen = torch.Generator().manual_seed(9)
    lengths = [4, 6, 3]
    total = sum(lengths)
    logp = (-torch.rand(total, generator=gen, dtype=torch.float64)).requires_grad_()
    ent = torch.rand(total, generator=gen, dtype=torch.float64).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(total, generator=gen, dtype=torch.float64)
    ref = logp.detach() + 0.1 * torch.randn(total, generator=gen, dtype=torch.float64)
    adv, mask = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(total, generator=gen) > 0.2
    for agg, level in [("token-mean", "token"), ("seq-mean-token-mean", "sequence")]:
        def fn(x, e):
            return grpo_loss(x, old, adv, mask, cu_from(lengths), ref, kl_coef=0.1, entropy=e, entropy_coef=0.01,
                             aggregation=agg, is_level=level)[0]
        assert torch.autograd.gradcheck(fn, (logp, ent), eps=1e-6, atol=1e-8)


def test_bad_inputs_raise_clear_errors(backend):
    lp, old, adv, mask, cu = torch.zeros(5), torch.zeros(5), torch.zeros(2), torch.ones(5), cu_from([2, 3])
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        grpo_loss(lp, old[:4], adv, mask, cu)
    with pytest.raises(ValueError, match=r"advantages must be \[S\]=2"):
        grpo_loss(lp, old, torch.zeros(3), mask, cu)
    with pytest.raises(ValueError, match="flat"):
        grpo_loss(lp[None], old[None], adv, mask[None], cu)
    with pytest.raises(ValueError, match="empty"):
        grpo_loss(lp[:0], old[:0], adv, mask[:0], cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        grpo_loss(lp, old, adv, mask, cu_from([2, 2]))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64"):
        grpo_loss(lp, old, adv, mask, cu.float())
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(lp, old, adv, mask, cu, aggregation="mean")
    with pytest.raises(ValueError, match="is_level"):
        grpo_loss(lp, old, adv, mask, cu, is_level="seq")
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(lp, old, adv, mask, cu, lp, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logp"):
        grpo_loss(lp, old, adv, mask, cu, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef != 0 needs entropy"):
        grpo_loss(lp, old, adv, mask, cu, entropy_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        grpo_loss(lp, old, adv, mask, cu, dual_clip=0.9)
    with pytest.raises(TypeError, match="logp must be a floating-point"):
        grpo_loss(lp.long(), old, adv, mask, cu)
    with pytest.raises(ValueError, match="ref_logp is on meta"):
        grpo_loss(lp, old, adv, mask, cu, lp.to("meta"))


# ---------------------------------------------------------------- Liger-Kernel, on the configurations we share
LIGER_CASES = [("dapo", "token-mean", "token"), ("grpo", "seq-mean-token-mean", "token"),
               ("dr_grpo", "seq-mean-token-sum-norm", "token"), ("dapo", "token-mean", "sequence")]


def liger_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = 3, 9, 300
    logits = torch.randn(batch, length + 1, vocab, generator=gen)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.int32)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        lp0 = torch.log_softmax(logits[:, :-1] / 0.9, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = lp0 + 0.3 * torch.randn(batch, length, generator=gen)
    ref = lp0 + 0.1 * torch.randn(batch, length, generator=gen)
    adv = torch.randn(batch, generator=gen)
    return logits, ids, mask, old, ref, adv


def ours_from_logits(logits, ids, mask, old, ref, adv, aggregation, level, max_len, eps):
    batch, length = ids.shape
    flat_logits = logits[:, :-1].reshape(batch * length, -1)
    logp = token_logprobs(flat_logits, ids.reshape(-1), 0.9, return_entropy=False)
    cu_seqlens = cu_from([length] * batch).to(ids.device)
    return grpo_loss(logp, old.reshape(-1), adv, mask.reshape(-1), cu_seqlens, ref.reshape(-1),
                     clip_low=eps[0], clip_high=eps[1], kl_coef=0.04, aggregation=aggregation, is_level=level,
                     max_response_len=max_len)


@pytest.mark.parametrize("loss_type,aggregation,level", LIGER_CASES)
def test_matches_liger_triton_grpo_loss(backend, loss_type, aggregation, level):
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss", reason="liger-kernel not installed")
    logits, ids, mask, old, ref, adv = liger_inputs(seed=len(loss_type) + len(level))
    if torch.cuda.is_available():  # Liger's Triton kernel runs compiled there, on device tensors only
        logits, ids, mask, old, ref, adv = (t.cuda() for t in (logits, ids, mask, old, ref, adv))
    eps = (0.2, 0.28)
    x = logits.clone().requires_grad_()
    loss, metrics = liger.triton_grpo_loss(x, old, ref, ids, adv, completion_mask=mask, temperature=0.9, beta=0.04,
                                           eps_low=eps[0], eps_high=eps[1], inplace=False, loss_type=loss_type,
                                           max_completion_length=12, importance_sampling_level=level, reduce=True)
    loss.backward()
    y = logits.clone().requires_grad_()
    our_loss, our_metrics = ours_from_logits(y, ids, mask, old, ref, adv, aggregation, level, 12, eps)
    our_loss.backward()
    assert our_loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(y.grad, x.grad, rtol=1e-4, atol=1e-7)
    kl_mean, clip_ratio = metrics
    assert our_metrics["kl"].item() == pytest.approx(kl_mean.item(), rel=1e-5)
    clip = our_metrics["clip_frac_low"] + our_metrics["clip_frac_high"]
    assert clip.item() == pytest.approx(clip_ratio.item(), abs=1e-6)


@pytest.mark.parametrize("loss_type,aggregation,level", [LIGER_CASES[0], LIGER_CASES[1], LIGER_CASES[3]])
def test_matches_liger_fused_linear_grpo_loss(backend, loss_type, aggregation, level):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    gen = torch.Generator().manual_seed(21)
    batch, length, hidden, vocab = 3, 8, 16, 200
    h = torch.randn(batch, length, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length)
    mask[0, 5:] = 0
    with torch.no_grad():
        lp0 = torch.log_softmax(h @ w.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = lp0 + 0.3 * torch.randn(batch, length, generator=gen)
    ref = lp0 + 0.1 * torch.randn(batch, length, generator=gen)
    adv = torch.randn(batch, generator=gen)
    module = chunked.LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, use_ref_model=True, chunk_size=2,
                                              epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                              importance_sampling_level=level, temperature=1.0)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = module(hl, wl, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    loss.backward()
    ho, wo = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = token_logprobs((ho @ wo.T).reshape(batch * length, vocab), ids.reshape(-1), return_entropy=False)
    ours, _ = grpo_loss(logp, old.reshape(-1), adv, mask.reshape(-1), cu_from([length] * batch), ref.reshape(-1),
                        clip_low=0.2, clip_high=0.28, kl_coef=0.04, aggregation=aggregation, is_level=level)
    ours.backward()
    assert ours.item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(ho.grad, hl.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(wo.grad, wl.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_torch_path(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 3000, (64,), generator=gen)]
    total = sum(lengths)
    base = -torch.rand(total, generator=gen) * 4
    args = (base + 0.3 * torch.randn(total, generator=gen), torch.randn(64, generator=gen),
            torch.rand(total, generator=gen) > 0.2, cu_from(lengths), base + 0.1 * torch.randn(total, generator=gen))
    kw = dict(kl_coef=0.05, dual_clip=3.0, aggregation="seq-mean-token-mean", is_level="sequence")
    cpu_lp = base.clone().requires_grad_()
    cpu_loss, _ = grpo_loss(cpu_lp, *args, **kw)
    cpu_loss.backward()
    gpu_lp = base.cuda().requires_grad_()
    gpu_loss, metrics = grpo_loss(gpu_lp, *[a.cuda() for a in args], **kw)
    gpu_loss.backward()
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)
    assert torch.allclose(gpu_lp.grad.cpu(), cpu_lp.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
def test_cuda_no_host_sync_with_check_false():
    """With check=False the whole fwd+bwd of all three ops runs without a device-to-host synchronization."""
    from srpo_fast.kernels import linear_token_logprobs

    dev = torch.device("cuda")
    hidden = torch.randn(64, 32, device=dev, requires_grad=True)
    weight = torch.randn(1000, 32, device=dev, requires_grad=True)
    targets = torch.randint(0, 1000, (64,), device=dev)
    args = (torch.randn(64, device=dev), torch.randn(4, device=dev), torch.ones(64, device=dev),
            cu_from([16] * 4).to(dev))
    def step():
        logp, ent = linear_token_logprobs(hidden, weight, targets, check=False)
        logp2, _ = token_logprobs((hidden @ weight.T), targets, check=False)
        loss, metrics = grpo_loss(logp + logp2, *args, entropy=ent, entropy_coef=0.01, check=False,
                                  normalizer=100.0)
        loss.backward()
        return metrics

    step()  # compiles and autotunes (the autotuner synchronizes) outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(hidden.grad).all() and all(torch.isfinite(v) for v in metrics.values())
