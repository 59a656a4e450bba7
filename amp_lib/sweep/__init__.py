"""Sweeps: `train.ipynb` executed by papermill over precisions x seeds x parameters, then the report.

`grid` expands the grid into runs (pure), `execute` runs them (resumably, failures isolated),
`publish` writes the report files, `cli` is `python -m amp_lib.sweep` and its Python face `sweep()`.
"""
