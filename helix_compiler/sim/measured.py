"""Timeline picture of a real run from the executor's measured per-instruction times."""

from __future__ import annotations

from pathlib import Path

COLORS = {"F": "#4C72B0", "B": "#DD8452", "R": "#8C8C8C", "I": "#DD8452", "W": "#C44E52"}
ATTN_COLORS = {"F": "#55A868", "B": "#937860", "R": "#BBBBBB"}


def plot_measured_timeline(traces: list[list[dict]], path: str | Path, *, title: str = "") -> None:
    """One row per rank; forward (blue), backward (orange), attention forward/backward (green/brown),
    recompute (grey). ``traces[r]`` is rank r's list of {op, seg, mb, start, end} (seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(e["start"] for tr in traces for e in tr)
    t1 = max(e["end"] for tr in traces for e in tr)
    fig, ax = plt.subplots(figsize=(14, 0.6 * len(traces) + 1.5))
    for r, tr in enumerate(traces):
        for e in tr:
            attn = e["seg"].startswith("A")
            color = (ATTN_COLORS if attn else COLORS).get(e["op"], "#999999")
            ax.barh(r, e["end"] - e["start"], left=e["start"] - t0, color=color, edgecolor="white", linewidth=0.3)
            if (e["end"] - e["start"]) > 0.03 * (t1 - t0):
                ax.text((e["start"] + e["end"]) / 2 - t0, r, f"{e['seg']}.{e['mb']}", ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(len(traces)), [f"rank {r}" for r in range(len(traces))])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=COLORS["F"], label="param fwd"), Patch(color=ATTN_COLORS["F"], label="attn fwd"),
                       Patch(color=COLORS["B"], label="param bwd"), Patch(color=ATTN_COLORS["B"], label="attn bwd"),
                       Patch(color=COLORS["R"], label="recompute")], loc="upper right", fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
