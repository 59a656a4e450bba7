"""nbval's hooks for the notebooks in notebooks/ (here, not there, so JupyterLab's file browser, rooted at
notebooks/, shows only notebooks).

nbval runs a notebook's cells as separate test items, which pytest-randomly would shuffle.

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


# -- no litter: nbval starts each notebook's kernel in notebooks/, where train.ipynb would write results/
# and W&B its wandb/ folder. Before the first cell, the kernel moves to a temp folder of its own (W&B and
# tempfile follow it), which is removed when the session ends.

_KERNEL_SETUP = """
import os as _os, tempfile as _tempfile
_os.chdir({folder!r})
for _name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    _os.environ[_name] = _os.path.join({folder!r}, _name.lower())
    _os.makedirs(_os.environ[_name], exist_ok=True)
_os.environ.setdefault("WANDB_MODE", "offline")
_os.environ["TMPDIR"] = _tempfile.tempdir = {folder!r}
del _os, _tempfile, _name
"""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    yield  # nbval's setup has started the notebook's kernel
    notebook = item.parent
    if not _is_cell(item) or getattr(notebook, "_amp_workdir", None) is not None or notebook.kernel is None:
        return
    root = item.config._tmp_path_factory.mktemp("nbval")  # the session's pytest temp folder
    notebook._amp_workdir = root
    kernel = notebook.kernel
    msg_id = kernel.kc.execute(_KERNEL_SETUP.format(folder=str(root)), store_history=False, stop_on_error=False)
    kernel.await_idle(msg_id, 60)
