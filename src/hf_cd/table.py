"""A small table of result rows shared by the diagnostics, the quantization reports and the Hub card.

Rows are plain dicts so they go to JSON unchanged; markdown and pandas are views of the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def _format_cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format(value, float_format)
    return str(value)


class Table:
    """An ordered list of rows (dicts) with stable column order.

    Why a class at all: every report in the library needs the same three views (JSON-ready list,
    markdown, pandas), and they must agree with each other.
    """

    def __init__(self, rows: Iterable[dict[str, Any]] = (), columns: Sequence[str] | None = None):
        self.rows: list[dict[str, Any]] = [dict(row) for row in rows]
        if columns is None:
            seen: dict[str, None] = {}
            for row in self.rows:
                for key in row:
                    seen.setdefault(key, None)
            columns = list(seen)
        self.columns: list[str] = list(columns)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.rows)} rows, columns={self.columns})"

    def where(self, **equals: Any) -> Table:
        """Rows whose columns equal the given values, e.g. ``table.where(kind="ffn")``."""
        kept = [row for row in self.rows if all(row.get(k) == v for k, v in equals.items())]
        return type(self)(kept, self.columns)

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]

    def to_dicts(self) -> list[dict[str, Any]]:
        """A JSON-ready copy of the rows (what `results.json`, the Hub card and benchmarks store)."""
        return json.loads(json.dumps(self.rows, default=_json_default))

    def to_pandas(self):
        """The rows as a `pandas.DataFrame` (``pip install 'hf-cd[pandas]'``)."""
        from hf_cd.extras import require

        pd = require("pandas", "Table.to_pandas")

        return pd.DataFrame(self.rows, columns=self.columns)

    def to_markdown(self, float_format: str = ".4g", columns: Sequence[str] | None = None) -> str:
        columns = list(columns or self.columns)
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(_format_cell(row.get(c), float_format) for c in columns) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
