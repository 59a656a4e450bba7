"""nbval runs a notebook's cells as separate test items, which pytest-randomly would shuffle.

A notebook only works top to bottom in one kernel, so after pytest-randomly has reordered the session
(its hook is a `tryfirst` wrapper that shuffles before every plain implementation runs), each
notebook's cells go back together, in file order, where its first cell landed. Everything else keeps
its random order.
"""

from __future__ import annotations

import pytest


def _is_cell(item: pytest.Item) -> bool:
    return type(item).__name__ == "IPyNbCell"  # nbval's cell item


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    notebooks: dict[str, list[pytest.Item]] = {}
    for item in items:
        if _is_cell(item):
            notebooks.setdefault(item.parent.nodeid, []).append(item)
    ordered: list[pytest.Item] = []
    for item in items:
        if not _is_cell(item):
            ordered.append(item)
        elif item.parent.nodeid in notebooks:  # the notebook's first slot: all its cells, in order
            ordered.extend(sorted(notebooks.pop(item.parent.nodeid), key=lambda cell: cell.cell_num))
    items[:] = ordered
