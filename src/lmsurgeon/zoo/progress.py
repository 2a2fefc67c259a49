"""Rich progress bars for zoo training, or one plain line per model: callers get a per-step callback either way.

The bars share one live display (a row per model, with its loss); without them each training run announces
itself through :func:`lmsurgeon.report.progress.stage`, which prints only when the CLI has switched stage lines
on (output going to a log rather than a terminal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmsurgeon.report.progress import stage

StepCallback = Callable[[int, float], None]


class Bars:
    """One bar per training run when enabled; otherwise one stage line per run and a no-op callback."""

    def __init__(self, progress: Progress | None):
        self._progress = progress

    @contextlib.contextmanager
    def task(self, label: str, total: int) -> Iterator[StepCallback]:
        """A callback ``(step, loss)`` that advances the bar labelled ``label`` to ``step`` of ``total``."""
        if self._progress is None:
            stage(f"zoo: train {label} ({total} steps)")
            yield lambda step, loss: None
            return
        task_id = self._progress.add_task(label, total=total, loss=float("nan"))
        yield lambda step, loss: self._progress.update(task_id, completed=step, loss=loss)


@contextlib.contextmanager
def bars(enabled: bool) -> Iterator[Bars]:
    """A live rich progress display for the duration, or a silent stand-in."""
    if not enabled:
        yield Bars(None)
        return
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        yield Bars(progress)
