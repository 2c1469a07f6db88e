"""The PNG chart of a comparison: output tokens/s of each system, and its median TTFT and TPOT
(a bar of 0 marked "-" where none was measured: plain requests)."""
from __future__ import annotations


def draw(systems: dict[str, dict], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    names = list(systems)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("output_throughput", 1, "output tokens/s (higher is better)", "{:.0f}"),
              ("median_ttft_ms", 1e-3, "median TTFT, s (lower is better)", "{:.1f}"),
              ("median_tpot_ms", 1, "median TPOT, ms (lower is better)", "{:.0f}")]
    colors = ["#1f77b4" if systems[n].get("system", n) == "pagedserve" else "#999999" for n in names]
    for ax, (key, scale, label, fmt) in zip(axes, panels):
        values = [None if systems[n][key] is None else systems[n][key] * scale for n in names]
        bars = ax.barh(names, [v or 0 for v in values], color=colors)
        ax.bar_label(bars, ["-" if v is None else fmt.format(v) for v in values], padding=3)
        ax.set_title(label, fontsize=10)
        ax.invert_yaxis()
        ax.margins(x=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
