"""The trainer: `torchrun -m srpo_fast.train --config FILE [key.sub=value ...]` (also plain `python -m`).

train.stage picks the loop: `sft` (stage 1, response-only loss on the reflection cold-start data, sft.py) or
`grpo` (stage 2, reflection-aware GRPO, grpo.py). Both share run.py (model, optimizer step, data order,
checkpoints, metrics) and batches.py (a step's items → packed, rank-balanced micro-batches).
"""
