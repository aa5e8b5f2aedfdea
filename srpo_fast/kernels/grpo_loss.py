"""GRPO / DAPO / Dr.GRPO / GSPO policy loss over packed token streams, forward and backward in one pass.

Layout: every per-token argument is a flat ``[T]`` tensor over all tokens of all sequences, sequence ``i``
owning ``[cu_seqlens[i], cu_seqlens[i+1])``; ``loss_mask`` marks the tokens that count (the response).

Per token t of sequence i, with A the advantage (per sequence or per token) and r the importance ratio:
  token level:     r = exp(logp - old_logp)
  sequence (GSPO): r = sg(s_i) * exp(logp - sg(logp)),  s_i = exp(mean over masked t of (logp - old_logp)),
                   so r equals s_i and dr/dlogp_t = s_i (the GSPO-token gradient).
  pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))     (asymmetric "clip-higher" as in DAPO)
  dual clip c (A < 0 only): pg = min(pg, -c A)
  kl   = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: exp(ref - logp) - (ref - logp) - 1
  loss_t = pg + kl_coef * kl - entropy_coef * entropy
Aggregation, with m the mask, n_i = sum of m over sequence i, S the number of sequences:
  token-mean:               sum_t m l / D,                     D = normalizer or sum_i n_i
  seq-mean-token-mean:      sum_i (sum_{t in i} m l / n_i) / D, D = normalizer or S
  seq-mean-token-sum-norm:  sum_t m l / (L_max * D),           D = normalizer or S, L_max = max_response_len
                            or the largest n_i in the batch (Dr.GRPO divides by a constant generation budget:
                            pass ``max_response_len`` = that budget to follow it exactly).
Empty sequences contribute 0 but still count in S (as in TRL and Liger).

Micro-batches and ranks: a batch-local denominator makes the token mean of a step depend on how tokens were
split. Pass ``normalizer`` = the global count (masked tokens, or sequences, over all micro-batches of the step
and all ranks) and sum the micro-batch losses (times the world size if the gradient all-reduce averages) to get
the exact global mean.

Gradients flow to ``logp`` and ``entropy`` only; old_logp, ref_logp and advantages are constants.
Metrics (0-d tensors, masked token means unless noted, computed without a host sync): clip_frac_low
(A < 0, r < 1 - clip_low), clip_frac_high (A > 0, r > 1 + clip_high), clip_frac_dual, ratio_mean, ratio_max,
approx_kl (k3 of the token ratio: r - 1 - log r, an unbiased KL(old || new) estimate), and when given:
kl (the penalty term's KL to the reference), entropy_mean.
"""
from __future__ import annotations

import torch

from ._dispatch import (
    HAS_TRITON,
    acc_dtype,
    check_float,
    check_int,
    check_same_device,
    choose,
    device_guard,
    interpreting,
    tl,
    tl_dtype,
    triton,
)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IS_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
# per-sequence statistics written by the kernel (and the torch path), summed (max for RATIO_MAX) afterwards
LOSS, TOKENS, CLIP_LOW, CLIP_HIGH, CLIP_DUAL, RATIO_SUM, RATIO_MAX, APPROX_KL, KL, ENTROPY = range(10)
NUM_STATS = 10

