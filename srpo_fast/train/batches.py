"""A step's items → this rank's micro-batches: the facts every rank shares, mini-batches of whole groups, the plan
(rank balance, token-budget packing, overlong samples), the exchange of items between ranks, and the packed rows.

Plan, then move: every rank shares only small facts about its items (`share_items`: token counts, loss weight,
advantage, group), so every rank computes the same plan, deterministically:
  - the items are split over ranks by cost (Karmarkar–Karp largest differencing, k-way), because under FSDP each
    optimizer step waits for the slowest rank; cost = tokens + attention_coef * tokens^2 (the quadratic term models
    attention's share of the FLOPs for long sequences; 0 balances plain token counts);
  - each rank's share is packed into micro-batches under the token budget by best-fit decreasing (never more rows
    than first-fit decreasing, rows kept full); a sample longer than the budget is an error or a counted skip;
  - every rank runs the SAME number of micro-batches, or the collectives of the extra forward/backward passes hang:
    ranks with fewer get dummy micro-batches (`PackedBatch.is_dummy`: one 2-token sequence, loss_mask all 0). The
    trainer treats a dummy exactly like a real micro-batch — forward, loss, backward — so its collectives happen;
    its loss is 0 because its loss_mask is zero, and it adds 0 tokens to the global count the loss is normalized
    by. Never skip its backward. For VL models it runs with the vision tower synced (models/forward.py).
Then each item travels once, from the rank that sampled it to the rank that trains it (`exchange_items`); image
tensors go only where they are needed. Loss normalizers are global counts from the shared facts, so summing
micro-batch losses under SUM-reduced gradients gives exactly the mean over the whole (mini-)batch, however its
tokens were split over micro-batches and ranks. With one rank the plan is the single-rank packing.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from srpo_fast.data.packing import PackedBatch, RopeIndex, Sample, dummy_batch, pack_samples
from srpo_fast.utils.distributed import rank, world_size

OverlongPolicy = Literal["error", "skip"]


@dataclass
class TrainItem:
    """One sequence to train on. group: the prompt it answers (GRPO mini-batches never split a group)."""

    sample: Sample
    advantage: float = 0.0
    group: int = 0
    behavior_logprobs: torch.Tensor | None = None  # the rollout engine's log-probs of the response, when known


@dataclass(frozen=True)
class ItemFacts:
    """What every rank knows about every item of the step (a few numbers; the tensors stay with the owner)."""

    num_tokens: int
    response_weight: float  # sum of the response's loss-mask weights
    advantage: float
    group: int  # unique over all ranks
    owner: int  # the rank holding the item


@dataclass
class StepItems:
    facts: list[ItemFacts]  # all ranks' items, in rank order; an item's global index is its position here
    local: dict[int, TrainItem]  # global index -> this rank's own items

    def __len__(self) -> int:
        return len(self.facts)


def _facts(item: TrainItem, owner: int) -> ItemFacts:
    sample = item.sample
    weight = float(sample.response_mask.sum()) if sample.response_mask is not None else sample.response_ids.numel()
    return ItemFacts(sample.num_tokens, weight, float(item.advantage), int(item.group), owner)


def share_items(local: list[TrainItem]) -> StepItems:
    """Collective: the facts of every rank's items on every rank (group ids made globally unique)."""
    me, world = rank(), world_size()
    mine = [_facts(item, me) for item in local]
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    facts, offset, start = [], 0, 0
    for r, part in enumerate(gathered):
        if r == me:
            start = len(facts)
        facts.extend(ItemFacts(f.num_tokens, f.response_weight, f.advantage, f.group + offset, f.owner) for f in part)
        offset += max((f.group for f in part), default=-1) + 1
    return StepItems(facts, {start + i: item for i, item in enumerate(local)})


def exchange_items(items: StepItems, wanted: list[list[int]]) -> dict[int, TrainItem]:
    """Collective: global index -> item for every index in wanted[this rank], each sent by its owner only to the
    rank that wants it (one scatter per source rank)."""
    me, world = rank(), world_size()
    got = {g: items.local[g] for g in wanted[me] if g in items.local}
    if world > 1:
        outgoing = [[(g, items.local[g]) for g in wanted[r] if g in items.local] if r != me else []
                    for r in range(world)]
        for source in range(world):
            box: list = [None]
            dist.scatter_object_list(box, outgoing if source == me else None, src=source)
            got.update(box[0])
    missing = set(wanted[me]) - set(got)
    if missing:
        raise RuntimeError(f"rank {me} did not receive items {sorted(missing)[:8]}")
    return got


