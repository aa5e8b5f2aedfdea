"""Per-token log-probabilities and entropies from full logits, in one pass over each row.

``token_logprobs(logits [N, V], targets [N])`` returns ``log softmax(logits / T)[n, targets[n]]`` and, optionally,
the entropy of ``softmax(logits / T)`` per row, both in fp32 whatever the input dtype. Why a kernel: the naive
``log_softmax`` + ``gather`` + entropy materializes two or three fp32 copies of ``[N, V]``; here each row is read
once forward (online max / sum-exp / sum p*z) and once backward, and only three floats per row are saved.

Math, with z = logits / T, lse = logsumexp(z), p = softmax(z), H = -sum p log p:
  logp = z[t] - lse;   H = log s - u / s, where s = sum e^(z-m), u = sum e^(z-m) (z-m), m the running max
  dL/dz_j = g_logp (1[j=t] - p_j) - g_ent p_j (log p_j + H);   dL/dlogits = dL/dz / T
"""
from __future__ import annotations

import torch

from ._dispatch import (
    HAS_TRITON,
    acc_dtype,
    check_float,
    check_int,
    check_ndim,
    check_same_device,
    check_targets_in_range,
    check_temperature,
    choose_backend,
    interpreting,
    last_dim_contiguous,
    tl,
    tl_dtype,
    triton,
)

