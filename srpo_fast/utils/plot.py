"""Turn a metrics.jsonl into PNG curves: `python -m srpo_fast.utils.plot RUN/metrics.jsonl [--out DIR]`.

Metrics are grouped by their prefix before '/' (reward/..., timing/..., loss/...), one PNG per group, so a run's
story reads from a handful of pictures. GPU telemetry (gpu/<field>_<phase>) gets one panel per field with a line per
phase of the step, so rollout, train and sync compare at a glance.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from srpo_fast.utils.metrics import read_metrics
from srpo_fast.utils.telemetry import FIELDS as GPU_FIELDS


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


def panel_and_line(key: str) -> tuple[str, str | None]:
    """Which panel a metric is drawn in and its line label there: gpu/util_rollout → ("gpu/util", "rollout");
    any other metric has a panel of its own (label None)."""
    group, _, rest = key.partition("/")
    if group == "gpu":
        for field in GPU_FIELDS:
            if rest.startswith(field + "_"):
                return f"gpu/{field}", rest[len(field) + 1:]
    return key, None


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
    groups: dict[str, dict[str, list[tuple[str | None, str]]]] = defaultdict(lambda: defaultdict(list))
    for key in sorted(series):
        panel, line = panel_and_line(key)
        groups[key.split("/", 1)[0] if "/" in key else "misc"][panel].append((line, key))
    written = []
    for group, panels in groups.items():
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False)
        for ax, (panel, lines) in zip(axes[:, 0], panels.items()):
            for label, key in lines:
                steps, values = series[key]
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, linewidth=1.2, label=label)
            if any(label is not None for label, _ in lines):
                ax.legend(fontsize=7)
            ax.set_title(panel, fontsize=9)
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
