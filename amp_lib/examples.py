"""Example user workloads for `RunConfig(model="amp_lib.examples:linear_regression")`.

Copy one into your own package and point `model` at it: `"my_pkg.my_module:build"`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from amp_lib.config import RunConfig
from amp_lib.precision import resolve_device


def linear_regression(config: RunConfig) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """A model, its batches (already on the run's device) and a loss: the whole user contract."""
    device = resolve_device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    true_w = torch.randn(32, 1, generator=gen)
    batches = []
    for _ in range(8):
        x = torch.randn(config.batch_size, 32, generator=gen)
        batches.append((x.to(device), (x @ true_w).to(device)))
    return torch.nn.Linear(32, 1), batches, F.mse_loss
