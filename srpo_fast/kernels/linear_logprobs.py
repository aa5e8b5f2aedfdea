"""Per-token log-probabilities (and entropies) straight from hidden states and the LM head, never forming [N, V].

``linear_token_logprobs(hidden [N, H], weight [V, H], targets [N])`` equals
``token_logprobs(hidden @ weight.T + bias, targets, T)`` but the logits only ever exist as tiles.

Forward (Triton): programs own a block of rows and a contiguous range of vocab tiles; each tile of logits is
computed with ``tl.dot`` (K-loop over H, fp32 accumulation) and folded into running per-row statistics (max,
sum-exp, and the entropy term, see ``token_logprobs.online_softmax_update``); partial statistics of the vocab
ranges are merged afterwards. Programs are ordered so that concurrently running ones share weight tiles in L2.

Backward: the vocab is walked in chunks of C columns. For each chunk a Triton kernel recomputes the logits
tiles (same ``tl.dot``) and writes the logit gradient dz = (g_logp (onehot - p) - g_ent p (log p + H)) / T
into a reused [N, C] buffer; cuBLAS then accumulates d_hidden += dz @ W_c (in fp32) and writes
d_weight[c] = dz^T @ hidden directly (no accumulation across chunks, so no atomics and a deterministic result);
d_bias[c] = column sums of dz.

Peak extra memory (beyond inputs, outputs and their gradients), e = element size of the inputs:
  forward:  12 N S bytes of partial statistics, S = vocab ranges per row (enough for ~4 waves of programs:
            about 4 * SMs * 128 / N, at most V / 256), plus 4 N bytes each for lse and entropy
  backward: 4 N H (fp32 d_hidden accumulator) + e N C (logit-gradient chunk, C = 4096 by default)
            [+ e N H for one matmul product when cuBLAS cannot write fp32 output from half inputs]
  e.g. N = 16k, H = 5120, V = 152,064, bf16: 336 MB + 134 MB = 470 MB, vs 10 GB for the fp32 logits alone.
The torch path (CPU, or ``SRPO_FAST_KERNELS=torch``) uses the same chunked structure in fp32 (so it also holds
an fp32 copy of hidden), its chunk capped at 2^24 / N columns: one [N, C] fp32 block, never [N, V].
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
    choose,
    device_guard,
    dot_precision,
    interpreting,
    tl,
    tl_dtype,
    triton,
)

DEFAULT_CHUNK = 4096

if HAS_TRITON:
    from .token_logprobs import online_softmax_update

    def _configs():
        if interpreting():  # one config; small tiles so tests cover ragged N, V and H edges
            return [triton.Config(dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=2), num_warps=4)]
        return [triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP_N=8), num_warps=w, num_stages=s)
                for bn, bv, bh, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
                                         (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]]

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_temp, HAS_BIAS: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, ACC: tl.constexpr):
        """[BLOCK_N, BLOCK_V] tile of (hidden @ weight.T + bias) / T, accumulated in ACC."""
        row_ok = rows < N
        col_ok = cols < V
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
            b = tl.load(w_cols + ks[:, None], mask=col_ok[None, :] & (ks[:, None] < H), other=0.0)
            if UPCAST:  # the interpreter computes half-precision dots wrongly
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        return acc * inv_temp

    @triton.jit
    def _swizzle(pid, num_row_blocks, num_col_groups, GROUP_N: tl.constexpr):
        """Map a flat program id to (row block, column group) so that consecutive programs share columns."""
        per_group = GROUP_N * num_col_groups
        first = (pid // per_group) * GROUP_N
        size = tl.minimum(num_row_blocks - first, GROUP_N)
        return first + (pid % per_group) % size, (pid % per_group) // size

    @triton.autotune(configs=_configs(), key=["V", "H"])
    @triton.jit
    def _linear_logprobs_fwd(h_ptr, w_ptr, b_ptr, targets_ptr, m_ptr, s_ptr, u_ptr, zt_ptr, N, V, H, stride_h,
                             stride_w, num_splits, inv_temp, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                             PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
        pid_n, split = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
        num_tiles = tl.cdiv(V, BLOCK_V)
        tiles_per_split = tl.cdiv(num_tiles, num_splits)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), ACC)
        s = tl.zeros([BLOCK_N], ACC)
        u = tl.zeros([BLOCK_N], ACC)
        z_target = tl.zeros([BLOCK_N], ACC)
        for tile in range(tile_lo, tile_hi):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_temp, HAS_BIAS,
                             UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, ACC)
            z = tl.where((cols < V)[None, :], z, float("-inf"))
            z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
            m, s, u = online_softmax_update(m, s, u, z)
        out = split * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(u_ptr + out, u, mask=row_ok)
        owns_target = (target >= tile_lo * BLOCK_V) & (target < tile_hi * BLOCK_V)
        tl.store(zt_ptr + rows, z_target, mask=row_ok & owns_target)

    @triton.autotune(configs=_configs(), key=["V", "H"])
    @triton.jit
    def _linear_logprobs_dz(h_ptr, w_ptr, b_ptr, targets_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr, N, V,
                            H, stride_h, stride_w, stride_dz, col_start, width, inv_temp, HAS_BIAS: tl.constexpr,
                            HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
        """Logit-gradient tile for vocab columns [col_start, col_start + width) into dz[:, 0:width]."""
        pid_n, pid_v = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(width, BLOCK_V), GROUP_N)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = col_start + local
        row_ok = rows < N
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_temp, HAS_BIAS, UPCAST,
                         PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, ACC)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        log_p = z - lse[:, None]
        p = tl.exp(log_p)
        d = tl.zeros([BLOCK_N, BLOCK_V], ACC)
        if HAS_GLOGP:
            g_logp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
            d += tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
        if HAS_GENT:
            g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            d -= g_ent[:, None] * p * tl.where(p > 0, log_p + ent[:, None], 0.0)
        mask = row_ok[:, None] & (local < width)[None, :]
        dz_tile = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
        tl.store(dz_tile, (d * inv_temp).to(dz_ptr.dtype.element_ty), mask=mask)


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = interpreting() and dtype in (torch.bfloat16, torch.float16)
    return dict(UPCAST=upcast, PRECISION=dot_precision(dtype), ACC=tl_dtype(acc_dtype(dtype)))


def _num_splits(n: int, vocab: int, device: torch.device) -> int:
    """Vocab ranges per row block: enough programs for ~4 waves on the GPU, each range >= 1 tile of 256."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    row_blocks = triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(4 * sms, row_blocks), triton.cdiv(vocab, 256)))


