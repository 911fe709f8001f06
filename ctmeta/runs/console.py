"""Console output of a run: log lines on stdout, warnings and progress bars on stderr."""

from __future__ import annotations

import math

__all__ = ["Reporter", "format_duration", "one_line"]


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Reporter:
    """Progress bars (rich, on stderr) and log lines (stdout).

    The bars are drawn only when stderr is a terminal: written to a file or
    a pipe, the output is the log lines alone (as with `quiet`)."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        import sys

        self.quiet = quiet or silent or not _is_terminal(sys.stderr)
        #: Print nothing at all (the processes other than 0 of a multi-process run).
        self.silent = silent

    def log(self, message: str) -> None:
        if not self.silent:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """`ctmeta: warning: <message>` on stderr, on one line."""
        if not self.silent:
            import sys

            print(f"ctmeta: warning: {one_line(message)}", file=sys.stderr, flush=True)

    def progress(self, description: str, total: int, completed: int = 0):
        return _Bar(description, total, completed, enabled=not self.quiet)


class _Bar:
    def __init__(self, description, total, completed, enabled):
        self.enabled = enabled
        self.description = description
        self.total = total
        self.completed = completed
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class RateColumn(ProgressColumn):
                def render(self, task):
                    speed = task.finished_speed or task.speed
                    if speed is None:
                        return Text("-- it/s", style="progress.data.speed")
                    if speed < 1:
                        return Text(f"{1 / speed:.2f} s/it", style="progress.data.speed")
                    return Text(f"{speed:.1f} it/s", style="progress.data.speed")

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed)
        return self

    def update(self, completed: int) -> None:
        self.completed = completed
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def one_line(message) -> str:
    """`message` on one line: its lines joined by "; " (or a space after a
    full stop, nothing before a closing bracket), for a library's multi-line
    error text, say."""
    out = ""
    for line in (line.strip() for line in str(message).strip().splitlines()):
        if not line:
            continue
        if not out:
            out = line
        elif line[0] in ")]}.,;:" or out[-1] in "([{":
            out += line
        elif out[-1] in ".;:,":
            out += " " + line
        else:
            out += "; " + line
    return out


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (or `M:SS` under an hour); `--:--` for a non-finite duration."""
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