if HAS_TRITON:
    # the stats columns as compile-time constants for the kernel (a module-level int is not visible inside it)
    (LOSS_T, TOKENS_T, CLIP_LOW_T, CLIP_HIGH_T, CLIP_DUAL_T, RATIO_SUM_T, RATIO_MAX_T, APPROX_KL_T, KL_T,
     ENTROPY_T, NUM_STATS_T) = (tl.constexpr(i) for i in (LOSS, TOKENS, CLIP_LOW, CLIP_HIGH, CLIP_DUAL, RATIO_SUM,
                                                          RATIO_MAX, APPROX_KL, KL, ENTROPY, NUM_STATS))

    @triton.jit
    def _grpo_loss_fwd_bwd(logp_ptr, old_ptr, adv_ptr, mask_ptr, cu_ptr, ref_ptr, ent_ptr, dlogp_ptr, dent_ptr,
                           stats_ptr, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
                           ADV_PER_TOKEN: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr,
                           HAS_ENT: tl.constexpr, DUAL: tl.constexpr, SEQ_LEVEL: tl.constexpr,
                           PER_SEQ_MEAN: tl.constexpr, NEED_DLOGP: tl.constexpr, NEED_DENT: tl.constexpr,
                           BLOCK: tl.constexpr, ACC: tl.constexpr):
        """One program per sequence: (1) masked token count and, for GSPO, the mean log-ratio; (2) per-token
        loss, its gradient (times the per-sequence weight; the global 1/D is applied afterwards) and the
        per-sequence metric sums."""
        seq = tl.program_id(0)
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        n_tok = tl.zeros([BLOCK], ACC)
        lr_sum = tl.zeros([BLOCK], ACC)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            ok = idx < end
            m = tl.load(mask_ptr + idx, mask=ok, other=0.0).to(ACC)
            n_tok += m
            if SEQ_LEVEL:
                lp = tl.load(logp_ptr + idx, mask=ok, other=0.0).to(ACC)
                old = tl.load(old_ptr + idx, mask=ok, other=0.0).to(ACC)
                lr_sum += tl.where(m != 0, m * (lp - old), 0.0)
        n = tl.sum(n_tok, axis=0)
        seq_weight = 1.0
        if PER_SEQ_MEAN:
            seq_weight = tl.where(n > 0, 1.0 / tl.maximum(n, 1e-30), 0.0)
        seq_ratio = 1.0
        if SEQ_LEVEL:
            seq_ratio = tl.exp(tl.sum(lr_sum, axis=0) / tl.maximum(n, 1e-30))
        adv_seq = 0.0
        if not ADV_PER_TOKEN:
            adv_seq = tl.load(adv_ptr + seq).to(ACC)

        loss_acc = tl.zeros([BLOCK], ACC)
        low_acc = tl.zeros([BLOCK], ACC)
        high_acc = tl.zeros([BLOCK], ACC)
        dual_acc = tl.zeros([BLOCK], ACC)
        ratio_acc = tl.zeros([BLOCK], ACC)
        ratio_max = tl.full([BLOCK], float("-inf"), ACC)
        akl_acc = tl.zeros([BLOCK], ACC)
        kl_acc = tl.zeros([BLOCK], ACC)
        ent_acc = tl.zeros([BLOCK], ACC)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            ok = idx < end
            m = tl.load(mask_ptr + idx, mask=ok, other=0.0).to(ACC)
            on = m != 0
            lp = tl.load(logp_ptr + idx, mask=ok, other=0.0).to(ACC)
            old = tl.load(old_ptr + idx, mask=ok, other=0.0).to(ACC)
            if ADV_PER_TOKEN:
                adv = tl.load(adv_ptr + idx, mask=ok, other=0.0).to(ACC)
            else:
                adv = tl.zeros([BLOCK], ACC) + adv_seq
            log_ratio = tl.where(on, lp - old, 0.0)
            ratio_tok = tl.exp(log_ratio)
            if SEQ_LEVEL:
                ratio = tl.zeros([BLOCK], ACC) + seq_ratio
            else:
                ratio = ratio_tok
            ratio_clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
            unclipped_term = -adv * ratio
            clipped_term = -adv * ratio_clipped
            is_clipped = clipped_term > unclipped_term
            loss_t = tl.maximum(unclipped_term, clipped_term)
            dloss_t = tl.where(is_clipped, 0.0, -adv * ratio)
            if DUAL:
                dual_on = (adv < 0) & (loss_t > -dual_clip * adv)
                loss_t = tl.where(dual_on, -dual_clip * adv, loss_t)
                dloss_t = tl.where(dual_on, 0.0, dloss_t)
                dual_acc += tl.where(on & dual_on, m, 0.0)
            if HAS_REF:
                ref = tl.load(ref_ptr + idx, mask=ok, other=0.0).to(ACC)
                diff = tl.where(on, lp - ref, 0.0)
                if KL_EST == 0:
                    kl = diff
                    dkl = tl.zeros([BLOCK], ACC) + 1.0
                elif KL_EST == 1:
                    kl = 0.5 * diff * diff
                    dkl = diff
                else:
                    kl = tl.exp(-diff) + diff - 1.0
                    dkl = 1.0 - tl.exp(-diff)
                loss_t += kl_coef * kl
                dloss_t += kl_coef * dkl
                kl_acc += tl.where(on, m * kl, 0.0)
            if HAS_ENT:
                ent = tl.load(ent_ptr + idx, mask=ok, other=0.0).to(ACC)
                loss_t -= entropy_coef * ent
                ent_acc += tl.where(on, m * ent, 0.0)
            weight = m * seq_weight
            loss_acc += tl.where(on, weight * loss_t, 0.0)
            if NEED_DLOGP:
                tl.store(dlogp_ptr + idx, tl.where(on, weight * dloss_t, 0.0), mask=ok)
            if NEED_DENT:
                tl.store(dent_ptr + idx, -entropy_coef * weight, mask=ok)
            low_acc += tl.where(on & (adv < 0) & (ratio < 1.0 - clip_low), m, 0.0)
            high_acc += tl.where(on & (adv > 0) & (ratio > 1.0 + clip_high), m, 0.0)
            ratio_acc += tl.where(on, m * ratio, 0.0)
            ratio_max = tl.maximum(ratio_max, tl.where(on, ratio, float("-inf")))
            akl_acc += tl.where(on, m * (ratio_tok - 1.0 - log_ratio), 0.0)
        out = stats_ptr + seq * NUM_STATS_T
        tl.store(out + LOSS_T, tl.sum(loss_acc, axis=0))
        tl.store(out + TOKENS_T, n)
        tl.store(out + CLIP_LOW_T, tl.sum(low_acc, axis=0))
        tl.store(out + CLIP_HIGH_T, tl.sum(high_acc, axis=0))
        tl.store(out + CLIP_DUAL_T, tl.sum(dual_acc, axis=0))
        tl.store(out + RATIO_SUM_T, tl.sum(ratio_acc, axis=0))
        tl.store(out + RATIO_MAX_T, tl.max(ratio_max, axis=0))
        tl.store(out + APPROX_KL_T, tl.sum(akl_acc, axis=0))
        tl.store(out + KL_T, tl.sum(kl_acc, axis=0))
        tl.store(out + ENTROPY_T, tl.sum(ent_acc, axis=0))


