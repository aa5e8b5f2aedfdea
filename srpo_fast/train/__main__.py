"""`torchrun [--nproc_per_node=N] -m srpo_fast.train --config FILE [key.sub=value ...]`."""
from __future__ import annotations

import argparse
import sys

from srpo_fast.config import ConfigError, load_config

EXIT_NO_UPDATE = 3  # the run finished but never updated the model
EXIT_STORAGE = 4  # a checkpoint, config or export could not be written (disk full, quota)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun -m srpo_fast.train",
                                     description="SRPO trainer: stage 1 SFT or stage 2 reflection-aware GRPO.")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 rollout.n=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from srpo_fast.train.run import NoUpdateError
    from srpo_fast.utils.checkpoint import StorageError
    from srpo_fast.utils.distributed import cleanup, init_distributed

    init_distributed()
    try:
        if cfg.train.stage == "sft":
            from srpo_fast.train.sft import train_sft as train
        else:
            from srpo_fast.train.grpo import train_grpo as train
        out_dir = train(cfg)
    except ConfigError as exc:  # a setting that only fails against the data or the world size
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except NoUpdateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_UPDATE
    except StorageError as exc:
        print(f"storage error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_STORAGE
    finally:
        cleanup()
    print(f"[train] done: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