def split_mini_batches(items: Sequence, count: int) -> list[list[int]]:
    """Indices of `items` (anything with a .group) in `count` mini-batches of whole groups, as equal in size as the
    groups allow."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group, []).append(i)
    ordered = list(groups.values())
    if count > 1 and len(ordered) < count:
        raise ValueError(f"{len(ordered)} groups cannot fill {count} mini-batches (algo.mini_batches)")
    per = len(ordered) / count
    return [[i for group in ordered[round(k * per):round((k + 1) * per)] for i in group] for k in range(count)]


# ---- the plan: which rank trains which sample, in which micro-batch ----

def sequence_cost(num_tokens: int, attention_coef: float = 0.0) -> float:
    """Relative compute of one sequence: linear layers ~ tokens, attention ~ tokens^2."""
    return num_tokens + attention_coef * num_tokens * num_tokens


def karmarkar_karp(costs: Sequence[float], num_parts: int) -> list[list[int]]:
    """Split item indices into num_parts groups with near-equal cost sums (k-way largest differencing method).

    Each item starts as a k-tuple of partial groups (the item, then empties); repeatedly the two tuples with the
    largest spread (max - min sum) are merged, pairing the heaviest group of one with the lightest of the other.
    Groups are kept as merge trees and flattened once at the end, so a merge costs O(k). Indices ascend within a
    group; groups are in no particular order.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    if not costs:
        return [[] for _ in range(num_parts)]
    heap = []
    for i, c in enumerate(costs):
        sums = [float(c)] + [0.0] * (num_parts - 1)
        groups = [(i,)] + [()] * (num_parts - 1)
        heap.append((-float(c), i, sums, groups))
    heapq.heapify(heap)
    tie = len(costs)
    while len(heap) > 1:
        _, _, sums_a, groups_a = heapq.heappop(heap)
        _, _, sums_b, groups_b = heapq.heappop(heap)
        # both are sorted heaviest first: pair a's heaviest with b's lightest
        merged = sorted(((sums_a[j] + sums_b[-1 - j], (groups_a[j], groups_b[-1 - j])) for j in range(num_parts)),
                        key=lambda x: -x[0])
        sums = [s for s, _ in merged]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), tie, sums, [g for _, g in merged]))
        tie += 1
    return [sorted(_flatten(tree)) for tree in heap[0][3]]


def _flatten(tree) -> list[int]:
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, int):
            out.append(node)
        else:
            stack.extend(node)
    return out


def check_budget(max_tokens: int) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens_per_microbatch must be an int >= 2, got {max_tokens!r}")
    return max_tokens


def split_overlong(lengths: Sequence[int], max_tokens: int, on_overlong: OverlongPolicy
                   ) -> tuple[list[int], list[int]]:
    """(indices that fit, indices longer than max_tokens); raises for the first overlong one under "error"."""
    if on_overlong not in ("error", "skip"):
        raise ValueError(f"on_overlong must be 'error' or 'skip', got {on_overlong!r}")
    keep, skipped = [], []
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"sample {i} has length {n}; lengths must be >= 1")
        if n > max_tokens:
            if on_overlong == "error":
                raise ValueError(f"sample {i} has {n} tokens, more than max_tokens_per_microbatch={max_tokens} "
                                 "(set on_overlong='skip' to drop such samples)")
            skipped.append(i)
        else:
            keep.append(i)
    return keep, skipped


