"""Pictures of a simulated iteration (matplotlib, Agg backend, no display needed).

``write_timeline``: one row per rank, one box per compute instruction, coloured by kind in the
style of pipeline-schedule figures (forward light, backward dark; attention in its own hue;
recompute grey; zero-bubble weight gradients yellow), labelled with the micro batch when the
box is wide enough. ``write_memory_plot``: activation bytes over time per rank.
"""

from __future__ import annotations

from pathlib import Path

COLORS = {
    "fwd": "#9ecae1",  # parameter chunk forward
    "fwd_attn": "#fdae6b",  # attention forward
    "bwd": "#3182bd",  # parameter chunk backward
    "bwd_input": "#3182bd",
    "bwd_attn": "#e6550d",  # attention backward
    "bwd_weight": "#fdd835",  # zero-bubble W
    "recompute": "#bdbdbd",
    "embed": "#bcbddc",
    "head": "#a1d99b",
}
LEGEND = [("fwd", "forward"), ("fwd_attn", "attention fwd"), ("bwd", "backward"),
          ("bwd_attn", "attention bwd"), ("bwd_weight", "weight grad (W)"),
          ("recompute", "recompute"), ("embed", "embedding"), ("head", "head + loss")]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def write_timeline(res, path, *, title: str | None = None, show_labels: bool | None = None):
    plt = _plt()
    from matplotlib.patches import Patch

    p = res.num_stages
    T = res.iteration_time or 1.0
    fig_w = 14
    fig, ax = plt.subplots(figsize=(fig_w, 0.55 * p + 1.6))
    n_ops = len(res.events)
    if show_labels is None:
        show_labels = n_ops <= 600
    used = set()
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in res.events:
        d = e.end - e.start
        if d <= 0:
            continue
        used.add(e.category)
        bars.setdefault((e.rank, e.category), []).append((e.start, d))
        if show_labels and d / T * fig_w * 72 > 9:
            ax.text(e.start + d / 2, p - 1 - e.rank + 0.5, str(e.instr.mb), ha="center",
                    va="center", fontsize=5)
    for (rank, cat), spans in bars.items():
        ax.broken_barh(spans, (p - 1 - rank + 0.08, 0.84),
                       facecolors=COLORS.get(cat, "#999999"), edgecolors="black",
                       linewidth=0.25 if len(res.events) < 3000 else 0.0)
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)])
    ax.set_yticklabels([f"rank {r}" for r in range(p)])
    ax.set_ylim(0, p)
    ax.set_xlim(0, T)
    ax.set_xlabel("time (s)")
    sched = res.schedule
    ax.set_title(title or (f"{sched.kind}  p={p}  M={sched.num_microbatches}  "
                           f"F={sched.num_folds}  iteration {T:.4g} s  "
                           f"bubble {res.bubble_ratio:.1%}"), fontsize=9)
    handles = [Patch(facecolor=COLORS[k], edgecolor="black", label=lab)
               for k, lab in LEGEND if k in used]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.28 if p < 6 else -0.12),
              ncol=min(8, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def write_memory_plot(res, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4))
    for r, tl in enumerate(res.memory_timeline):
        xs = [t for t, _ in tl] + [res.iteration_time]
        ys = [b / 1e9 for _, b in tl] + [tl[-1][1] / 1e9 if tl else 0.0]
        ax.step(xs, ys, where="post", label=f"rank {r}", linewidth=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("activation memory (GB)")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"{res.schedule.kind}: activation memory per rank", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)
