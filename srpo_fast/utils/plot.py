"""Turn a metrics.jsonl into PNG curves: `python -m srpo_fast.utils.plot RUN/metrics.jsonl [--out DIR]`.

Metrics are grouped by their prefix before '/' (reward/..., timing/..., loss/...), one PNG per group, so a run's
story reads from a handful of pictures.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from srpo_fast.utils.metrics import read_metrics


def numeric_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series[key]
            steps.append(row["step"])
            values.append(float(value))
    return dict(series)


def plot_metrics(metrics_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'srpo_fast[bench]'") from None
    metrics_path = Path(metrics_path)
    out = Path(out_dir) if out_dir else metrics_path.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    series = numeric_series(read_metrics(metrics_path))
    if not series:
        raise SystemExit(f"{metrics_path}: no numeric metrics to plot")
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(series):
        groups[key.split("/", 1)[0] if "/" in key else "misc"].append(key)
    written = []
    for group, keys in groups.items():
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, linewidth=1.2)
            ax.set_title(key, fontsize=9)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = out / f"{group.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m srpo_fast.utils.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="path to a metrics.jsonl")
    parser.add_argument("--out", default=None, help="output dir (default: next to the metrics, plots/)")
    args = parser.parse_args(argv)
    for path in plot_metrics(args.metrics, args.out):
        print(path)


if __name__ == "__main__":
    main()
