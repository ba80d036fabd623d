"""The one figure layout of bench's and eval's PNGs: a new pair of axes, and the figure titled, gridded
and written. matplotlib is imported only when a plot is asked for, so commands that draw none never load it."""

from __future__ import annotations

from pathlib import Path


def new_axes():
    """(figure, axes) of an 8 x 5 inch figure, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, 5))


def save_figure(fig, ax, path: Path, title: str, legend_size: int = 7) -> None:
    """Title, legend and grid on ax; the figure written to path as a PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