if HAS_TRITON:

    @triton.jit
    def online_softmax_update(m, s, u, z):
        """Fold a [R, B] block of scaled logits into the running row stats (m, s, u), each [R].

        m is the running max, s = sum e^(z-m), u = sum e^(z-m) (z-m); carrying u relative to m (rather than
        sum p*z) keeps the entropy log(s) - u/s free of cancellation when logits are large. Entries equal to
        -inf (masked columns, or -inf logits) contribute nothing.
        """
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        u = alpha * (u + s * tl.where(s > 0, m - m_ref, 0.0))
        e = tl.exp(z - m_ref[:, None])
        u += tl.sum(e * tl.where(e > 0, z - m_ref[:, None], 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        return m_new, s, u

    @triton.jit
    def _token_logprobs_fwd(logits_ptr, targets_ptr, logp_ptr, ent_ptr, lse_ptr, N, V, stride_row, inv_temp,
                            WITH_ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
                            ACC: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        row_base = logits_ptr + rows.to(tl.int64) * stride_row
        m = tl.full([ROWS], float("-inf"), ACC)
        s = tl.zeros([ROWS], ACC)
        u = tl.zeros([ROWS], ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC) * inv_temp
            z = tl.where(cols[None, :] < V, z, float("-inf"))  # padded rows stay finite: no log(0) there
            m, s, u = online_softmax_update(m, s, u, z)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
        z_target = tl.load(row_base + target, mask=row_ok, other=0.0).to(ACC) * inv_temp
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(logp_ptr + rows, z_target - lse, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(ent_ptr + rows, log_s - u / s, mask=row_ok)

    @triton.jit
    def _token_logprobs_bwd(logits_ptr, targets_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dlogits_ptr, N, V,
                            stride_row, stride_drow, inv_temp, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        row_base = logits_ptr + rows.to(tl.int64) * stride_row
        drow_base = dlogits_ptr + rows.to(tl.int64) * stride_drow
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
        g_logp = tl.zeros([ROWS], ACC)
        if HAS_GLOGP:
            g_logp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        g_ent = tl.zeros([ROWS], ACC)
        ent = tl.zeros([ROWS], ACC)
        if HAS_GENT:
            g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC) * inv_temp
            log_p = z - lse[:, None]
            p = tl.exp(log_p)
            d = tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
            if HAS_GENT:
                d -= g_ent[:, None] * p * tl.where(p > 0, log_p + ent[:, None], 0.0)
            tl.store(drow_base[:, None] + cols[None, :], (d * inv_temp).to(dlogits_ptr.dtype.element_ty), mask=mask)


def _launch_config(vocab: int) -> dict:
    """Rows per program, vocab block and warps. Under the interpreter: small blocks (each block iteration
    costs ~1 ms there, and tests want several blocks per row). On CUDA: one row per program streaming the
    vocab in 4-8K blocks for large V (bandwidth-bound), several rows per program for small V."""
    if interpreting():
        return dict(ROWS=4, BLOCK_V=min(256, triton.next_power_of_2(vocab)), num_warps=4)
    block_v = min(8192, triton.next_power_of_2(vocab))
    rows = max(1, min(16, 2048 // block_v))
    warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return dict(ROWS=rows, BLOCK_V=block_v, num_warps=warps)


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
        n, vocab = logits.shape
        out_dtype = acc_dtype(logits.dtype)
        logp = torch.empty(n, dtype=out_dtype, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else lse  # lse is a dummy pointer when unused
        cfg = _launch_config(vocab)
        grid = (triton.cdiv(n, cfg["ROWS"]),)
        _token_logprobs_fwd[grid](logits, targets, logp, ent, lse, n, vocab, logits.stride(0), inv_temp,
                                  WITH_ENTROPY=with_entropy, ACC=tl_dtype(out_dtype), **cfg)
        ctx.save_for_backward(logits, targets, lse, ent if with_entropy else None)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None = None):
        logits, targets, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None
        n, vocab = logits.shape
        dlogits = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
        cfg = _launch_config(vocab)
        g_logp_c = g_logp.contiguous() if g_logp is not None else lse
        g_ent_c = g_ent.contiguous() if g_ent is not None else lse
        _token_logprobs_bwd[(triton.cdiv(n, cfg["ROWS"]),)](
            logits, targets, lse, ent if ent is not None else lse, g_logp_c, g_ent_c, dlogits, n, vocab,
            logits.stride(0), dlogits.stride(0), ctx.inv_temp, HAS_GLOGP=g_logp is not None,
            HAS_GENT=g_ent is not None, ACC=tl_dtype(lse.dtype), **cfg)
        return dlogits, None, None, None


def _row_chunks(n: int, vocab: int, budget_elems: int = 1 << 22):
    step = max(1, budget_elems // vocab)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class _TorchTokenLogprobs(torch.autograd.Function):
    """The torch reference: same math as the kernels, row-chunked so no full-size fp32 copy of the logits
    is ever live (forward keeps lse and entropy per row; backward recomputes softmax per chunk)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
        n, vocab = logits.shape
        out_dtype = acc_dtype(logits.dtype)
        logp = torch.empty(n, dtype=out_dtype, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for rows in _row_chunks(n, vocab):
            z = logits[rows].to(out_dtype) * inv_temp
            lse[rows] = torch.logsumexp(z, dim=-1)
            log_p = z - lse[rows, None]
            logp[rows] = log_p.gather(-1, targets[rows, None]).squeeze(-1)
            if with_entropy:
                p = log_p.exp()
                ent[rows] = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None = None):
        logits, targets, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None
        n, vocab = logits.shape
        dlogits = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
        for rows in _row_chunks(n, vocab):
            log_p = logits[rows].to(lse.dtype) * ctx.inv_temp - lse[rows, None]
            p = log_p.exp()
            d = torch.zeros_like(log_p)
            if g_logp is not None:
                d -= g_logp[rows, None] * p
                d.scatter_add_(-1, targets[rows, None], g_logp[rows, None].to(d.dtype))
            if g_ent is not None:
                d -= g_ent[rows, None] * torch.where(p > 0, p * (log_p + ent[rows, None]), 0.0)
            dlogits[rows] = d * ctx.inv_temp
        return dlogits, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = True, *, check: bool = True):
    """Log-probability of each target token (and the entropy of each row) under ``softmax(logits / T)``.

    Args:
        logits: [N, V], any float dtype; the last dim must be contiguous or it is copied.
        targets: [N] int64 (or int32) token ids in [0, V).
        temperature: T > 0; logits are divided by it (as vLLM's sampler does).
        return_entropy: when False only ``logp`` is returned (a tensor, not a tuple), and no entropy is computed.
        check: verify targets are in range on the host first (one device sync); pass False in hot loops
            whose targets are known good.

    Returns:
        ``(logp, entropy)``, each [N], fp32 (fp64 for fp64 logits); or ``logp`` alone when
        ``return_entropy=False``. Differentiable w.r.t. ``logits``, through both outputs.
    """
    check_float("logits", logits)
    check_int("targets", targets)
    check_ndim("logits", logits, 2)
    check_ndim("targets", targets, 1)
    check_same_device("logits", logits, targets=targets)
    n, vocab = logits.shape
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} rows but logits has {n}")
    if n == 0 or vocab == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    inv_temp = 1.0 / check_temperature(temperature)
    if check:
        check_targets_in_range(targets, vocab)
    logits = last_dim_contiguous(logits)
    targets = targets.to(torch.int64).contiguous()
    fn = _TritonTokenLogprobs if choose_backend(logits.device) == "triton" else _TorchTokenLogprobs
    return fn.apply(logits, targets, inv_temp, bool(return_entropy))


def compile_variants() -> list:
    """Every launch the Triton path can make at the shipped shapes (see ``compile_check``)."""
    from ._variants import DTYPE_NAMES, TOKEN_COUNTS, TRITON_DTYPES, VOCAB_SIZES, KernelVariant, TensorArg

    f32, i64 = TensorArg(torch.float32), TensorArg(torch.int64)
    out = []
    for dtype in TRITON_DTYPES:
        x = TensorArg(dtype)
        for vocab in VOCAB_SIZES:
            cfg = _launch_config(vocab)
            meta = dict(ROWS=cfg["ROWS"], BLOCK_V=cfg["BLOCK_V"])
            for n in TOKEN_COUNTS:
                shape = dict(N=n, V=vocab, dtype=DTYPE_NAMES[dtype])
                tag = f"{DTYPE_NAMES[dtype]},N={n},V={vocab}"
                fast = dtype == torch.bfloat16 and vocab == VOCAB_SIZES[-1] and n == TOKEN_COUNTS[-1]
                for ent in (True, False):
                    out.append(KernelVariant(
                        "token_logprobs", f"fwd[{tag},ent={int(ent)}]", _token_logprobs_fwd,
                        dict(logits_ptr=x, targets_ptr=i64, logp_ptr=f32, ent_ptr=f32, lse_ptr=f32, N=n, V=vocab,
                             stride_row=vocab, inv_temp=1.0, WITH_ENTROPY=ent, ACC=tl.float32, **meta),
                        num_warps=cfg["num_warps"], stream_elems=cfg["ROWS"] * cfg["BLOCK_V"], shape=shape,
                        fast=fast and ent))
                for glogp, gent in ((True, True), (True, False), (False, True)):
                    out.append(KernelVariant(
                        "token_logprobs", f"bwd[{tag},glogp={int(glogp)},gent={int(gent)}]", _token_logprobs_bwd,
                        dict(logits_ptr=x, targets_ptr=i64, lse_ptr=f32, ent_ptr=f32, glogp_ptr=f32, gent_ptr=f32,
                             dlogits_ptr=x, N=n, V=vocab, stride_row=vocab, stride_drow=vocab, inv_temp=1.0,
                             HAS_GLOGP=glogp, HAS_GENT=gent, ACC=tl.float32, **meta),
                        num_warps=cfg["num_warps"], stream_elems=cfg["ROWS"] * cfg["BLOCK_V"], shape=shape,
                        fast=fast and glogp and gent))
    return out
