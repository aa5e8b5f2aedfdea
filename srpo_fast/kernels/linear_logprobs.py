"""Per-token log-probabilities (and entropies) straight from hidden states and the LM head, never forming [N, V].

``linear_token_logprobs(hidden [N, H], weight [V, H], targets [N])`` equals
``token_logprobs(hidden @ weight.T + bias, targets, T)`` but the logits only ever exist as tiles.

Forward (Triton): programs own a block of rows and a contiguous range of vocab tiles (enough ranges for ~4
waves of programs); each [BLOCK_N, BLOCK_V] logits tile is a ``tl.dot`` K-loop over H (fp32 accumulation) folded
into running per-row statistics in base 2 (max m, s = sum 2^(z-m), u = sum 2^(z-m) (z-m), with z the logits
times log2(e)/T: one FFMA and one ``exp2`` per logit). Only the last vocab tile is masked (it is peeled off the
loop); rows and columns past the edge are clamped, so every load in the steady loop is unmasked. A masked or
-inf logit is the finite sentinel -1e30 (bias is pre-scaled and clamped on the host), so no ``where`` guards
the update. The target logit is not picked out of every tile: one gather-dot per row (``hidden[n] .
weight[t_n]``) computes it. Partial statistics of the vocab ranges are merged afterwards ([S, N] torch ops).

Backward: the vocab is walked in chunks of C columns. For each chunk a Triton kernel recomputes the logits tiles
and writes dz = p (K_n + B_n log2 p) + G_n 1[j = t_n] (K, B, G per-row constants folding g_logp, g_ent, the
entropy, ln 2 and 1/T; see ``_row_coefficients``) into a reused [N, C] buffer; cuBLAS then accumulates
d_hidden += dz @ W_c straight into an fp32 accumulator (an fp32-output GEMM, ``out_dtype=float32``: no
half-precision product, no temporary) and writes d_weight[c] = dz^T @ hidden directly (no accumulation across
chunks: no atomics, deterministic); d_bias[c] = column sums of dz.

Memory: C is chosen from a budget of 5% of the fp32 logits (N V 4 bytes), e = element size of the inputs:
  backward extra = 4 N H (fp32 d_hidden accumulator, only for half-precision inputs) + e N C (dz chunk)
                   <= 0.05 * 4 N V   <=>   C = floor((0.2 V - 4 H) / e / 256) * 256   (at least 256)
  e.g. bf16, V = 152,064: C = 11,008 / 7,936 / 4,864 for H = 2048 / 3584 / 5120; at N = 16k, H = 5120 that is
  336 MB + 159 MB = 495 MB of the 9.97 GB fp32 logits (4.97%). The bound holds whenever 0.2 V - 4 H >= 256 e
  (V >= 20 H + 2560 for bf16); below that C = 256 and the extra memory is 4 N H + 256 e N.
  forward extra = 12 N S bytes of partial statistics (S vocab ranges, <= 4 SMs 128 / N + 1) + 8 N bytes.
The per-chunk fp32 round trip of d_hidden is the GEMM's own epilogue read/write of C (beta = 1), V / C times:
2 * 4 N H V / C bytes (~5.5 GB at N = 16k, H = 3584, ~1.7 ms at 3.35 TB/s, overlapped with a 2NHV-flop GEMM).

Gradient filter (``grad_filter_eps``, off by default): as Apple's CCE does, a dz tile whose every entry has
|1[j = t] - p_j| < eps (no target in it, every probability below eps) is dropped. The dz kernel writes one keep
flag per tile, and two Triton GEMMs (``_dhidden_skip``: fp32 d_hidden accumulated in place; ``_dweight_skip``:
each vocab tile's d_weight rows written by one program, deterministic) multiply only the kept tiles, so a dropped
tile costs no tensor-core time in the backward GEMMs. Each dropped entry is at most
eps (|g_logp| + |g_ent| (|ln eps| + H)) / T in magnitude, so d_hidden[n, k] moves by at most that times
sum_j |W[j, k]| (and d_weight[j, k] by at most sum_n of it times |hidden[n, k]|); the tests assert this bound.
Measured at eps = 2^-12 on small confident (peaked) problems: max error 1.6e-3 (16 x 32 tiles, interpreter) /
5.7e-4 (128 x 128, torch path) of the gradient's max; on random logits nothing is dropped (docs/linear_logprobs.md).
The exact backward is the default.

The torch path (CPU, or ``SRPO_FAST_KERNELS=torch``) uses the same chunked structure in fp32 (so it also holds
an fp32 copy of hidden), its chunk capped at 2^24 / N columns: one [N, C] fp32 block, never [N, V]; its filter
works on 128 x 128 tiles.
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

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG = -1e30  # the finite "minus infinity" of masked and -inf logits (base-2 units): 0 * NEG stays 0
MEMORY_BUDGET = 0.05  # backward extra memory, as a fraction of the fp32 logits N * V * 4 bytes
N_BUCKETS = tuple(1 << k for k in range(8, 17))  # autotune buckets of N: 256 ... 65536 (larger N use the last)
TORCH_FILTER_TILE = 128
TARGET_ROWS = 8  # rows per program of the target gather-dot on the GPU (4 warps, BLOCK_H up to 256)

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages): every one compiles for sm_90 and sm_80 without spilling
# (benchmarks/results kernel compile check); 128 x 256 tiles and 4-warp 128 x 128 tiles spilled and are gone.
GPU_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
               (64, 128, 64, 4, 4))


def n_bucket(n: int) -> int:
    """The autotune key's N: the next power of two in [256, 65536], so a config chosen for one micro-batch
    size serves every size in its bucket, and ``prewarm`` can tune every bucket before training starts."""
    return min(N_BUCKETS[-1], max(N_BUCKETS[0], 1 << max(0, int(n) - 1).bit_length()))


if HAS_TRITON:
    _NEG = tl.constexpr(NEG)

    def _configs():
        if interpreting():  # one config; small tiles so tests cover ragged N, V and H edges
            return [triton.Config(dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=2), num_warps=4)]
        return [triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP_N=8), num_warps=w, num_stages=s)
                for bn, bv, bh, w, s in GPU_CONFIGS]

    @triton.jit
    def _logits_tile(h_rows, w_cols, H, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
        """Raw [BLOCK_N, BLOCK_V] tile hidden[rows] @ weight[cols].T in ACC. h_rows / w_cols point at rows that
        exist (clamped by the caller), so only the H edge can need a mask (EVEN_H: it does not)."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            if EVEN_H:
                a = tl.load(h_rows[:, None] + ks[None, :])
                b = tl.load(w_cols[None, :] + ks[:, None])
            else:
                a = tl.load(h_rows[:, None] + ks[None, :], mask=ks[None, :] < H, other=0.0)
                b = tl.load(w_cols[None, :] + ks[:, None], mask=ks[:, None] < H, other=0.0)
            if UPCAST:  # the interpreter computes half-precision dots wrongly
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _scaled_logits(acc, b2_ptr, cols, cols_c, V, scale2, HAS_BIAS: tl.constexpr, MASK_COLS: tl.constexpr):
        """Logits in base-2 units, z = (acc + bias) log2(e) / T; NEG past the vocab edge (MASK_COLS)."""
        z = acc * scale2
        if HAS_BIAS:
            z += tl.load(b2_ptr + cols_c)[None, :]
        if MASK_COLS:
            z = tl.where((cols < V)[None, :], z, _NEG)
        return z

    @triton.jit
    def _fold(m, s, u, z, m_tile):
        """Fold a tile z (>= NEG everywhere, base-2 units) with row maxima m_tile into (m, s, u)."""
        m_new = tl.maximum(m, m_tile)
        shift = m - m_new
        alpha = tl.exp2(shift)
        t = z - m_new[:, None]
        e = tl.exp2(t)
        u = alpha * (u + s * shift) + tl.sum(e * t, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        return m_new, s, u

    @triton.jit
    def _swizzle(pid, num_row_blocks, num_col_groups, GROUP_N: tl.constexpr):
        """Map a flat program id to (row block, column group) so that consecutive programs share columns."""
        per_group = GROUP_N * num_col_groups
        first = (pid // per_group) * GROUP_N
        size = tl.minimum(num_row_blocks - first, GROUP_N)
        return first + (pid % per_group) % size, (pid % per_group) // size

    @triton.autotune(configs=_configs(), key=["V", "H", "n_bucket"])
    @triton.heuristics(dict(EVEN_H=lambda args: args["H"] % args["BLOCK_H"] == 0))
    @triton.jit
    def _linear_logprobs_fwd(h_ptr, w_ptr, b2_ptr, m_ptr, s_ptr, u_ptr, N, V, H, stride_h, stride_w, num_splits,
                             n_bucket, scale2, HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
                             PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
        """Per-row (m, s, u) over one vocab range, into row ``split`` of the [S, N] partials."""
        pid_n, split = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
        num_tiles = tl.cdiv(V, BLOCK_V)
        tiles_per_split = tl.cdiv(num_tiles, num_splits)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
        full_hi = tl.minimum(tile_hi, V // BLOCK_V)  # tiles lying wholly inside the vocabulary
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        h_rows = h_ptr + tl.minimum(rows, N - 1).to(tl.int64) * stride_h
        m = tl.full([BLOCK_N], _NEG, ACC)
        s = tl.zeros([BLOCK_N], ACC)
        u = tl.zeros([BLOCK_N], ACC)
        for tile in range(tile_lo, full_hi):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            acc = _logits_tile(h_rows, w_ptr + cols.to(tl.int64) * stride_w, H, EVEN_H, UPCAST, PRECISION,
                               BLOCK_N, BLOCK_V, BLOCK_H, ACC)
            if HAS_BIAS:
                z = _scaled_logits(acc, b2_ptr, cols, cols, V, scale2, True, False)
                m, s, u = _fold(m, s, u, z, tl.max(z, axis=1))
            else:  # the row max of the raw tile, scaled once per row: one FFMA per logit for z - m
                m, s, u = _fold(m, s, u, acc * scale2, tl.max(acc, axis=1) * scale2)
        for tile in range(full_hi, tile_hi):  # the ragged last tile, at most once
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            cols_c = tl.minimum(cols, V - 1)
            acc = _logits_tile(h_rows, w_ptr + cols_c.to(tl.int64) * stride_w, H, EVEN_H, UPCAST, PRECISION,
                               BLOCK_N, BLOCK_V, BLOCK_H, ACC)
            z = _scaled_logits(acc, b2_ptr, cols, cols_c, V, scale2, HAS_BIAS, True)
            m, s, u = _fold(m, s, u, z, tl.max(z, axis=1))
        out = split * N + rows
        row_ok = rows < N
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(u_ptr + out, u, mask=row_ok)

    @triton.jit
    def _target_logits(h_ptr, w_ptr, b_ptr, targets_ptr, out_ptr, N, H, stride_h, stride_w, inv_temp,
                       HAS_BIAS: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
        """z[t_n] = (hidden[n] . weight[t_n] + bias[t_n]) / T: one gather-dot per row, in ACC."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
        h_rows = h_ptr + rows.to(tl.int64) * stride_h
        w_rows = w_ptr + target * stride_w
        acc = tl.zeros([ROWS], ACC)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            mask = row_ok[:, None] & (ks[None, :] < H)
            a = tl.load(h_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(ACC)
            b = tl.load(w_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(ACC)
            acc += tl.sum(a * b, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + target, mask=row_ok, other=0.0).to(ACC)
        tl.store(out_ptr + rows, acc * inv_temp, mask=row_ok)

    @triton.autotune(configs=_configs(), key=["V", "H", "n_bucket"])
    @triton.heuristics(dict(EVEN_H=lambda args: args["H"] % args["BLOCK_H"] == 0))
    @triton.jit
    def _linear_logprobs_dz(h_ptr, w_ptr, b2_ptr, targets_ptr, lse2_ptr, coef_ptr, dz_ptr, flags_ptr, N, V, H,
                            stride_h, stride_w, stride_dz, col_start, width, n_bucket, scale2, filter_eps,
                            HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
                            FILTER: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
        """Logit-gradient tile for vocab columns [col_start, col_start + width) into dz[:, 0:width].

        dz = p (K + B log2 p) + G 1[j = t] with p = 2^(z - lse2); coef holds the per-row K, B, G ([3, N])."""
        num_col_tiles = tl.cdiv(width, BLOCK_V)
        pid_n, pid_v = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_col_tiles, GROUP_N)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = col_start + local
        cols_c = tl.minimum(cols, V - 1)
        rows_c = tl.minimum(rows, N - 1)
        acc = _logits_tile(h_ptr + rows_c.to(tl.int64) * stride_h, w_ptr + cols_c.to(tl.int64) * stride_w, H,
                           EVEN_H, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, ACC)
        log2_p = _scaled_logits(acc, b2_ptr, cols, cols_c, V, scale2, HAS_BIAS, False) \
            - tl.load(lse2_ptr + rows_c)[:, None]
        p = tl.exp2(log2_p)
        if HAS_GENT:
            d = p * (tl.load(coef_ptr + N + rows_c)[:, None] * log2_p + tl.load(coef_ptr + rows_c)[:, None])
        else:
            d = p * tl.load(coef_ptr + rows_c)[:, None]
        if HAS_GLOGP or FILTER:
            is_target = cols[None, :] == tl.load(targets_ptr + rows_c)[:, None]
        if HAS_GLOGP:
            d = tl.where(is_target, d + tl.load(coef_ptr + 2 * N + rows_c)[:, None], d)
        mask = (rows < N)[:, None] & (local < width)[None, :]
        if FILTER:  # keep the tile if it holds a target or any probability >= eps (as CCE's filter)
            keep = tl.max(tl.where(is_target | (p >= filter_eps), 1, 0).to(tl.int32)) > 0
            d = tl.where(keep, d, 0.0)
            tl.store(flags_ptr + pid_n * num_col_tiles + pid_v, keep.to(tl.int8))
        dz_tile = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
        tl.store(dz_tile, d.to(dz_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _dhidden_skip(dz_ptr, w_ptr, dh_ptr, flags_ptr, N, H, width, col_start, stride_dz, stride_w, stride_dh,
                      ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                      TILE_N: tl.constexpr, TILE_V: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_K: tl.constexpr):
        """d_hidden[rows, hcols] (+)= sum over the chunk's kept vocab tiles of dz[rows, tile] @ W[tile, hcols],
        in ACC (fp32); a (TILE_N x TILE_V) dz tile whose flag is 0 (filtered) is skipped, not multiplied."""
        pid_n = tl.program_id(0)
        rows = pid_n * TILE_N + tl.arange(0, TILE_N)
        hcols = tl.program_id(1) * BLOCK_HO + tl.arange(0, BLOCK_HO)
        row_ok = rows < N
        h_ok = hcols < H
        out = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + hcols[None, :]
        if ACCUMULATE:
            acc = tl.load(out, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        else:
            acc = tl.zeros([TILE_N, BLOCK_HO], ACC)
        num_tiles = tl.cdiv(width, TILE_V)
        for vt in range(0, num_tiles):
            if tl.load(flags_ptr + pid_n * num_tiles + vt) != 0:
                for kk in range(0, TILE_V, BLOCK_K):
                    ks = vt * TILE_V + kk + tl.arange(0, BLOCK_K)
                    k_ok = ks < width
                    a = tl.load(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + ks[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_ptr + (col_start + ks).to(tl.int64)[:, None] * stride_w + hcols[None, :],
                                mask=k_ok[:, None] & h_ok[None, :], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(out, acc, mask=row_ok[:, None] & h_ok[None, :])

    @triton.jit
    def _dweight_skip(dz_ptr, h_ptr, dw_ptr, flags_ptr, N, H, width, col_start, stride_dz, stride_h, stride_dw,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, TILE_N: tl.constexpr,
                      TILE_V: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_K: tl.constexpr):
        """d_weight[tile, hcols] = sum over row blocks whose dz tile was kept of dz[rows, tile]^T @ hidden[rows,
        hcols]; filtered tiles are skipped. Each vocab tile is one program's alone: no atomics, deterministic."""
        pid_v = tl.program_id(0)
        local = pid_v * TILE_V + tl.arange(0, TILE_V)
        hcols = tl.program_id(1) * BLOCK_HO + tl.arange(0, BLOCK_HO)
        v_ok = local < width
        h_ok = hcols < H
        num_tiles = tl.cdiv(width, TILE_V)
        acc = tl.zeros([TILE_V, BLOCK_HO], ACC)
        for rb in range(0, tl.cdiv(N, TILE_N)):
            if tl.load(flags_ptr + rb * num_tiles + pid_v) != 0:
                for kk in range(0, TILE_N, BLOCK_K):
                    rows = rb * TILE_N + kk + tl.arange(0, BLOCK_K)
                    r_ok = rows < N
                    a = tl.load(dz_ptr + rows.to(tl.int64)[None, :] * stride_dz + local[:, None],
                                mask=v_ok[:, None] & r_ok[None, :], other=0.0)
                    b = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + hcols[None, :],
                                mask=r_ok[:, None] & h_ok[None, :], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out = dw_ptr + (col_start + local).to(tl.int64)[:, None] * stride_dw + hcols[None, :]
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=v_ok[:, None] & h_ok[None, :])

def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = interpreting() and dtype in (torch.bfloat16, torch.float16)
    return dict(UPCAST=upcast, PRECISION=dot_precision(dtype), ACC=tl_dtype(acc_dtype(dtype)))


def num_splits(n: int, vocab: int, sms: int) -> int:
    """Vocab ranges per row block: enough programs for ~4 waves on ``sms`` SMs, each range >= 1 tile of 256."""
    row_blocks = -(-n // 128)
    return max(1, min(-(-4 * sms // row_blocks), -(-vocab // 256)))


def _num_splits(n: int, vocab: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return num_splits(n, vocab, sms)


def backward_chunk(hdim: int, vocab: int, element_size: int) -> int:
    """Vocab columns per backward chunk: the largest multiple of 256 keeping 4 N H + e N C within
    ``MEMORY_BUDGET`` of the fp32 logits (4 N V bytes); at least 256 and at most V rounded up to 256."""
    cols = (MEMORY_BUDGET * 4 * vocab - 4 * hdim) / element_size
    return int(min(max(256, cols // 256 * 256), -(-vocab // 256) * 256))


def _merge_splits(m, s, u):
    """Combine per-vocab-range base-2 partials [S, N] (max m, s = sum 2^(z-m), u = sum 2^(z-m) (z-m); an empty
    range has m = NEG, s = 0) into the base-2 log-sum-exp and the (natural-log) entropy, [N] each."""
    m_all = m.max(0).values
    shift = m - m_all
    w = torch.exp2(shift)
    s_all = (w * s).sum(0)
    u_all = (w * (u + s * shift)).sum(0)
    log2_s = s_all.log2()
    return m_all + log2_s, LN2 * (log2_s - u_all / s_all)


def _scaled_bias(bias, inv_temp, dtype):
    """bias * log2(e) / T in the accumulation dtype, -inf clamped to the finite NEG sentinel."""
    return None if bias is None else (bias.to(dtype) * (LOG2E * inv_temp)).clamp_min(NEG).contiguous()


def _target_logit(hidden, weight, bias, targets, inv_temp, dtype):
    n, hdim = hidden.shape
    out = torch.empty(n, dtype=dtype, device=hidden.device)
    rows = 16 if interpreting() else TARGET_ROWS
    _target_logits[(triton.cdiv(n, rows),)](hidden, weight, bias if bias is not None else hidden, targets, out, n,
                                            hdim, hidden.stride(0), weight.stride(0), inv_temp,
                                            HAS_BIAS=bias is not None, ACC=tl_dtype(dtype), ROWS=rows,
                                            BLOCK_H=min(256, triton.next_power_of_2(hdim)), num_warps=4)
    return out


def _triton_forward(hidden, weight, bias, targets, inv_temp):
    """(logp, base-2 lse, entropy) [N] each."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dtype = acc_dtype(hidden.dtype)
    splits = _num_splits(n, vocab, hidden.device)
    m, s, u = torch.empty((3, splits, n), dtype=dtype, device=hidden.device)
    b2 = _scaled_bias(bias, inv_temp, dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)  # noqa: E731
    _linear_logprobs_fwd[grid](hidden, weight, b2 if b2 is not None else hidden, m, s, u, n, vocab, hdim,
                               hidden.stride(0), weight.stride(0), splits, n_bucket(n), LOG2E * inv_temp,
                               HAS_BIAS=bias is not None, **_dot_flags(hidden.dtype))
    lse2, ent = _merge_splits(m, s, u)
    z_target = _target_logit(hidden, weight, bias, targets, inv_temp, dtype)
    return z_target - LN2 * lse2, lse2, ent


def _torch_chunk_logits(hidden32, weight, bias, c0, width, inv_temp):
    w = weight[c0:c0 + width].to(hidden32.dtype)
    z = hidden32 @ w.T
    if bias is not None:
        z += bias[c0:c0 + width].to(hidden32.dtype)
    return z * inv_temp


def _torch_chunk(n: int, chunk: int) -> int:
    return max(64, min(chunk, (1 << 24) // max(n, 1)))


def _torch_forward(hidden, weight, bias, targets, inv_temp, chunk):
    """Same online statistics as the kernel (natural units), over vocab chunks of fp32 logits (<= 2^24 each)."""
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
    return z_target - lse, lse * LOG2E, log_s - u / s


_OUT_DTYPE_MM: dict[str, bool] = {}  # device type -> whether this torch has the fp32-output half GEMM


def _mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """acc (+)= a @ b with acc fp32 and a, b possibly half precision: cuBLAS's fp32-output GEMM on CUDA (beta 0
    for the first chunk, 1 after: no half-precision product, no temporary) where this torch has ``out_dtype``;
    otherwise (older torch, CPU) one half-precision product per call, added in fp32."""
    if a.dtype == acc.dtype:
        if accumulate:
            acc.addmm_(a, b)
        else:
            torch.mm(a, b, out=acc)
        return
    if acc.is_cuda and _OUT_DTYPE_MM.get("cuda", True):
        try:
            if accumulate:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            else:
                torch.mm(a, b, out_dtype=acc.dtype, out=acc)
            _OUT_DTYPE_MM["cuda"] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM["cuda"] = False
    if accumulate:
        acc += a @ b
    else:
        acc.copy_(a @ b)


def _row_coefficients(lse2, ent, g_logp, g_ent, inv_temp, dtype):
    """[3, N] per-row K, B, G with dlogits = p (K + B log2 p) + G 1[j = t]:
    dL/dz = g_logp (1[t] - p) - g_ent p (ln p + H), ln p = ln2 log2 p, and dlogits = dL/dz / T."""
    g_l = g_logp.to(dtype) if g_logp is not None else torch.zeros_like(lse2)
    g_e = g_ent.to(dtype) if g_ent is not None else torch.zeros_like(lse2)
    return torch.stack([-(g_l + g_e * ent) * inv_temp, -g_e * (LN2 * inv_temp), g_l * inv_temp]).contiguous()


def _torch_filter(d: torch.Tensor, p: torch.Tensor, is_target: torch.Tensor, eps: float) -> None:
    """Zero every TORCH_FILTER_TILE^2 tile of d whose entries all have p < eps and no target (in place)."""
    t = TORCH_FILTER_TILE
    n, c = d.shape
    keep_elem = (p >= eps) | is_target
    pad = torch.nn.functional.pad(keep_elem, (0, -c % t, 0, -n % t))
    keep = pad.view(pad.shape[0] // t, t, pad.shape[1] // t, t).any(3).any(1)
    d.mul_(keep.repeat_interleave(t, 0).repeat_interleave(t, 1)[:n, :c])


def _skip_gemms(dz, weight, hidden, d_hidden, d_weight, flags, c0, width):
    """The filtered backward's GEMMs for one chunk: only the dz tiles the dz kernel kept (its flags, at its
    autotuned tile size) are multiplied; d_hidden accumulates in place in fp32, d_weight rows are written."""
    cfg = _linear_logprobs_dz.best_config.kwargs
    tile_n, tile_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n, hdim = hidden.shape
    small = interpreting()
    block_ho, warps = (16, 4) if small else (128, 8)
    flags_dtype = dict(UPCAST=small and dz.dtype in (torch.bfloat16, torch.float16),
                       PRECISION=_dot_flags(dz.dtype)["PRECISION"])
    if d_hidden is not None:
        grid = (triton.cdiv(n, tile_n), triton.cdiv(hdim, block_ho))
        _dhidden_skip[grid](dz, weight, d_hidden, flags, n, hdim, width, c0, dz.stride(0), weight.stride(0),
                            d_hidden.stride(0), ACCUMULATE=c0 > 0, ACC=tl_dtype(d_hidden.dtype), TILE_N=tile_n,
                            TILE_V=tile_v, BLOCK_HO=block_ho, BLOCK_K=min(64, tile_v), num_warps=warps,
                            **flags_dtype)
    if d_weight is not None:  # a [256, 128] fp32 accumulator spills on sm_80: narrower H blocks for wide tiles
        block_ho = block_ho if small or tile_v < 256 else 64
        grid = (triton.cdiv(width, tile_v), triton.cdiv(hdim, block_ho))
        _dweight_skip[grid](dz, hidden, d_weight, flags, n, hdim, width, c0, dz.stride(0), hidden.stride(0),
                            d_weight.stride(0), ACC=tl_dtype(acc_dtype(dz.dtype)), TILE_N=tile_n, TILE_V=tile_v,
                            BLOCK_HO=block_ho, BLOCK_K=min(64, tile_n), num_warps=warps, **flags_dtype)


def _backward(ctx, g_logp, g_ent):
    hidden, weight, bias, targets, lse2, ent = ctx.saved_tensors
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dtype = lse2.dtype
    need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    use_triton = ctx.backend == "triton"
    eps = ctx.grad_filter_eps
    # Triton path: dz in the input dtype feeds cuBLAS directly; torch path: everything in fp32 (fp64)
    dz_dtype = hidden.dtype if use_triton else dtype
    chunk = ctx.chunk or backward_chunk(hdim, vocab, hidden.element_size())
    chunk = chunk if use_triton else _torch_chunk(n, chunk)
    h_mm = hidden if use_triton else hidden.to(dtype)
    coef = _row_coefficients(lse2, ent, g_logp, g_ent, ctx.inv_temp, dtype)
    # fp32 hidden: accumulate into the output itself; half precision: an fp32 accumulator (4 N H bytes)
    d_hidden = torch.empty((n, hdim), dtype=dtype, device=hidden.device) if need_dh else None
    d_weight = torch.empty_like(weight) if need_dw else None
    d_bias = torch.empty(vocab, dtype=dtype, device=hidden.device) if need_db else None
    buffer = torch.empty((n, min(chunk, vocab)), dtype=dz_dtype, device=hidden.device)
    if use_triton:
        b2 = _scaled_bias(bias, ctx.inv_temp, dtype)
        flags = torch.empty(1, dtype=torch.int8, device=hidden.device)
        if eps is not None:  # one int8 per (row block, vocab tile) of a chunk: the smallest tiles bound the count
            flags = torch.empty(triton.cdiv(n, 16) * triton.cdiv(chunk, 32), dtype=torch.int8, device=hidden.device)
    for c0 in range(0, vocab, chunk):
        width = min(chunk, vocab - c0)
        dz = buffer[:, :width]
        if use_triton:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)  # noqa
            _linear_logprobs_dz[grid](
                hidden, weight, b2 if b2 is not None else lse2, targets, lse2, coef, dz, flags, n, vocab, hdim,
                hidden.stride(0), weight.stride(0), dz.stride(0), c0, width, n_bucket(n), LOG2E * ctx.inv_temp,
                0.0 if eps is None else eps, HAS_BIAS=bias is not None, HAS_GLOGP=g_logp is not None,
                HAS_GENT=g_ent is not None, FILTER=eps is not None, **_dot_flags(hidden.dtype))
        else:
            log2_p = _torch_chunk_logits(h_mm, weight, bias, c0, width, ctx.inv_temp) * LOG2E - lse2[:, None]
            p = torch.exp2(log2_p)
            k, b, g = coef
            d = p * k[:, None]
            if g_ent is not None:
                d += torch.where(p > 0, p * log2_p, 0.0) * b[:, None]
            local = targets - c0
            inside = (local >= 0) & (local < width)
            if g_logp is not None:
                d.scatter_add_(1, local.clamp(0, width - 1)[:, None], torch.where(inside, g, 0.0)[:, None])
            if eps is not None:
                is_target = torch.zeros_like(d, dtype=torch.bool)
                is_target.scatter_(1, local.clamp(0, width - 1)[:, None], inside[:, None])
                _torch_filter(d, p, is_target, eps)
            dz.copy_(d)
        w_c = weight[c0:c0 + width]
        if use_triton and eps is not None:  # skip the filtered tiles in both GEMMs
            _skip_gemms(dz, weight, h_mm, d_hidden, d_weight, flags, c0, width)
        elif need_dh:
            _mm_into(d_hidden, dz, w_c if use_triton else w_c.to(dtype), accumulate=c0 > 0)
        if need_dw and not (use_triton and eps is not None):
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
    def forward(ctx, hidden, weight, bias, targets, inv_temp: float, with_entropy: bool, backend: str,
                chunk: int | None, grad_filter_eps: float | None):
        if backend == "triton":
            logp, lse2, ent = _triton_forward(hidden, weight, bias, targets, inv_temp)
        else:
            logp, lse2, ent = _torch_forward(hidden, weight, bias, targets, inv_temp,
                                             chunk or backward_chunk(hidden.shape[1], weight.shape[0], 4))
        ctx.save_for_backward(hidden, weight, bias, targets, lse2, ent)
        ctx.inv_temp, ctx.backend, ctx.chunk, ctx.grad_filter_eps = inv_temp, backend, chunk, grad_filter_eps
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        if g_logp is None and g_ent is None:
            return (None,) * 9
        with device_guard(g_logp if g_logp is not None else g_ent):
            d_hidden, d_weight, d_bias = _backward(ctx, g_logp, g_ent)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, return_entropy: bool = True, bias: torch.Tensor | None = None,
                          *, check: bool = True, chunk_size: int | None = None,
                          grad_filter_eps: float | None = None, backend: str | None = None):
    """``token_logprobs(hidden @ weight.T + bias, targets, temperature)`` without materializing the logits.

    Args:
        hidden: [N, H] float (the last hidden states); weight: [V, H] (the LM head), same dtype;
        bias: optional [V]. The last dims must be contiguous (they are copied otherwise).
        targets: [N] int64 (or int32) in [0, V).
        temperature: T > 0 dividing the logits.
        return_entropy: False returns ``logp`` alone (a tensor), as ``token_logprobs`` does.
        check: verify the targets' range on the host (one device sync); False skips it.
        chunk_size: vocab columns per backward chunk; default: from the 5% memory budget (module docstring).
        grad_filter_eps: None (default) for the exact backward; a float in (0, 1) skips (zeroes) the logit-
            gradient tiles whose entries all have |1[j = t] - p_j| < eps, as CCE does with 2^-12 (error bound in
            the module docstring).
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
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 256 and chunk_size % 256 == 0):
        raise ValueError(f"chunk_size must be a positive multiple of 256, got {chunk_size}")
    if grad_filter_eps is not None and not 0.0 < float(grad_filter_eps) < 1.0:
        raise ValueError(f"grad_filter_eps must be None or in (0, 1), got {grad_filter_eps}")
    inv_temp = 1.0 / check_temperature(temperature)
    if check:
        check_targets_in_range(targets, vocab)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    backend = choose("linear_token_logprobs", hidden, backend).backend
    targets = targets.to(torch.int64).contiguous()
    eps = None if grad_filter_eps is None else float(grad_filter_eps)
    with device_guard(hidden):
        return _LinearTokenLogprobs.apply(hidden, weight, bias, targets, inv_temp, bool(return_entropy), backend,
                                          chunk_size, eps)


def prewarm(weight: torch.Tensor, token_counts, *, bias: torch.Tensor | None = None, backward: bool = True,
            temperature: float = 1.0) -> list[int]:
    """Run the autotuners for every N bucket the trainer will use, before training starts.

    ``token_counts``: the micro-batch token counts to expect (an int or an iterable; their buckets are tuned,
    e.g. ``range(1, max_tokens + 1, 256)`` or just the token budget). ``weight`` (and ``bias``) are the real LM
    head, so the dtype, V and H match the later calls. Costs one forward (+ backward) per new bucket on random
    hidden states. Returns the buckets it ran; a no-op (``[]``) when the Triton path is not the one used.
    """
    if isinstance(token_counts, int):
        token_counts = [token_counts]
    if choose("linear_token_logprobs", weight).backend != "triton":
        return []
    buckets = sorted({n_bucket(int(n)) for n in token_counts if int(n) > 0})
    gen = torch.Generator(device=weight.device).manual_seed(0)
    w = weight.detach().requires_grad_(backward)
    for n in buckets:
        hidden = torch.randn(n, weight.shape[1], generator=gen, device=weight.device,
                             dtype=weight.dtype).requires_grad_(backward)
        targets = torch.randint(0, weight.shape[0], (n,), generator=gen, device=weight.device)
        logp, ent = linear_token_logprobs(hidden, w, targets, temperature, bias=bias, check=False)
        if backward:
            torch.autograd.grad(logp.sum() + ent.sum(), [hidden, w])
    return buckets


def compile_variants() -> list:
    """Every launch the linear op can make at the shipped shapes, for the compile check: each autotune config of
    the forward and logit-gradient kernels (per dtype the dispatcher sends here, fp32 as tf32; with and without
    bias; each gradient combination; filtered and exact), and the target gather-dot. Token counts 1, 4097 and
    65536 cover Triton's specializations (a constant 1, odd, divisible by 16); hidden sizes and vocabularies all
    specialize alike, so one of each stands for the rest."""
    from ._dispatch import GEMM_MIN_CAPABILITY
    from ._variants import DTYPE_NAMES, HIDDEN_SIZES, VOCAB_SIZES, KernelVariant, TensorArg

    f32, i64, i8 = TensorArg(torch.float32), TensorArg(torch.int64), TensorArg(torch.int8)
    hdim, vocab = HIDDEN_SIZES[1], VOCAB_SIZES[1]
    plans = [(torch.bfloat16, 65536, True), (torch.bfloat16, 4097, False), (torch.bfloat16, 1, False),
             (torch.float16, 65536, False), (torch.float32, 65536, False)]
    out = []
    for dtype, n, full in plans:
        x = TensorArg(dtype)
        flags = dict(UPCAST=False, PRECISION="tf32" if dtype == torch.float32 else None, ACC=tl.float32)
        tag = f"{DTYPE_NAMES[dtype]},N={n}"
        shape = dict(N=n, H=hdim, V=vocab, dtype=DTYPE_NAMES[dtype])
        chunk = backward_chunk(hdim, vocab, torch.tensor([], dtype=dtype).element_size())
        min_arch = 10 * GEMM_MIN_CAPABILITY[dtype][0] + GEMM_MIN_CAPABILITY[dtype][1]
        common = dict(h_ptr=x, w_ptr=x, b2_ptr=f32, N=n, V=vocab, H=hdim, stride_h=hdim, stride_w=hdim,
                      n_bucket=n_bucket(n), scale2=LOG2E, **flags)
        fwd_cases = [False, True] if full else [False]
        dz_cases = ([(True, True, False, False), (True, False, False, False), (False, True, False, False),
                     (True, True, True, False), (True, True, False, True)] if full else [(True, True, False, False)])
        for ci, c in enumerate(_linear_logprobs_fwd.configs):
            kw = c.kwargs
            ctag = f"BN{kw['BLOCK_N']}_BV{kw['BLOCK_V']}_BH{kw['BLOCK_H']}_w{c.num_warps}_s{c.num_stages}"
            first = dtype == torch.bfloat16 and full and ci == 0
            for bias in fwd_cases:
                group = f"fwd[{tag},bias={int(bias)}]"
                out.append(KernelVariant(
                    "linear_logprobs", f"fwd[{tag},bias={int(bias)},{ctag}]", _linear_logprobs_fwd,
                    dict(common, m_ptr=f32, s_ptr=f32, u_ptr=f32, num_splits=num_splits(n, vocab, 132),
                         HAS_BIAS=bias, **kw),
                    num_warps=c.num_warps, num_stages=c.num_stages, gemm=True, group=group, shape=shape,
                    min_arch=min_arch, fast=first and not bias))
            for glogp, gent, bias, filt in dz_cases:
                label = f"glogp={int(glogp)},gent={int(gent)},bias={int(bias)},filter={int(filt)}"
                out.append(KernelVariant(
                    "linear_logprobs", f"dz[{tag},{label},{ctag}]", _linear_logprobs_dz,
                    dict(common, targets_ptr=i64, lse2_ptr=f32, coef_ptr=f32, dz_ptr=x, flags_ptr=i8,
                         stride_dz=chunk, col_start=0, width=chunk, filter_eps=2.0 ** -12, HAS_BIAS=bias,
                         HAS_GLOGP=glogp, HAS_GENT=gent, FILTER=filt, **kw),
                    num_warps=c.num_warps, num_stages=c.num_stages, gemm=True, group=f"dz[{tag},{label}]",
                    shape=shape, min_arch=min_arch, fast=first and glogp and gent and not (bias or filt)))
        if full:  # the filtered backward's tile-skipping GEMMs, at each dz tile size the autotuner can pick
            for bn, bv in sorted({c[:2] for c in GPU_CONFIGS}):
                skip = dict(dz_ptr=x, flags_ptr=i8, N=n, H=hdim, width=chunk, col_start=0, stride_dz=chunk,
                            UPCAST=False, PRECISION=flags["PRECISION"], ACC=tl.float32, TILE_N=bn, TILE_V=bv)
                out.append(KernelVariant(
                    "linear_logprobs", f"dhidden_skip[{tag},T{bn}x{bv}]", _dhidden_skip,
                    dict(skip, w_ptr=x, dh_ptr=f32, stride_w=hdim, stride_dh=hdim, ACCUMULATE=True, BLOCK_HO=128,
                         BLOCK_K=min(64, bv)), num_warps=8, gemm=True, shape=shape, min_arch=min_arch))
                out.append(KernelVariant(
                    "linear_logprobs", f"dweight_skip[{tag},T{bn}x{bv}]", _dweight_skip,
                    dict(skip, h_ptr=x, dw_ptr=x, stride_h=hdim, stride_dw=hdim, BLOCK_K=min(64, bn),
                         BLOCK_HO=128 if bv < 256 else 64),
                    num_warps=8, gemm=True, shape=shape, min_arch=min_arch))
        rows = TARGET_ROWS
        block_h = min(256, triton.next_power_of_2(hdim))
        out.append(KernelVariant(
            "linear_logprobs", f"target_logits[{tag}]", _target_logits,
            dict(h_ptr=x, w_ptr=x, b_ptr=x, targets_ptr=i64, out_ptr=f32, N=n, H=hdim, stride_h=hdim,
                 stride_w=hdim, inv_temp=1.0, HAS_BIAS=False, ACC=tl.float32, ROWS=rows, BLOCK_H=block_h),
            num_warps=4, stream_elems=2 * rows * block_h, sass_budget=6, shape=shape,
            fast=dtype == torch.bfloat16 and full))
    return out
