"""amp_lib.examples: the example user workload, as a factory, as a workload and trained end to end."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from amp_lib.config import RunConfig
from amp_lib.examples import linear_regression
from amp_lib.models import build_workload
from amp_lib.train import seed_everything, train

SPEC = "amp_lib.examples:linear_regression"

# --- the factory ---------------------------------------------------------------------------------


def test_example_workload_is_seeded_and_fits_its_targets():
    config = RunConfig(model=SPEC, batch_size=5, device="cpu", seed=3)
    model, batches, loss_fn = linear_regression(config)
    again = linear_regression(config)[1]
    assert len(batches) == 8 and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again)
    )
    x, y = batches[0]
    assert model(x).shape == y.shape == (5, 1) and loss_fn(model(x), y).ndim == 0
    assert loss_fn is F.mse_loss
    other = linear_regression(RunConfig(model=SPEC, batch_size=5, device="cpu", seed=4))[1]
    assert not torch.equal(other[0][0], x)


def test_example_targets_are_one_linear_map_of_the_inputs():
    _, batches, _ = linear_regression(RunConfig(model=SPEC, batch_size=40, device="cpu"))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    w = torch.linalg.lstsq(x, y).solution  # an exact fit exists: the task is learnable to zero loss
    torch.testing.assert_close(x @ w, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_example_batches_are_on_the_configs_device(device):
    model, batches, _ = linear_regression(RunConfig(model=SPEC, device=device))
    assert {t.device.type for batch in batches for t in batch} == {device}
    assert next(model.parameters()).device.type == "cpu"  # the loop moves the model, after the precision cast


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_the_example_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"device 'cuda' requested but CUDA is not available; valid here: 'auto', 'cpu'"
    ):
        linear_regression(RunConfig(model=SPEC, device="cuda"))


# --- as a workload -------------------------------------------------------------------------------


def test_examples_linear_regression_workload():
    config = RunConfig(model=SPEC, batch_size=6, device="cpu")
    w = build_workload(config, torch.device("cpu"))
    x, y = w.train_batches[0]
    assert x.shape == (6, 32) and y.shape == (6, 1)
    assert w.items_per_batch == 6 and w.item_unit == "samples"
    assert len(w.train_batches) == 8 and w.eval_batches is w.train_batches


# --- trained -------------------------------------------------------------------------------------


def initial_losses(config: RunConfig) -> list[float]:
    """fp32 losses of the untrained model on its 8 batches, built the way train() builds them."""
    seed_everything(config.seed)
    w = build_workload(config, torch.device("cpu"))
    with torch.no_grad():
        return [float(w.loss_fn(w.model(x), y)) for x, y in (w.train_batches[i] for i in range(8))]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_examples_linear_regression_trains(tiny_config, precision):
    config = tiny_config(model=SPEC, precision=precision, lr=5e-2, steps=16)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.metrics.throughput_unit == "samples"
    # eval runs over the same 8 batches the run cycles through: compare with the untrained model on them
    before = statistics.mean(initial_losses(config))
    assert result.metrics.eval_loss < 0.8 * before, (result.metrics.eval_loss, before)
    assert config.result_path.name == f"amp_lib.examples.linear_regression-{precision}-s0-{config.identity}.json"
    assert config.result_path.exists()
