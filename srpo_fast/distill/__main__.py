"""CLI: python -m srpo_fast.distill --policy DIR (--teacher-url URL --teacher-model NAME [--teacher-api-key-env VAR]
| --teacher-local DIR) (--data PATH ... | --synthetic N) --out DIR [--engine vllm|hf] [--limit N]
[--config configs/distill_*.yaml] [section.key=value ...]

Flags override the config file; dotted overrides override both. Rerunning with the same --out resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from srpo_fast.utils.redact import install_log_redaction, redact

from .build import build_teacher, load_data
from .config import load_distill_config, save_distill_config
from .pipeline import run_distill
from .policy import local_engine
from .types import TeacherAuthError


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m srpo_fast.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a distill YAML config (configs/distill_*.yaml)")
    p.add_argument("--policy", help="policy model dir (policy.model)")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    teacher.add_argument("--teacher-local", help="a local teacher model dir, run by our engines")
    p.add_argument("--teacher-model", help="model name sent to the server (HTTP) / provenance name (local)")
    p.add_argument("--teacher-api-key-env", help="NAME of the environment variable holding the API key")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", nargs="+", help="EasyR1-schema jsonl/parquet files or dirs")
    data.add_argument("--synthetic", type=int, help="use N records of the synthetic visual task")
    p.add_argument("--out", help="output dir (resumed when it exists)")
    p.add_argument("--engine", choices=["vllm", "hf"], help="engine for the policy and a local teacher")
    p.add_argument("--limit", type=int, help="first N records only")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_known_args(argv)


def overrides_from(args: argparse.Namespace) -> list[str]:
    """Flags as dotted overrides (YAML-quoted values), applied after the config file."""
    out = []

    def put(key, value):
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")

    put("policy.model", args.policy)
    if args.teacher_url is not None:
        put("teacher.kind", "http")
        put("teacher.url", args.teacher_url)
    if args.teacher_local is not None:
        put("teacher.kind", "local")
        put("teacher.local.model", args.teacher_local)
    put("teacher.model", args.teacher_model)
    put("teacher.api_key_env", args.teacher_api_key_env)
    put("data.files", args.data)
    put("data.synthetic", args.synthetic)
    put("out", args.out)
    put("policy.engine", args.engine)
    put("teacher.local.engine", args.engine)
    put("data.limit", args.limit)
    return out


def main(argv: list[str] | None = None) -> dict:
    install_log_redaction()
    args, extra = parse_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        raise SystemExit(f"unrecognized arguments: {' '.join(bad)}")
    cfg = load_distill_config(args.config, overrides_from(args) + extra)
    if not cfg.policy.model:
        raise SystemExit("no policy model: give --policy DIR (or policy.model in the config)")
    records, info = load_data(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_distill_config(cfg, out / "config.yaml")  # names the key's env var, never the key
    teacher_kind = cfg.teacher.kind
    teacher = build_teacher(cfg) if teacher_kind == "http" else None  # fail fast on a bad URL / missing key
    policy = local_engine(cfg.policy, max_images=max([len(r["images"]) for r in records] + [1]))
    if teacher is None:
        same = cfg.teacher.local.model == cfg.policy.model and cfg.teacher.local.engine == cfg.policy.engine
        teacher = build_teacher(cfg, engine=policy if same else None)
    print(f"distill: {len(records)} records ({info}), policy {cfg.policy.model}, teacher {teacher.name} "
          f"({teacher_kind}), out {out}", file=sys.stderr)
    try:
        summary = run_distill(cfg, records, policy, teacher, progress=not args.no_progress)
    except TeacherAuthError as exc:
        raise SystemExit(redact(f"distill stopped: {exc}")) from None
    print(json.dumps({k: summary[k] for k in ("done", "a1_right", "a1_wrong", "skipped", "pending")}),
          file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