def best_fit_decreasing(lengths: Sequence[int], indices: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of `indices` (by their lengths) with sums <= max_tokens: longest first, each into the fullest bin that
    still has room (O(n log n) lookups). Every length must already be <= max_tokens."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining room, bin id)
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            bins.append([i])
            room, b = max_tokens - n, len(bins) - 1
        else:
            room, b = free.pop(pos)
            bins[b].append(i)
            room -= n
        bisect.insort(free, (room, b))
    return [sorted(b) for b in bins]


@dataclass
class RankPlan:
    """microbatches[r]: rank r's micro-batches as lists of sample indices; an empty list is a dummy micro-batch.
    Every rank has the same number. tokens[r]: real tokens on rank r. skipped: overlong samples left out."""

    microbatches: list[list[list[int]]]
    tokens: list[int]
    skipped: list[int] = field(default_factory=list)

    @property
    def num_microbatches(self) -> int:
        return len(self.microbatches[0]) if self.microbatches else 0

    @property
    def imbalance(self) -> float:
        """(max - min) / mean of the ranks' token counts (0 when balanced, or with no tokens)."""
        mean = sum(self.tokens) / len(self.tokens)
        return (max(self.tokens) - min(self.tokens)) / mean if mean else 0.0


def plan_rank_microbatches(lengths: Sequence[int], world_size: int, max_tokens_per_microbatch: int, *,
                           attention_coef: float = 0.0, on_overlong: OverlongPolicy = "error") -> RankPlan:
    """Balance samples (by their token counts) over world_size ranks, pack each rank's share under the budget, and
    pad every rank to the same micro-batch count with dummies (empty lists)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if attention_coef < 0:
        raise ValueError(f"attention_coef must be >= 0, got {attention_coef}")
    max_tokens = check_budget(max_tokens_per_microbatch)
    lengths = [int(n) for n in lengths]
    keep, skipped = split_overlong(lengths, max_tokens, on_overlong)
    parts = karmarkar_karp([sequence_cost(lengths[i], attention_coef) for i in keep], world_size)
    per_rank = [best_fit_decreasing(lengths, [keep[j] for j in part], max_tokens) for part in parts]
    count = max(1, max(len(mbs) for mbs in per_rank))
    microbatches = [mbs + [[] for _ in range(count - len(mbs))] for mbs in per_rank]
    tokens = [sum(lengths[i] for mb in mbs for i in mb) for mbs in microbatches]
    return RankPlan(microbatches, tokens, skipped)


def pack_planned(microbatches: Sequence[Sequence[int]], sample_at: Callable[[int], Sample], *,
                 rope_index: RopeIndex | None = None, dummy_token_id: int = 0) -> list[PackedBatch]:
    """One rank's planned micro-batches (lists of sample indices; empty = dummy) packed into rows; sample_at(i)
    gives sample i (this rank needs only the samples it trains).

    rope_index: `MRopeIndexer(model)` for Qwen2(.5)-VL models (also makes the dummies' position ids 4-row)."""
    return [pack_samples([sample_at(i) for i in idx], rope_index=rope_index, sample_indices=idx) if idx
            else dummy_batch(vision_language=rope_index is not None, token_id=dummy_token_id)
            for idx in microbatches]


# ---- one mini-batch, planned, moved and packed: what the update loops consume ----

@dataclass
class MicroBatch:
    """One packed row on the training device and, in its row order, what its loss compares against."""

    batch: PackedBatch
    advantages: torch.Tensor  # [S] one per sequence (zeros for a dummy)
    behavior_logprobs: torch.Tensor | None  # [R] the rollout engine's; None for a dummy or when not all are known
    old_logprobs: torch.Tensor | None = None  # [R] the policy's before the update (set by the trainer off-policy)
    ref_logprobs: torch.Tensor | None = None  # [R] the frozen reference's (set by the trainer for the KL term)


@dataclass
class MiniBatch:
    """This rank's micro-batches of one mini-batch (dummies included) and the global counts its loss is normalized
    by. PackedBatch.sample_indices are positions in the mini-batch."""

    micro_batches: list[MicroBatch]
    plan: RankPlan
    response_tokens: float  # sum of loss-mask weights over every kept sequence of the mini-batch (all ranks)
    sequences: int  # kept sequences of the mini-batch (all ranks)

    @property
    def skipped(self) -> int:
        return len(self.plan.skipped)

    def normalizer(self, aggregation: str) -> float:
        return float(self.response_tokens if aggregation == "token-mean" else self.sequences)


def plan_mini_batch(items: StepItems, indices: Sequence[int], *, max_tokens: int, device: torch.device,
                    rope_index: RopeIndex | None, attention_cost: float = 0.0, on_overlong: str = "skip",
                    dummy_token_id: int = 0) -> MiniBatch:
    """Collective: plan the items at `indices` over the ranks, fetch this rank's share, pack it, move it to
    `device` with its advantages and engine log-probs."""
    facts = [items.facts[g] for g in indices]
    plan = plan_rank_microbatches([f.num_tokens for f in facts], world_size(), max_tokens,
                                  attention_coef=attention_cost, on_overlong=on_overlong)
    wanted = [[indices[p] for mb in per_rank for p in mb] for per_rank in plan.microbatches]
    mine = exchange_items(items, wanted)
    advantages = [f.advantage for f in facts]
    behavior = [mine[g].behavior_logprobs if g in mine else None for g in indices]
    micro_batches = []
    for batch in pack_planned(plan.microbatches[rank()], lambda p: mine[indices[p]].sample, rope_index=rope_index,
                              dummy_token_id=dummy_token_id):
        known = not batch.is_dummy and all(behavior[p] is not None for p in batch.sample_indices)
        micro_batches.append(MicroBatch(batch.to(device), batch.gather_sequences(advantages).to(device),
                                        batch.gather_response(behavior).to(device) if known else None))
    skipped = set(plan.skipped)
    kept = [f for p, f in enumerate(facts) if p not in skipped]
    return MiniBatch(micro_batches, plan, sum(f.response_weight for f in kept), len(kept))