def _merge_splits(m, s, u):
    """Combine per-vocab-range (max, sum-exp, entropy term) partials [S, N] into lse and entropy [N]."""
    m_all = m.max(0).values
    has = s > 0
    w = torch.where(has, torch.exp(m - m_all), torch.zeros_like(m))
    s_all = (w * s).sum(0)
    u_all = (w * (u + torch.where(has, s * (m - m_all), torch.zeros_like(s)))).sum(0)
    log_s = s_all.log()
    return m_all + log_s, log_s - u_all / s_all


def _triton_forward(hidden, weight, bias, targets, inv_temp):
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dtype = acc_dtype(hidden.dtype)
    splits = _num_splits(n, vocab, hidden.device)
    m, s, u = torch.empty((3, splits, n), dtype=dtype, device=hidden.device)
    z_target = torch.empty(n, dtype=dtype, device=hidden.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)  # noqa: E731
    _linear_logprobs_fwd[grid](hidden, weight, bias if bias is not None else hidden, targets, m, s, u, z_target, n,
                               vocab, hdim, hidden.stride(0), weight.stride(0), splits, inv_temp,
                               HAS_BIAS=bias is not None, **_dot_flags(hidden.dtype))
    lse, ent = _merge_splits(m, s, u)
    return z_target - lse, lse, ent


