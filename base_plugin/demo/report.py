"""What the demo leaves behind: metrics.json, PNG plots and the final table."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

LABELS = {"dense": "dense FFN", "top1": "DeepSpeed top-1", "top2": "DeepSpeed top-2", "base": "BASE"}


def write_metrics(out: Path, runs: List[Dict], settings: Dict) -> Path:
    path = out / "metrics.json"
    path.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    return path


def plot(out: Path, runs: List[Dict]) -> List[Path]:
    """validation_loss.png (all runs), expert_load.png (tokens per expert per step), base_gate.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.get("val_step"):
            ax.plot(run["val_step"], run["val_loss"], marker="o", ms=3, label=LABELS[run["variant"]])
    ax.set(xlabel="step", ylabel="validation loss (nats / byte)", title="Held-out loss at equal steps and tokens")
    finals = [r["val_loss"][-1] for r in runs if r.get("val_loss")]
    if finals:  # early spikes of the top-k runs would flatten the part worth reading
        ax.set_ylim(min(finals) - 0.1, max(finals) + 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out / "validation_loss.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    moe_runs = [r for r in runs if r.get("tokens_per_expert")]
    if moe_runs:
        fig, axes = plt.subplots(1, len(moe_runs), figsize=(4.2 * len(moe_runs), 3.8), squeeze=False, sharey=True)
        for ax, run in zip(axes[0], moe_runs):
            counts = run["tokens_per_expert"]
            per_expert = list(zip(*counts))
            mean = sum(counts[0]) / len(counts[0])
            for series in per_expert:
                ax.plot(run["step"][:len(series)], [c / mean for c in series], lw=0.8, alpha=0.8)
            ax.set(title=LABELS[run["variant"]], xlabel="step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("tokens per expert / mean")
        fig.suptitle("Load of every expert at every step")
        paths.append(out / "expert_load.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    base = [r for r in runs if r["variant"] == "base" and r.get("mean_gate")]
    if base:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        run = base[0]
        ax.plot(run["step"][:len(run["mean_gate"])], run["mean_gate"])
        ax.set(xlabel="step", ylabel="mean gate σ(x·c_e)", title="BASE gate values")
        ax.grid(alpha=0.3)
        paths.append(out / "base_gate.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def table(runs: List[Dict]) -> str:
    """Markdown table: final validation loss / perplexity, tokens/s, load balance, dropped tokens."""
    rows = ["| run | steps | val loss | val ppl (bytes) | tokens/s | max/mean expert load | dropped tokens |",
            "|---|---|---|---|---|---|---|"]
    for run in runs:
        loss = run["val_loss"][-1] if run.get("val_loss") else float("nan")
        tps = sorted(run["tokens_per_s"])[len(run["tokens_per_s"]) // 2] if run.get("tokens_per_s") else float("nan")
        load = (f"{max(run['load_max_over_mean']):.2f} (worst step)" if run.get("load_max_over_mean") else "–")
        dropped = (f"{100 * sum(run['dropped_fraction']) / len(run['dropped_fraction']):.2f} %"
                   if run.get("dropped_fraction") else "–")
        rows.append(f"| {LABELS[run['variant']]} | {run['step'][-1] if run.get('step') else 0} | {loss:.4f} "
                    f"| {math.exp(loss):.3f} | {tps:.0f} | {load} | {dropped} |")
    return "\n".join(rows)