def _launch_params() -> tuple[int, int]:
    """(BLOCK, num_warps): one program per sequence streams it in 1024-token blocks; tiny blocks in the
    interpreter so tests cover several blocks per sequence."""
    return (32, 1) if interpreting() else (1024, 4)


def _global_scale(stats: torch.Tensor, aggregation: str, normalizer, max_response_len: int | None) -> torch.Tensor:
    """1 / denominator of the aggregation, as a 0-d device tensor (no host sync)."""
    def scalar(value: float) -> torch.Tensor:  # a fill kernel, not a host-to-device copy
        return torch.full((), float(value), dtype=stats.dtype, device=stats.device)

    if isinstance(normalizer, torch.Tensor):
        denom = normalizer.to(device=stats.device, dtype=stats.dtype).reshape(())
    elif normalizer is not None:
        denom = scalar(normalizer)
    elif aggregation == "token-mean":
        denom = stats[:, TOKENS].sum().clamp(min=1.0)
    else:
        denom = scalar(stats.shape[0])
    if aggregation == "seq-mean-token-sum-norm":
        if max_response_len is not None:
            denom = denom * float(max_response_len)
        else:
            denom = denom * stats[:, TOKENS].max().clamp(min=1.0)
    return 1.0 / denom


def _metrics(stats: torch.Tensor, has_ref: bool, has_ent: bool) -> dict[str, torch.Tensor]:
    stats = stats.detach().float()
    tokens = stats[:, TOKENS].sum()
    total = stats.sum(0) / tokens.clamp(min=1.0)
    ratio_max = stats[:, RATIO_MAX].max()
    metrics = {
        "clip_frac_low": total[CLIP_LOW],
        "clip_frac_high": total[CLIP_HIGH],
        "clip_frac_dual": total[CLIP_DUAL],
        "ratio_mean": total[RATIO_SUM],
        "ratio_max": torch.where(tokens > 0, ratio_max, torch.zeros_like(ratio_max)),
        "approx_kl": total[APPROX_KL],
    }
    if has_ref:
        metrics["kl"] = total[KL]
    if has_ent:
        metrics["entropy_mean"] = total[ENTROPY]
    return metrics


