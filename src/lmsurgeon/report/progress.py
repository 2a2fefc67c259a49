"""How a long command shows where it is: live bars on a terminal, one plain line per stage in a log.

Rich bars redraw one screen line, which a CI log or ``cmd > log 2>&1`` records as nothing useful (or as
thousands of lines). So there are two outputs, and a caller never chooses between them itself:

- :func:`task` gives a stage a transient rich bar when the caller asks for bars (``enabled=True``, decided by
  the CLI from whether stderr is a terminal);
- :func:`stage` prints ``[  12.3 s] <message>`` on stderr, once per stage, when the CLI has switched stage lines
  on (stderr is not a terminal and the user did not pass ``--no-progress``). :func:`task` calls it for its label,
  so a stage that has a bar also has a line.

Library calls print nothing unless a CLI command switched stage lines on; :func:`show_stage_lines` switches them
off again when the command ends.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

#: ``update(completed)``: move a stage's bar to ``completed`` of its total (a no-op without a bar).
Advance = Callable[[int], None]

_lines_since: float | None = None  # monotonic start time while stage lines are on, else None


def show_stage_lines(enabled: bool) -> None:
    """Switch the plain per-stage lines on (timed from now) or off, for the rest of the command."""
    global _lines_since
    _lines_since = time.monotonic() if enabled else None


def stage(message: str) -> None:
    """Announce the start of one stage of a long command as one line on stderr, if stage lines are on."""
    if _lines_since is None:
        return
    print(f"[{time.monotonic() - _lines_since:7.1f} s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def task(label: str, total: int, enabled: bool) -> Iterator[Advance]:
    """One stage of ``total`` units: its stage line, and a transient rich bar while it runs when ``enabled``.

    Yields ``update(completed)``; the bar disappears when the block ends (its result is the caller's to print).
    """
    stage(f"{label} ({total} steps)" if total > 1 else label)
    if not enabled:
        yield _ignore
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task_id = progress.add_task(label, total=total)
        yield lambda completed: progress.update(task_id, completed=completed)


def _ignore(completed: int) -> None:
    """The update callback of a stage shown without a bar."""
