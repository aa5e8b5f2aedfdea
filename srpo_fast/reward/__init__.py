"""Reflection-aware rewards (docs/method.md): response parsing, answer grading with hard timeouts, the SRPO
presets composed as tensor ops (or a "package.module:function" of your own), and group advantages.

Names are resolved lazily so that the grader's worker processes, which import
``srpo_fast.reward.mv_worker``, do not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from srpo_fast.utils.lazy import lazy_exports

_EXPORTS = {
    "RewardConfig": "srpo_fast.reward.config",
    "score_batch": "srpo_fast.reward.score",
    "RewardOutput": "srpo_fast.reward.srpo",
    "parse_response": "srpo_fast.reward.parse",
    "ParsedResponse": "srpo_fast.reward.parse",
    "grade_batch": "srpo_fast.reward.grade",
    "BatchGrades": "srpo_fast.reward.grade",
    "group_advantages": "srpo_fast.reward.advantages",
    "GroupAdvantages": "srpo_fast.reward.advantages",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from srpo_fast.reward.advantages import GroupAdvantages, group_advantages
    from srpo_fast.reward.config import RewardConfig
    from srpo_fast.reward.grade import BatchGrades, grade_batch
    from srpo_fast.reward.parse import ParsedResponse, parse_response
    from srpo_fast.reward.score import score_batch
    from srpo_fast.reward.srpo import RewardOutput


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
