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


def progress_bar(label: str, unit: str = "it", extra: str = "") -> Progress:
    """A progress bar for `label`; `extra` is a rich format string over the task's fields (loss, tok/s, ...).

    Quiet when stderr is not a terminal (CI logs stay readable) or FMKIT_QUIET=1.
    """
    quiet = os.environ.get("FMKIT_QUIET") == "1" or not sys.stderr.isatty()
    columns = [TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(bar_width=30),
               MofNCompleteColumn(), RateColumn(unit)]
    if extra:
        columns.append(TextColumn(extra))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=quiet)
