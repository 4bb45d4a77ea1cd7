"""One bar panel of a probe report (launch/ablate.py's grid and launch/compare.py's arms): mean
+- std over seeds per row, dashed lines for the reference models, and the PNG written atomically."""
from __future__ import annotations

import statistics
from pathlib import Path

from pipeline.core.io import atomic_path


def probe_panel(ax, labels: list[str], vals: list[list[float]], refs: dict[str, float | None], title: str,
                show_labels: bool, color, alpha: float, fontsize: int) -> None:
    """``vals``: per row, the seeds' top-1 (%); ``refs``: name -> its top-1 (%), None = not on this set."""
    ax.barh(range(len(vals)), [statistics.fmean(v) if v else 0.0 for v in vals],
            xerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals], color=color, alpha=alpha)
    for k, (name, x) in enumerate(refs.items()):
        if x is not None:
            ax.axvline(x, color=("tab:red", "tab:green")[k % 2], ls="--", label=name)
    ax.set_yticks(range(len(vals)), labels if show_labels else [""] * len(vals), fontsize=fontsize)
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    if refs:
        ax.legend(fontsize=7, loc="lower right")


def save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:  # temp + rename (pipeline/core/io.py)
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
