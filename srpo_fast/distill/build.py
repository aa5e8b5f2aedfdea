"""From a DistillConfig to the parts of a run: the records, the teacher (HTTP or local engine)."""
from __future__ import annotations

from srpo_fast.data.records import load_records
from srpo_fast.data.synthetic import make_dataset

from .config import DistillConfig
from .http_teacher import HTTPTeacher
from .local_teacher import LocalTeacher
from .policy import local_engine, sampling_from


def load_data(cfg: DistillConfig) -> tuple[list[dict], dict]:
    """(records, load report as a dict): the data files, else the synthetic task; `data.limit` keeps the first N."""
    d = cfg.data
    if d.files:
        records, report = load_records(d.files, on_bad="skip", allow_outside_paths=d.allow_outside_paths)
        info = {"loaded": report.loaded, "bad_rows": report.skipped, "bad_reasons": report.reasons}
        if report.details:
            info["bad_rows_first"] = report.details
    elif d.synthetic > 0:
        records = make_dataset(d.synthetic, seed=d.synthetic_seed, difficulty=d.synthetic_difficulty)
        info = {"synthetic": len(records)}
    else:
        raise ValueError("no data: give data.files (--data PATH) or data.synthetic > 0 (--synthetic N)")
    if d.limit is not None:
        records = records[:d.limit]
    return records, info


def build_teacher(cfg: DistillConfig, engine=None):
    """The configured teacher; `engine` lets a local teacher reuse an engine already built (e.g. the policy's)."""
    t = cfg.teacher
    if t.kind == "http":
        if not t.url or not t.model:
            raise ValueError("an HTTP teacher needs teacher.url and teacher.model (--teacher-url, --teacher-model)")
        return HTTPTeacher(t.url, t.model, api_key_env=t.api_key_env, multimodal=t.multimodal,
                           concurrency=t.concurrency, timeout_s=t.timeout_s, max_retries=t.max_retries,
                           backoff_s=t.backoff_s, backoff_max_s=t.backoff_max_s, temperature=t.temperature,
                           max_tokens=t.max_tokens, seed=t.seed,
                           max_reply_bytes=t.max_reply_bytes)
    settings = t.local
    if not settings.model:
        raise ValueError("a local teacher needs teacher.local.model (--teacher-local DIR)")
    engine = engine if engine is not None else local_engine(settings, max_images=8)
    sampling = sampling_from(settings)
    return LocalTeacher(engine, name=t.model or settings.model, sampling=sampling, multimodal=t.multimodal)
