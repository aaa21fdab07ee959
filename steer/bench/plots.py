"""PNG plots for the scenarios: matplotlib without a display.

matplotlib is the optional extra `bench` (pip install 'steer[bench]'): only plotting needs
it, so it is imported here, when a figure is made, and never when steer starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotError(RuntimeError):
    pass


def new_figure(panels: int = 1) -> tuple[Any, Any]:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError(f"plots need matplotlib ({exc}); fix: pip install 'steer[bench]'") from None

    matplotlib.use("Agg")  # no display on a node or in CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    return figure, tuple(axes[0]) if panels > 1 else axes[0][0]


def save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def bars(result: dict[str, dict[str, float]], path: Path, ylabel: str, title: str) -> None:
    """One bar per configuration, for scenarios that compare configurations."""
    figure, axes = new_figure(1)
    names = list(result)
    axes.bar(names, [result[n] for n in names])
    axes.set(ylabel=ylabel, title=title)
    axes.tick_params(axis="x", rotation=20)
    save(figure, path)