class _TritonGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old_logp, advantages, loss_mask, cu_seqlens, ref_logp, opts: dict):
        num_seqs = cu_seqlens.shape[0] - 1
        dtype = acc_dtype(logp.dtype)
        grad_on = opts["grad_enabled"]
        need_dlogp = grad_on and logp.requires_grad
        need_dent = grad_on and entropy is not None and entropy.requires_grad and opts["entropy_coef"] != 0.0
        dlogp = torch.empty(logp.shape, dtype=dtype, device=logp.device) if need_dlogp else None
        dent = torch.empty(logp.shape, dtype=dtype, device=logp.device) if need_dent else None
        stats = torch.empty((num_seqs, NUM_STATS), dtype=dtype, device=logp.device)
        dummy = logp
        block, warps = _launch_params()
        _grpo_loss_fwd_bwd[(num_seqs,)](
            logp, old_logp, advantages, loss_mask, cu_seqlens,
            ref_logp if ref_logp is not None else dummy, entropy if entropy is not None else dummy,
            dlogp if need_dlogp else dummy, dent if need_dent else dummy, stats,
            opts["clip_low"], opts["clip_high"], opts["dual_clip"] or 0.0, opts["kl_coef"], opts["entropy_coef"],
            ADV_PER_TOKEN=advantages.shape[0] == logp.shape[0] and advantages.shape[0] != num_seqs,
            HAS_REF=ref_logp is not None, KL_EST=KL_ESTIMATORS.index(opts["kl_estimator"]),
            HAS_ENT=entropy is not None, DUAL=opts["dual_clip"] is not None,
            SEQ_LEVEL=opts["is_level"] == "sequence", PER_SEQ_MEAN=opts["aggregation"] == "seq-mean-token-mean",
            NEED_DLOGP=need_dlogp, NEED_DENT=need_dent, BLOCK=block, ACC=tl_dtype(dtype), num_warps=warps)
        scale = _global_scale(stats, opts["aggregation"], opts["normalizer"], opts["max_response_len"])
        loss = stats[:, LOSS].sum() * scale
        ctx.save_for_backward(dlogp, dent, scale)
        ctx.logp_dtype = logp.dtype
        ctx.ent_dtype = entropy.dtype if entropy is not None else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        dlogp, dent, scale = ctx.saved_tensors
        factor = g_loss * scale
        d_logp = (dlogp * factor).to(ctx.logp_dtype) if dlogp is not None else None
        d_ent = (dent * factor).to(ctx.ent_dtype) if dent is not None else None
        return d_logp, d_ent, None, None, None, None, None, None


def _torch_grpo_loss(logp, entropy, old_logp, advantages, loss_mask, cu_seqlens, ref_logp, opts: dict):
    """The torch reference: the same math with autograd, vectorized over the flat layout via segment sums."""
    dtype = acc_dtype(logp.dtype)
    num_seqs, total = cu_seqlens.shape[0] - 1, logp.shape[0]
    seq_id = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=logp.device), right=True)

    def seq_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add(0, seq_id, x)

    m = loss_mask.to(dtype)
    on = m != 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def masked(x: torch.Tensor) -> torch.Tensor:  # masked-out tokens may hold -inf/nan: keep them out of autograd
        return torch.where(on, x.to(dtype), zero)

    lp, old = masked(logp), masked(old_logp.detach())
    adv = advantages.detach().to(dtype)
    if not (adv.shape[0] == total and adv.shape[0] != num_seqs):
        adv = adv[seq_id]
    n = seq_sum(m)
    log_ratio = lp - old
    ratio_tok = log_ratio.exp()
    if opts["is_level"] == "sequence":
        seq_ratio = (seq_sum(log_ratio.detach() * m) / n.clamp(min=1e-30)).exp()
        ratio = seq_ratio[seq_id] * (lp - lp.detach()).exp()
    else:
        ratio = ratio_tok
    clipped = ratio.clamp(1.0 - opts["clip_low"], 1.0 + opts["clip_high"])
    loss_t = torch.maximum(-adv * ratio, -adv * clipped)
    stats = torch.zeros(num_seqs, NUM_STATS, dtype=dtype, device=logp.device)
    if opts["dual_clip"] is not None:
        cap = -opts["dual_clip"] * adv
        dual_on = (adv < 0) & (loss_t > cap)
        loss_t = torch.where(dual_on, cap, loss_t)
        stats[:, CLIP_DUAL] = seq_sum(torch.where(on & dual_on, m, zero))
    if ref_logp is not None:
        diff = lp - masked(ref_logp.detach())
        kl = {"k1": lambda: diff, "k2": lambda: 0.5 * diff * diff,
              "k3": lambda: (-diff).exp() + diff - 1.0}[opts["kl_estimator"]]()
        loss_t = loss_t + opts["kl_coef"] * kl
        stats[:, KL] = seq_sum(torch.where(on, m * kl, zero)).detach()
    if entropy is not None:
        ent = masked(entropy)
        loss_t = loss_t - opts["entropy_coef"] * ent
        stats[:, ENTROPY] = seq_sum(torch.where(on, m * ent, zero)).detach()
    weight = m
    if opts["aggregation"] == "seq-mean-token-mean":
        weight = m * torch.where(n > 0, 1.0 / n.clamp(min=1e-30), zero)[seq_id]
    loss_sum = torch.where(on, weight * loss_t, zero).sum()
    ratio_d = ratio.detach()
    stats[:, TOKENS] = n
    stats[:, CLIP_LOW] = seq_sum(torch.where(on & (adv < 0) & (ratio_d < 1.0 - opts["clip_low"]), m, zero))
    stats[:, CLIP_HIGH] = seq_sum(torch.where(on & (adv > 0) & (ratio_d > 1.0 + opts["clip_high"]), m, zero))
    stats[:, RATIO_SUM] = seq_sum(torch.where(on, m * ratio_d, zero))
    ninf = torch.full((num_seqs,), float("-inf"), dtype=dtype, device=logp.device)
    stats[:, RATIO_MAX] = ninf.scatter_reduce(0, seq_id, torch.where(on, ratio_d, ninf[:1].expand(total)), "amax")
    stats[:, APPROX_KL] = seq_sum(torch.where(on, m * (ratio_tok - 1.0 - log_ratio), zero)).detach()
    loss = loss_sum * _global_scale(stats, opts["aggregation"], opts["normalizer"], opts["max_response_len"])
    return loss, stats


