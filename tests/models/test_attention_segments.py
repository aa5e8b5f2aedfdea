"""The CPU packed-attention path (`sdpa_segments`): one SDPA call per run of equal-length sequences, segments cut by
one split. It must equal SDPA run on each sequence alone (outputs and q/k/v gradients), whatever the segment mix."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from srpo_fast.models import attention
from srpo_fast.models.attention import _equal_length_runs, _segments_sdpa, varlen_attention_forward


class Module(torch.nn.Module):
    """Stands in for a transformers attention module: the attributes attention functions read."""
    is_causal = True
    num_key_value_groups = 2


def transformers_layout(total: int, heads: int, dim: int, dtype, gen) -> torch.Tensor:
    """[1, H, T, D] the way transformers' attention modules hand it over: proj(x).view(B, L, H, D).transpose(1, 2)."""
    return torch.randn(1, total, heads, dim, generator=gen, dtype=torch.float32).to(dtype).transpose(1, 2)


def per_sequence(q, k, v, lengths, causal, scale):
    """Reference: SDPA on each sequence alone (GQA by repeating K/V), concatenated → [1, T, Hq, D]."""
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            out = F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl].repeat_interleave(rep, 1),
                                                 v[:, :, sl].repeat_interleave(rep, 1), is_causal=causal,
                                                 scale=scale)
            outs.append(out.transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


CASES = {
    "odd lengths": [5, 1, 9, 3, 17, 2],
    "single segment": [23],
    "many tiny segments": [1, 2, 1, 1, 3, 2, 2, 1] * 6,
    "equal-length runs": [4, 4, 4, 7, 7, 1, 4, 4, 6],
    "all equal": [8] * 9,
    "empty segment in cu": [6, 0, 5, 5],
}
# fp64/fp32: equal to rounding (batched and single SDPA calls compute the same sums); bf16: to bf16 rounding
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_segments_equal_sdpa_per_sequence(case, causal, dtype):
    lengths = CASES[case]
    gen = torch.Generator().manual_seed(len(lengths))
    total = sum(lengths)
    q, k, v = (transformers_layout(total, h, 16, dtype, gen).requires_grad_() for h in (4, 2, 2))
    out = _segments_sdpa(q, k, v, cu_of(lengths), 0.25, 0.0, causal)
    assert out.shape == (1, total, 4, 16) and out.dtype == dtype
    g = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = per_sequence(qr, kr, vr, lengths, causal, 0.25)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"grad {name}: {m}")


def test_equal_length_runs():
    assert _equal_length_runs([4, 4, 0, 4, 7, 1, 1]) == [(4, 3), (7, 1), (1, 2)]
    assert _equal_length_runs([3]) == [(3, 1)]
    assert _equal_length_runs([0, 0]) == []


class Ops(TorchDispatchMode):
    """Counts the aten ops dispatched (by overload packet name)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_one_sdpa_call_per_run_and_no_per_segment_gradient_fill():
    """80 equal segments are one SDPA call; the backward never builds a zero-filled full-row gradient per segment
    (slice_backward), which made many tiny segments cost O(segments x T) per layer."""
    gen = torch.Generator().manual_seed(0)
    lengths = [5] * 80 + [3, 9]
    q, k, v = (transformers_layout(sum(lengths), h, 8, torch.float32, gen).requires_grad_() for h in (4, 2, 2))
    ops = Ops()
    with ops:
        out = _segments_sdpa(q, k, v, cu_of(lengths), None, 0.0, True)
        out.sum().backward()
    sdpa_fwd = sum(n for name, n in ops.counts.items() if name.startswith("_scaled_dot_product") and
                   not name.endswith("backward"))
    sdpa_bwd = sum(n for name, n in ops.counts.items() if name.startswith("_scaled_dot_product") and
                   name.endswith("backward"))
    assert sdpa_fwd == 3 and sdpa_bwd == 3, ops.counts  # runs: 80 x 5, 3, 9
    assert "slice_backward" not in ops.counts and "zeros" not in ops.counts, ops.counts


def test_forward_rows_and_bad_bounds():
    """Through the attention function: several rows whose sequences come from restarting position ids, a row per
    sequence, and bounds that do not cover the row (a clear error, not attention over the wrong tokens)."""
    gen = torch.Generator().manual_seed(2)
    module = Module()
    q, k, v = (torch.randn(2, h, 9, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    out, _ = varlen_attention_forward(module, q, k, v, None, position_ids=pos)
    for row, lengths in enumerate(([3, 4, 2], [6, 3])):
        ref = per_sequence(q[row:row + 1], k[row:row + 1], v[row:row + 1], lengths, True, None)
        torch.testing.assert_close(out[row:row + 1], ref, rtol=0, atol=1e-12)
    out, _ = varlen_attention_forward(module, q, k, v, None)  # no bounds: every row is one sequence
    torch.testing.assert_close(out, torch.cat([per_sequence(q[r:r + 1], k[r:r + 1], v[r:r + 1], [9], True, None)
                                               for r in range(2)]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not split the row's 9 tokens"):
        varlen_attention_forward(module, q[:1], k[:1], v[:1], None, cu_seq_lens_q=cu_of([3, 4]), max_length_q=4)
    assert attention.varlen_backend(q.device, q.dtype) == "sdpa_segments"
