"""What every command prints: one rich console, tables, percentages and JSON files.

The ground floor of the package: training, bags, deploy and the node's tools all report
through these helpers, so output looks the same everywhere.  ``highlight=False`` and tables
built from plain strings keep program text such as ``[human_action]`` from being read as markup.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)  # logs: wide tables


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))  # Paths and the like as text
    return path


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    table = Table(title=Text(title), title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(Text(c), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[Text(str(x)) for x in row])
    console.print(table)


__all__ = ["console", "pct", "print_table", "write_json"]
