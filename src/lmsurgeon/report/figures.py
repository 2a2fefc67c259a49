"""matplotlib set-up shared by every capability: headless (Agg) and a consistent look."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def new_figure(width: float = 6.0, height: float = 4.0, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    """A figure and its axes, sized in inches; callers hand it to ``RunFolder.save_figure``.

    The axes are one ``Axes`` for a 1×1 grid and an ``nrows × ncols`` array of them otherwise (hence ``Any``).
    """
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    return fig, (axes[0, 0] if nrows == ncols == 1 else axes)
