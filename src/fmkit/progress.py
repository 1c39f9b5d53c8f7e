"""Rich progress bars shared by every long-running verb: done/total, rate, elapsed and ETA."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)   # progress and status
report = Console()                # results a user reads or pipes


class RateColumn(ProgressColumn):
    """Completed units per second, e.g. '3.2 MB/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} {self.unit}/s" if task.speed else f"- {self.unit}/s")


def interactive() -> bool:
    """True when a live progress bar can be drawn (stderr is a terminal and FMKIT_QUIET is not set)."""
    return os.environ.get("FMKIT_QUIET") != "1" and sys.stderr.isatty()


def status(line: str) -> None:
    """A plain progress line for logs (no terminal): printed where a bar would otherwise be drawn."""
    if os.environ.get("FMKIT_QUIET") != "1" and not sys.stderr.isatty():
        console.print(line, highlight=False, soft_wrap=True)


def warn(line: str) -> None:
    """Something the user should know that is not an error (a slower path taken, a default applied), on stderr."""
    console.print(f"note: {line}", highlight=False, soft_wrap=True)


def progress_bar(label: str, unit: str = "it", extra: str = "") -> Progress:
    """A progress bar for `label`; `extra` is a rich format string over the task's fields (loss, tok/s, ...).

    Quiet when stderr is not a terminal (CI logs stay readable) or FMKIT_QUIET=1.
    """
    columns = [TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(bar_width=30),
               MofNCompleteColumn(), RateColumn(unit)]
    if extra:
        columns.append(TextColumn(extra))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=not interactive())
