"""Tables for the CLI: rich tables on a terminal, plain aligned text otherwise (pipes, tests,
scripts: one row per line, columns separated by two or more spaces)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from rich.table import Table


def plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
                     for row in (header, *rows))


def rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> Table:

    table = Table(title=title or None, header_style="bold", box=None, pad_edge=False)
    for name in header:
        table.add_column(name, no_wrap=name in ("MODEL", "INSTANCE", "POD", "TENANT"))
    for row in rows:
        table.add_row(*row)
    return table


def show(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if out.isatty():
        from rich.console import Console

        Console(file=out).print(rich_table(header, rows))
    else:
        print(plain(header, rows), file=out)
