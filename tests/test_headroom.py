"""amp_lib.headroom: the per-layer fp16 headroom map, on real fp16-mixed runs with GradScaler('cpu')."""

from __future__ import annotations

import math

import pytest
import torch

from amp_lib.config import RunConfig
from amp_lib.headroom import (
    BF16_MAX,
    FP16_MAX,
    FP16_SMALLEST_NORMAL,
    FP16_SMALLEST_SUBNORMAL,
    HeadroomMap,
    headroom_doublings,
    headroom_table,
    tensor_stats,
    way_out,
)
from amp_lib.train import train


def user_run(name: str, **overrides) -> RunConfig:
    values = {"model": f"user_models:{name}", "steps": 3, "timing_warmup_steps": 1, "batch_size": 4, "device": "cpu"}
    return RunConfig(**{**values, **overrides})


# --- the statistics of one tensor ----------------------------------------------------------------


def test_fp16_limits_are_the_published_ones() -> None:
    assert (FP16_MAX, FP16_SMALLEST_SUBNORMAL, FP16_SMALLEST_NORMAL) == (65504.0, 2.0**-24, 2.0**-14)
    assert BF16_MAX == pytest.approx(3.3895e38, rel=1e-4)


def test_underflow_fractions_max_and_non_finite_of_a_tensor_with_known_values() -> None:
    x = torch.tensor([0.0, 1e-9, -1e-6, 1e-3, -2.0, math.inf])
    max_abs, below_subnormal, below_normal, nonfinite = tensor_stats(x).tolist()
    # non-zero finite values: 1e-9, 1e-6, 1e-3, 2 (zero is not an underflow; inf is not counted)
    assert (max_abs, below_subnormal, below_normal, nonfinite) == (2.0, 0.25, 0.5, 1.0)
    assert tensor_stats(torch.tensor([3.0, -4.0])).tolist() == [4.0, 0.0, 0.0, 0.0]
    assert tensor_stats(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert tensor_stats(torch.tensor([1e-5], dtype=torch.float16)).tolist()[1:3] == [0.0, 1.0]  # subnormal in fp16


def test_headroom_is_log2_of_the_range_over_the_largest_value() -> None:
    assert headroom_doublings(65504 / 8) == pytest.approx(3.0)
    assert headroom_doublings(1e5) < 0  # already over fp16's range
    assert headroom_doublings(1.0, BF16_MAX) == pytest.approx(math.log2(BF16_MAX))
    assert headroom_doublings(0.0) == math.inf and headroom_doublings(None) is None and headroom_doublings(math.nan) is None


# --- hooks: none when off, removed after -----------------------------------------------------------


def test_with_the_map_off_no_hook_is_registered_and_on_the_history_is_unchanged(user_models) -> None:
    import user_models as factories

    factories.HOOKED.clear()
    off = train(user_run("build_hook_probe", steps=4), write=False)
    counts = [c for c in factories.HOOKED if isinstance(c, int)]
    assert off.ok and counts and set(counts) == {0} and off.headroom is None
    factories.HOOKED.clear()
    on = train(user_run("build_hook_probe", steps=4, headroom_every=2), write=False)
    model, counts = factories.HOOKED[0], [c for c in factories.HOOKED if isinstance(c, int)]
    assert on.ok and set(counts) == {1}  # nn.Linear(8, 1) is its own only leaf module
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # removed when the run ended
    assert [r.loss for r in on.history] == [r.loss for r in off.history]  # hooks only read


def test_leaf_modules_are_named_by_their_qualified_names() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 1)))
    hmap = HeadroomMap(model, every=1)
    assert hmap.names == ["0", "1.0", "1.1"]
    hmap.remove()
    assert HeadroomMap(torch.nn.Linear(2, 2), every=1).names == ["(model)"]


# --- first overflow on real fp16 runs --------------------------------------------------------------


def test_a_forward_overflow_names_exactly_the_module_at_the_step_the_scaler_skipped(user_models) -> None:
    config = user_run("build_fp16_overflow", precision="fp16-mixed", allow_slow=True, steps=2, headroom_every=1,
                      log_every=2, init_scale=1024.0)  # fmt: skip
    result = train(config, write=False)
    assert [r.skipped for r in result.history] == [True, True]
    assert result.headroom["first_overflow"] == [
        {"step": 0, "module": "big", "phase": "forward", "loss_scale": 1024.0},
        {"step": 1, "module": "big", "phase": "forward", "loss_scale": 512.0},  # the scale backed off once
    ]
    sample = result.headroom["samples"][0]
    assert sample["activation"]["inp"]["nonfinite"] == 0.0 and sample["activation"]["big"]["nonfinite"] == 1.0
    assert sample["activation"]["inp"]["max_abs"] == 1.0  # the hidden units are exactly 1
    fp32 = train(RunConfig(**{**config.to_dict(), "precision": "fp32"}), write=False)
    assert fp32.headroom["first_overflow"] == []
    assert fp32.headroom["samples"][0]["activation"]["big"]["max_abs"] == 1e5  # before the first update
    big = next(row for row in headroom_table(fp32.headroom) if row["module"] == "big")
    assert big["max_activation"] >= 1e5 and big["fp16_headroom_activation"] == pytest.approx(
        math.log2(65504 / big["max_activation"])
    )
    assert big["fp16_headroom_activation"] < 0 < big["bf16_headroom_activation"]  # over fp16's range, not bf16's


def test_a_backward_overflow_names_the_first_gradient_that_became_non_finite(user_models) -> None:
    config = user_run("build_huge_loss", precision="fp16-mixed", allow_slow=True, steps=2, headroom_every=1, log_every=1)
    result = train(config, write=False)
    assert result.history[0].skipped
    assert result.headroom["first_overflow"][0] == {
        "step": 0, "module": "(model)", "phase": "backward", "loss_scale": 65536.0
    }
    assert result.headroom["samples"][0]["activation"]["(model)"]["nonfinite"] == 0.0  # the forward was fine


def test_a_healthy_run_has_no_first_overflow_and_samples_every_n_steps(user_models) -> None:
    config = user_run("build_ok", precision="fp16-mixed", allow_slow=True, steps=5, headroom_every=2, init_scale=256.0)
    result = train(config, write=False)
    assert result.ok and not any(r.skipped for r in result.history)
    assert result.headroom["first_overflow"] == [] and result.headroom["every"] == 2
    assert [s["step"] for s in result.headroom["samples"]] == [0, 2, 4]
    grad = result.headroom["samples"][0]["gradient"]["(model)"]
    assert grad["max_abs"] == pytest.approx(grad["max_abs_scaled"] / 256.0)  # unscaled by the scale in use
    (row,) = headroom_table(result.headroom)
    assert row["fp16_headroom_gradient"] == pytest.approx(math.log2(65504 / max(
        s["gradient"]["(model)"]["max_abs_scaled"] for s in result.headroom["samples"])))  # fmt: skip


def test_the_way_out_names_the_module_and_the_remedies() -> None:
    forward = {"step": 3, "module": "blocks.3.mlp.c_fc", "phase": "forward", "loss_scale": 1024.0}
    text = way_out(forward, bf16_available=True)
    assert text.startswith("`blocks.3.mlp.c_fc` overflowed fp16 first (forward, step 3): train in bf16-mixed")
    assert "torch.autocast(device_type, enabled=False)" in text and "init_scale" not in text
    backward = {**forward, "phase": "backward"}
    text = way_out(backward, bf16_available=False)
    assert "bf16" not in text and "start from a lower loss scale (init_scale below 1024)" in text