def _torch_chunk_logits(hidden32, weight, bias, c0, width, inv_temp):
    w = weight[c0:c0 + width].to(hidden32.dtype)
    z = hidden32 @ w.T
    if bias is not None:
        z += bias[c0:c0 + width].to(hidden32.dtype)
    return z * inv_temp


def _torch_chunk(n: int, chunk: int) -> int:
    return max(64, min(chunk, (1 << 24) // max(n, 1)))


def _torch_forward(hidden, weight, bias, targets, inv_temp, chunk):
    """Same online statistics as the kernel, over vocab chunks of fp32 logits (at most ~2^24 elements each)."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dtype = acc_dtype(hidden.dtype)
    hidden32 = hidden.to(dtype)
    chunk = _torch_chunk(n, chunk)
    m = torch.full((n,), float("-inf"), dtype=dtype, device=hidden.device)
    s = torch.zeros_like(m)
    u = torch.zeros_like(m)
    z_target = torch.zeros_like(m)
    for c0 in range(0, vocab, chunk):
        width = min(chunk, vocab - c0)
        z = _torch_chunk_logits(hidden32, weight, bias, c0, width, inv_temp)
        local = targets - c0
        inside = (local >= 0) & (local < width)
        z_target += torch.where(inside, z.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1), 0.0)
        m_new = torch.maximum(m, z.max(1).values)
        m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of -inf logits (masking bias)
        alpha = torch.exp(m - m_ref)
        e = torch.exp(z - m_ref[:, None])
        u = alpha * (u + torch.where(s > 0, s * (m - m_ref), 0.0))
        u += torch.where(e > 0, e * (z - m_ref[:, None]), 0.0).sum(1)
        s = alpha * s + e.sum(1)
        m = m_new
    log_s = s.log()
    lse = m + log_s
    return z_target - lse, lse, log_s - u / s


_MM_OUT_DTYPE_WORKS: dict[str, bool] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32 and a, b possibly half precision, without a half-precision running sum.
    Uses cuBLAS's fp32-output GEMM where this torch has it, else one half-precision product per call."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = acc.device.type
    if acc.is_cuda and _MM_OUT_DTYPE_WORKS.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _MM_OUT_DTYPE_WORKS[key] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_WORKS[key] = False
    acc += a @ b


def _backward(ctx, g_logp, g_ent):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dtype = lse.dtype
    need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    use_triton = ctx.backend == "triton"
    # Triton path: dz in the input dtype feeds cuBLAS directly; torch path: everything in fp32 (fp64)
    dz_dtype = hidden.dtype if use_triton else dtype
    chunk = ctx.chunk if use_triton else _torch_chunk(n, ctx.chunk)
    h_mm = hidden if use_triton else hidden.to(dtype)
    g_logp_c = g_logp.contiguous() if g_logp is not None else None
    g_ent_c = g_ent.contiguous() if g_ent is not None else None
    d_hidden = torch.zeros((n, hdim), dtype=dtype, device=hidden.device) if need_dh else None
    d_weight = torch.empty_like(weight) if need_dw else None
    d_bias = torch.empty(vocab, dtype=dtype, device=hidden.device) if need_db else None
    buffer = torch.empty((n, min(chunk, vocab)), dtype=dz_dtype, device=hidden.device)
    for c0 in range(0, vocab, chunk):
        width = min(chunk, vocab - c0)
        dz = buffer[:, :width]
        if use_triton:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)  # noqa
            _linear_logprobs_dz[grid](
                hidden, weight, bias if bias is not None else hidden, targets, lse, ent,
                g_logp_c if g_logp_c is not None else lse, g_ent_c if g_ent_c is not None else lse, dz, n, vocab,
                hdim, hidden.stride(0), weight.stride(0), dz.stride(0), c0, width, ctx.inv_temp,
                HAS_BIAS=bias is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
                **_dot_flags(hidden.dtype))
        else:
            log_p = _torch_chunk_logits(h_mm, weight, bias, c0, width, ctx.inv_temp) - lse[:, None]
            p = log_p.exp()
            d = torch.zeros_like(log_p)
            if g_logp is not None:
                d -= g_logp_c[:, None] * p
                local = targets - c0
                inside = (local >= 0) & (local < width)
                d.scatter_add_(1, local.clamp(0, width - 1)[:, None], torch.where(inside, g_logp_c, 0.0)[:, None])
            if g_ent is not None:
                d -= g_ent_c[:, None] * torch.where(p > 0, p * (log_p + ent[:, None]), 0.0)
            dz.copy_(d * ctx.inv_temp)
        w_c = weight[c0:c0 + width]
        if need_dh:
            _accumulate_mm(d_hidden, dz, w_c if use_triton else w_c.to(dtype))
        if need_dw:
            if use_triton:
                torch.mm(dz.T, h_mm, out=d_weight[c0:c0 + width])
            else:
                d_weight[c0:c0 + width] = dz.T @ h_mm
        if need_db:
            d_bias[c0:c0 + width] = dz.sum(0, dtype=dtype)
    return (d_hidden.to(hidden.dtype) if need_dh else None, d_weight,
            d_bias.to(bias.dtype) if need_db else None)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp: float, with_entropy: bool, backend: str, chunk: int):
        if backend == "triton":
            logp, lse, ent = _triton_forward(hidden, weight, bias, targets, inv_temp)
        else:
            logp, lse, ent = _torch_forward(hidden, weight, bias, targets, inv_temp, chunk)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.inv_temp, ctx.backend, ctx.chunk = inv_temp, backend, chunk
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        if g_logp is None and g_ent is None:
            return (None,) * 8
        with device_guard(g_logp if g_logp is not None else g_ent):
            d_hidden, d_weight, d_bias = _backward(ctx, g_logp, g_ent)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, return_entropy: bool = True, bias: torch.Tensor | None = None,
                          *, check: bool = True, chunk_size: int = DEFAULT_CHUNK, backend: str | None = None):
    """``token_logprobs(hidden @ weight.T + bias, targets, temperature)`` without materializing the logits.

    Args:
        hidden: [N, H] float (the last hidden states); weight: [V, H] (the LM head), same dtype;
        bias: optional [V]. The last dims must be contiguous (they are copied otherwise).
        targets: [N] int64 (or int32) in [0, V).
        temperature: T > 0 dividing the logits.
        return_entropy: False returns ``logp`` alone (a tensor), as ``token_logprobs`` does.
        check: verify the targets' range on the host (one device sync); False skips it.
        chunk_size: vocab columns per backward chunk (memory ``e * N * chunk_size``; see the module docstring).
        backend: "auto" (default: Triton on CUDA), "torch" or "triton"; overrides ``SRPO_FAST_KERNELS``.
            fp32 inputs use tf32 tensor cores when ``torch.get_float32_matmul_precision()`` allows it, else the
            torch reference (with a one-time warning); fp64 on CUDA always runs the torch reference.

    Returns:
        ``(logp, entropy)`` [N] each, fp32 (fp64 for fp64 inputs), or ``logp``; differentiable w.r.t.
        hidden, weight and bias.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_int("targets", targets)
    check_ndim("hidden", hidden, 2)
    check_ndim("weight", weight, 2)
    check_ndim("targets", targets, 1)
    check_same_device("hidden", hidden, weight=weight, targets=targets, bias=bias)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hdim:
        raise ValueError(f"weight must be [V, H={hdim}], got shape {tuple(weight.shape)}")
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} rows but hidden has {n}")
    if n == 0 or hdim == 0 or vocab == 0:
        raise ValueError(f"empty input: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must be [V={vocab}], got shape {tuple(bias.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 256 and chunk_size % 256 == 0):
        raise ValueError(f"chunk_size must be a positive multiple of 256, got {chunk_size}")
    inv_temp = 1.0 / check_temperature(temperature)
    if check:
        check_targets_in_range(targets, vocab)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    backend = choose("linear_token_logprobs", hidden, backend).backend
    targets = targets.to(torch.int64).contiguous()
    with device_guard(hidden):
        return _LinearTokenLogprobs.apply(hidden, weight, bias, targets, inv_temp, bool(return_entropy), backend,
                                          chunk_size)


def compile_variants() -> list:
    """Every autotune candidate of the forward and logit-gradient kernels at the shipped shapes, for each dtype
    the dispatcher sends here (fp32 as tf32), so the compile check sees each config the autotuner may pick.
    Hidden sizes and vocabularies all specialize alike (multiples of 16); token counts differ (see _variants)."""
    import types
    from unittest import mock

    from ._dispatch import GEMM_MIN_CAPABILITY
    from ._variants import DTYPE_NAMES, HIDDEN_SIZES, VOCAB_SIZES, KernelVariant, TensorArg

    f32, i64 = TensorArg(torch.float32), TensorArg(torch.int64)
    hdim, vocab = HIDDEN_SIZES[1], VOCAB_SIZES[1]
    plans = [(torch.bfloat16, 4097, False), (torch.bfloat16, 65536, False), (torch.bfloat16, 65536, True),
             (torch.float16, 65536, False), (torch.float32, 65536, False)]
    out = []
    for dtype, n, bias in plans:
        x = TensorArg(dtype)
        flags = dict(UPCAST=False, PRECISION="tf32" if dtype == torch.float32 else None, ACC=tl.float32)
        with mock.patch.object(torch.cuda, "get_device_properties",
                               lambda device=None: types.SimpleNamespace(multi_processor_count=132)):
            splits = _num_splits(n, vocab, torch.device("cuda", 0))
        tag = f"{DTYPE_NAMES[dtype]},N={n}{',bias' if bias else ''}"
        shape = dict(N=n, H=hdim, V=vocab, dtype=DTYPE_NAMES[dtype])
        min_arch = 10 * GEMM_MIN_CAPABILITY[dtype][0] + GEMM_MIN_CAPABILITY[dtype][1]
        for ci, c in enumerate(_linear_logprobs_fwd.configs):
            kw = c.kwargs
            ctag = f"BN{kw['BLOCK_N']}_BV{kw['BLOCK_V']}_BH{kw['BLOCK_H']}_w{c.num_warps}_s{c.num_stages}"
            fast = dtype == torch.bfloat16 and n == 65536 and not bias and ci == 0
            out.append(KernelVariant(
                "linear_logprobs", f"fwd[{tag},{ctag}]", _linear_logprobs_fwd,
                dict(h_ptr=x, w_ptr=x, b_ptr=x, targets_ptr=i64, m_ptr=f32, s_ptr=f32, u_ptr=f32, zt_ptr=f32, N=n,
                     V=vocab, H=hdim, stride_h=hdim, stride_w=hdim, num_splits=splits, inv_temp=1.0,
                     HAS_BIAS=bias, **flags, **kw),
                num_warps=c.num_warps, num_stages=c.num_stages, gemm=True, group=f"fwd[{tag}]", shape=shape,
                min_arch=min_arch, fast=fast))
            for glogp, gent in ((True, True), (True, False)):
                if bias and not (glogp and gent):
                    continue
                out.append(KernelVariant(
                    "linear_logprobs", f"dz[{tag},glogp={int(glogp)},gent={int(gent)},{ctag}]", _linear_logprobs_dz,
                    dict(h_ptr=x, w_ptr=x, b_ptr=x, targets_ptr=i64, lse_ptr=f32, ent_ptr=f32, glogp_ptr=f32,
                         gent_ptr=f32, dz_ptr=x, N=n, V=vocab, H=hdim, stride_h=hdim, stride_w=hdim,
                         stride_dz=DEFAULT_CHUNK, col_start=0, width=DEFAULT_CHUNK, inv_temp=1.0, HAS_BIAS=bias,
                         HAS_GLOGP=glogp, HAS_GENT=gent, **flags, **kw),
                    num_warps=c.num_warps, num_stages=c.num_stages, gemm=True,
                    group=f"dz[{tag},glogp={int(glogp)},gent={int(gent)}]", shape=shape, min_arch=min_arch,
                    fast=fast and gent))
    return out
