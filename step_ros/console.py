"""What every command prints: one rich console, tables, percentages and JSON files.

The ground floor of the package: training, bags, deploy and the node's tools all report
through these helpers, so output looks the same everywhere.  The console reads no markup and
highlights nothing, and tables are built from plain ``Text``: program text such as
``[human_action]`` or ``step_ros[tensorrt]`` prints as written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

# markup=False: program text ("[human_action]", "step_ros[tensorrt]", paths) prints as written;
# styles are given explicitly (style=..., or :func:`step`).
console = Console(markup=False, highlight=False, width=None if sys.stdout.isatty() else 150)  # logs: wide tables


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))  # Paths and the like as text
    return path


def step(label: str, text: str) -> None:
    """A numbered stage of a long job: the label in bold, the rest as written."""
    console.print(Text.assemble((label, "bold"), " ", text))


def error(text: str) -> None:
    console.print(text, style="red")


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]], text_columns: int = 1) -> None:
    """A table; the first ``text_columns`` columns are left-aligned, the rest (numbers) right."""
    table = Table(title=Text(title), title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(Text(c), justify="left" if i < text_columns else "right")
    for row in rows:
        table.add_row(*[Text(str(x)) for x in row])
    console.print(table)


__all__ = ["console", "error", "pct", "print_table", "step", "write_json"]