def _validate(logp, old_logp, advantages, loss_mask, cu_seqlens, ref_logp, entropy, opts, check: bool) -> None:
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        check_float(name, t)
    for name, t in (("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None:
            check_float(name, t)
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a torch.Tensor, got {type(loss_mask).__name__}")
    check_int("cu_seqlens", cu_seqlens)
    check_same_device("logp", logp, old_logp=old_logp, advantages=advantages, loss_mask=loss_mask,
                      cu_seqlens=cu_seqlens, ref_logp=ref_logp, entropy=entropy)
    if logp.dim() != 1:
        raise ValueError(f"logp must be a flat [T] tensor (packed layout), got shape {tuple(logp.shape)}")
    total = logp.shape[0]
    if total == 0:
        raise ValueError("logp is empty: grpo_loss needs at least one token")
    for name, t in (("old_logp", old_logp), ("loss_mask", loss_mask), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(t.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    num_seqs = cu_seqlens.shape[0] - 1
    if advantages.dim() != 1 or advantages.shape[0] not in (num_seqs, total):
        raise ValueError(f"advantages must be [S]={num_seqs} (per sequence) or [T]={total} (per token), "
                         f"got shape {tuple(advantages.shape)}")
    if opts["aggregation"] not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {opts['aggregation']!r}")
    if opts["is_level"] not in IS_LEVELS:
        raise ValueError(f"is_level must be one of {IS_LEVELS}, got {opts['is_level']!r}")
    if opts["kl_estimator"] not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {opts['kl_estimator']!r}")
    if not 0.0 <= opts["clip_low"] < 1.0 or opts["clip_high"] < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {opts['clip_low']}, {opts['clip_high']}")
    if opts["dual_clip"] is not None and not opts["dual_clip"] > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {opts['dual_clip']}")
    if opts["kl_coef"] != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if opts["entropy_coef"] != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if opts["max_response_len"] is not None and not opts["max_response_len"] > 0:
        raise ValueError(f"max_response_len must be positive, got {opts['max_response_len']}")
    if check:
        cu = cu_seqlens.long()
        ok = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
        if not bool(ok):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={total} "
                             "(pass check=False to skip this check)")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
              cu_seqlens: torch.Tensor, ref_logp: torch.Tensor | None = None, *, clip_low: float = 0.2,
              clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
              kl_estimator: str = "k3", entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
              aggregation: str = "token-mean", is_level: str = "token", max_response_len: int | None = None,
              normalizer: float | torch.Tensor | None = None, check: bool = True, backend: str | None = None):
    """Clipped policy-gradient loss over packed sequences; see the module docstring for the exact math.

    Args:
        logp, old_logp, ref_logp, entropy: [T] float (logp and entropy may require grad).
        advantages: [S] (one per sequence) or [T] (one per token; read per sequence when S == T).
        loss_mask: [T] bool/int/float; 0 drops a token, other values weight it.
        cu_seqlens: [S+1] int32/int64 sequence boundaries.
        max_response_len: Dr.GRPO's constant (``seq-mean-token-sum-norm`` only); None = longest masked length.
        normalizer: replaces the batch-local denominator (token count or sequence count) with a global one.
        check: validate cu_seqlens on the host (one device sync); pass False in the training loop.
        backend: "auto" (default: Triton on CUDA), "torch" or "triton"; overrides ``SRPO_FAST_KERNELS``.

    Returns:
        ``(loss, metrics)``: a 0-d fp32 loss (fp64 for fp64 logp) and a dict of 0-d fp32 metric tensors.
    """
    opts = dict(clip_low=float(clip_low), clip_high=float(clip_high),
                dual_clip=None if dual_clip is None else float(dual_clip), kl_coef=float(kl_coef),
                kl_estimator=kl_estimator, entropy_coef=float(entropy_coef), aggregation=aggregation,
                is_level=is_level, max_response_len=max_response_len, normalizer=normalizer,
                grad_enabled=torch.is_grad_enabled())
    _validate(logp, old_logp, advantages, loss_mask, cu_seqlens, ref_logp, entropy, opts, check)
    # with entropy_coef == 0 the entropy only feeds the metric: no gradient buffer for it
    entropy_in = entropy.detach() if entropy is not None and entropy_coef == 0.0 else entropy
    if choose("grpo_loss", logp, backend).backend == "triton":
        dtype = acc_dtype(logp.dtype)
        mask = loss_mask.to(dtype).contiguous()
        with device_guard(logp):
            loss, stats = _TritonGRPOLoss.apply(
                logp.contiguous(), None if entropy_in is None else entropy_in.contiguous(),
                old_logp.contiguous(), advantages.contiguous(), mask, cu_seqlens.contiguous(),
                None if ref_logp is None else ref_logp.contiguous(), opts)
    else:
        loss, stats = _torch_grpo_loss(logp, entropy_in, old_logp, advantages, loss_mask, cu_seqlens, ref_logp,
                                       opts)
    return loss, _metrics(stats, ref_logp is not None, entropy is not None)


def compile_variants() -> list:
    """The kernel's launches for fp32 and bf16 inputs over a covering set of option combinations: every
    constexpr value appears, alone and together with the others (see ``compile_check``)."""
    from ._variants import KernelVariant, TensorArg

    block, warps = _launch_params()
    off = dict(ADV_PER_TOKEN=False, HAS_REF=False, KL_EST=2, HAS_ENT=False, DUAL=False, SEQ_LEVEL=False,
               PER_SEQ_MEAN=False, NEED_DLOGP=True, NEED_DENT=False)
    cases = {
        "plain": {},
        "all-on": dict(ADV_PER_TOKEN=True, HAS_REF=True, HAS_ENT=True, DUAL=True, SEQ_LEVEL=True, PER_SEQ_MEAN=True,
                       NEED_DENT=True),
        "gspo,k3,ent-metric": dict(HAS_REF=True, HAS_ENT=True, SEQ_LEVEL=True),
        "k1,dual,seq-mean": dict(HAS_REF=True, KL_EST=0, DUAL=True, PER_SEQ_MEAN=True),
        "k2,adv-per-token,ent-grad": dict(HAS_REF=True, KL_EST=1, ADV_PER_TOKEN=True, HAS_ENT=True, NEED_DENT=True),
        "no-grad(eval)": dict(HAS_REF=True, HAS_ENT=True, NEED_DLOGP=False),
    }
    out = []
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        x, f32 = TensorArg(dtype), TensorArg(torch.float32)
        for name, case in cases.items():
            if dname == "fp16" and name not in ("plain", "all-on"):
                continue  # fp16 loads compile like bf16 ones: the two extremes suffice
            args = dict(logp_ptr=x, old_ptr=x, adv_ptr=x, mask_ptr=f32, cu_ptr=TensorArg(torch.int32), ref_ptr=x,
                        ent_ptr=x, dlogp_ptr=f32, dent_ptr=f32, stats_ptr=f32, clip_low=0.2, clip_high=0.28,
                        dual_clip=3.0, kl_coef=0.01, entropy_coef=0.001, BLOCK=block, ACC=tl.float32,
                        **{**off, **case})
            out.append(KernelVariant("grpo_loss", f"fwd_bwd[{dname},{name}]", _grpo_loss_fwd_bwd, args,
                                     num_warps=warps, stream_elems=block, shape=dict(dtype=dname),
                                     fast=dname == "fp32" and name == "all-on"))
    return out
