"""Stage-1 reflection cold-start data (docs/method.md): the policy writes a1, a teacher writes a reflection that
simplifies a right a1 or corrects a wrong one, and the SFT target is a1 + `<reflection>…</reflection>` + a2 (the
ground-truth solution), written as an EasyR1-schema jsonl with a `response` column.

    python -m srpo_fast.distill --policy DIR --teacher-url URL --teacher-model NAME --synthetic 64 --out OUT

Modules: types (teacher protocol), prompts (teacher templates), http_teacher / local_teacher (backends), policy
(a1 sampling), assemble (repair, reflection checks, a2, validation), store (incremental output, resume),
pipeline (the batch loop), config / build (configuration), __main__ (CLI).
"""
from .assemble import FirstSolution, Skip, check_structure, clean_reflection, compose, normalize_first, second_solution
from .build import build_teacher, load_data
from .config import DistillConfig, load_distill_config
from .http_teacher import HTTPTeacher
from .local_teacher import LocalTeacher
from .pipeline import run_distill
from .store import OutputStore, record_key
from .types import ReflectionRequest, Teacher, TeacherAuthError, TeacherFailure, TeacherStats

__all__ = ["DistillConfig", "FirstSolution", "HTTPTeacher", "LocalTeacher", "OutputStore", "ReflectionRequest", "Skip",
           "Teacher", "TeacherAuthError", "TeacherFailure", "TeacherStats", "build_teacher", "check_structure",
           "clean_reflection", "compose", "load_data", "load_distill_config", "normalize_first", "record_key",
           "run_distill", "second_solution"]
