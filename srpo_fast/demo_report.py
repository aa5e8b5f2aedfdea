"""The demo's verdict, read from the two stages' metrics.jsonl: did reflection-aware GRPO learn?

- `reward_trend`: the training-reward trend over the GRPO steps as a t statistic — the least-squares slope of
  reward/total against the step, divided by its standard error (residual variance with n − 2 degrees of freedom).
  Each step's reward is the mean over that step's freshly sampled responses, so under a policy that does not change
  the steps are independent draws around a constant and |t| stays within ~2; t ≥ 4 means the rise is far outside
  the per-step noise. A trainer that does not update (lr = 0, a broken loss) fails it.
- `summarize`: start → end numbers: the training reward (mean of the first and the last k steps), the greedy
  validation metrics (before GRPO and at the last validation) and the well-formed fraction at temperature 1.
- `plot_summary`: one summary.png — SFT loss, the GRPO reward terms, validation accuracies over steps.
"""
from __future__ import annotations

import math
from pathlib import Path

from srpo_fast.utils.metrics import read_metrics

REWARD_TERMS = ("reward/total", "reward/format", "reward/accuracy", "reward/reflection_format",
                "reward/effectiveness", "reward/length")
VAL_KEYS = ("val/acc_first", "val/acc_final", "val/reflect_rate", "val/reflect_fix_rate", "val/reflect_break_rate")


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry `key`."""
    picked = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in picked], [v for _, v in picked]


def reward_trend(steps: list[int], values: list[float]) -> dict[str, float]:
    """Least-squares slope of values vs steps, its standard error and t = slope / SE (module docstring)."""
    n = len(values)
    if n < 3:
        raise ValueError(f"a trend needs at least 3 steps, got {n}")
    mx, my = sum(steps) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in steps)
    if sxx == 0:
        raise ValueError("a trend needs at least two different steps")
    slope = sum((x - mx) * (y - my) for x, y in zip(steps, values)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(steps, values))
    se = math.sqrt(resid / (n - 2) / sxx)
    t = slope / se if se > 0 else (math.inf if slope > 0 else -math.inf if slope < 0 else 0.0)
    return {"slope": slope, "se": se, "t": t, "steps": float(n)}


def _ends(values: list[float], k: int) -> tuple[float, float]:
    return sum(values[:k]) / len(values[:k]), sum(values[-k:]) / len(values[-k:])


def summarize(sft_rows: list[dict], grpo_rows: list[dict]) -> dict:
    """Start → end numbers of both stages (module docstring); k = a fifth of the GRPO steps, at least 1."""
    steps, reward = series(grpo_rows, "reward/total")
    if not steps:
        raise ValueError("the GRPO metrics have no reward/total rows")
    k = max(1, len(steps) // 5)
    out: dict = {"grpo_steps": len(steps), "k": k, "reward": _ends(reward, k)}
    _, fmt = series(grpo_rows, "reward/format")
    out["well_formed"] = tuple(2.0 * v for v in _ends(fmt, k))  # paper preset: format = 0.5 · well-formed
    out["trend"] = reward_trend(steps, reward) if len(steps) >= 3 else None
    for key in VAL_KEYS:
        val_steps, values = series(grpo_rows, key)
        if values:
            out[key] = (values[0], values[-1], val_steps[0], val_steps[-1])
    _, loss = series(sft_rows, "loss/nll")
    if loss:
        out["sft_loss"] = (loss[0], loss[-1])
    return out


def format_summary(s: dict) -> str:
    """The printed block: one line per number, start → end."""
    lines = [f"[demo] summary over {s['grpo_steps']} GRPO steps (train: mean of the first/last {s['k']} steps; "
             f"val: greedy answers to held-out records)"]
    if "sft_loss" in s:
        lines.append(f"  SFT loss                     {s['sft_loss'][0]:.3f} → {s['sft_loss'][1]:.3f}")
    lines.append(f"  train reward                 {s['reward'][0]:.3f} → {s['reward'][1]:.3f}")
    lines.append(f"  well-formed at temperature 1 {s['well_formed'][0]:.2f} → {s['well_formed'][1]:.2f}")
    if s.get("trend"):
        tr = s["trend"]
        lines.append(f"  reward trend                 slope {tr['slope']:+.4f}/step ± {tr['se']:.4f}, "
                     f"t = {tr['t']:.1f} (least-squares slope / its standard error)")
    names = {"val/acc_first": "val first-answer accuracy", "val/acc_final": "val final accuracy",
             "val/reflect_rate": "val reflection rate", "val/reflect_fix_rate": "val reflection fix rate",
             "val/reflect_break_rate": "val reflection break rate"}
    for key, name in names.items():
        if key in s:
            start, end, s0, s1 = s[key]
            lines.append(f"  {name:<28} {start:.2f} → {end:.2f}  (step {s0} → {s1})")
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_summary(sft_rows: list[dict], grpo_rows: list[dict], path: str | Path) -> Path:
    """One PNG, three panels: SFT loss; GRPO reward terms (moving average, raw total faint); validation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps, loss = series(sft_rows, "loss/nll")
    axes[0].plot(steps, loss, color="tab:blue")
    axes[0].set(title="Stage 1: SFT loss (cold-start set)", xlabel="SFT step", ylabel="NLL per token")
    axes[0].set_yscale("log")
    window = max(1, len(series(grpo_rows, "reward/total")[0]) // 10)
    for key in REWARD_TERMS:
        steps, values = series(grpo_rows, key)
        if not steps:
            continue
        label = key.split("/", 1)[1]
        if key == "reward/total":
            axes[1].plot(steps, values, color="black", alpha=0.25, linewidth=0.8)
            axes[1].plot(steps, _smooth(values, window), color="black", linewidth=2.2, label="total")
        else:
            axes[1].plot(steps, _smooth(values, window), linewidth=1.4, label=label)
    axes[1].set(title=f"Stage 2: GRPO training reward (moving average of {window})", xlabel="GRPO step",
                ylabel="mean reward per response")
    axes[1].legend(fontsize=8, loc="best")
    styles = {"val/acc_first": ("first-answer accuracy", "tab:orange", "-"),
              "val/acc_final": ("final accuracy", "tab:green", "-"),
              "val/reflect_rate": ("has a reflection", "tab:purple", "--"),
              "val/reflect_fix_rate": ("reflection fixes", "tab:blue", ":"),
              "val/reflect_break_rate": ("reflection breaks", "tab:red", ":")}
    for key, (label, color, style) in styles.items():
        steps, values = series(grpo_rows, key)
        if steps:
            axes[2].plot(steps, values, style, color=color, marker="o", label=label)
    axes[2].set(title="Stage 2: validation (greedy, held-out)", xlabel="GRPO step", ylabel="fraction of answers",
                ylim=(-0.03, 1.32), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes[2].legend(fontsize=8, loc="upper center", ncol=3)  # above the curves, which stay within [0, 1]
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(out: str | Path) -> tuple[dict, str, Path | None]:
    """Summary, its text and summary.png (None without matplotlib) for a demo run dir."""
    out = Path(out)
    sft_rows, grpo_rows = read_metrics(out / "sft" / "metrics.jsonl"), read_metrics(out / "grpo" / "metrics.jsonl")
    summary = summarize(sft_rows, grpo_rows)
    try:
        png = plot_summary(sft_rows, grpo_rows, out / "summary.png")
    except ImportError:
        png = None
    return summary, format_summary(summary), png
