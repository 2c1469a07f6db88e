"""The PNG chart of a comparison: output tokens/s of each system, and its median TTFT and TPOT
(a bar of 0 marked "-" where none was measured: plain requests). One user at a time
(one_user.py's rows given): median TPOT and TTFT only, each bar labelled with pagedserve's ratio."""
from __future__ import annotations


def draw(systems: dict[str, dict], title: str, path: str, one_user: dict[str, dict] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    names = list(systems) if one_user is None else list(one_user)
    panels = [("output_throughput", 1, "output tokens/s (higher is better)", "{:.0f}"),
              ("median_ttft_ms", 1e-3, "median TTFT, s (lower is better)", "{:.1f}"),
              ("median_tpot_ms", 1, "median TPOT, ms (lower is better)", "{:.0f}")]
    if one_user is not None:
        panels = [("median_tpot_ms", 1, "median TPOT, ms (pagedserve's / the system's)", "{:.1f}"),
                  ("median_ttft_ms", 1, "median TTFT, ms (pagedserve's / the system's)", "{:.0f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14 if len(panels) == 3 else 11, 4.2))
    colors = ["#1f77b4" if systems[n].get("system", n) == "pagedserve" else "#999999" for n in names]
    for ax, (key, scale, label, fmt) in zip(axes, panels):
        values = [None if systems[n][key] is None else systems[n][key] * scale for n in names]
        bars = ax.barh(names, [v or 0 for v in values], color=colors)
        labels = ["-" if v is None else fmt.format(v) for v in values]
        if one_user is not None:
            stem = key.split("_")[1]  # tpot, ttft
            labels = [f"{text} ({one_user[n][f'{stem}_ratio']:.2f}x)" if one_user[n][f"{stem}_ratio"] else text
                      for text, n in zip(labels, names)]
        ax.bar_label(bars, labels, padding=3)
        ax.set_title(label, fontsize=10)
        ax.invert_yaxis()
        ax.margins(x=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
