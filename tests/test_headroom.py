"""amp_lib.headroom: the per-layer fp16 headroom map, on real fp16-mixed runs with GradScaler('cpu')."""

from __future__ import annotations

import math
from collections import OrderedDict

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


def one_step(
    hmap: HeadroomMap, model: torch.nn.Module, x: torch.Tensor, *, scale: float | None = None, skipped: bool = False
) -> None:
    """Step 0 the way the training loop drives the map: a real forward and backward (the loss multiplied
    by `scale`, as a loss scaler does), then a flush with what the scaler reported."""
    hmap.begin_step(0)
    (model(x).sum() * (scale or 1.0)).backward()
    hmap.end_step(0)
    hmap.flush([skipped], [scale])


def linears(**weights: float) -> torch.nn.Sequential:
    """Bias-free 1 -> 1 linear layers in a row, each multiplying by its given weight."""
    layers = OrderedDict((name, torch.nn.Linear(1, 1, bias=False)) for name in weights)
    with torch.no_grad():
        for name, w in weights.items():
            layers[name].weight.fill_(w)
    return torch.nn.Sequential(layers)


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


def test_values_exactly_at_fp16s_smallest_subnormal_and_normal_are_not_underflows() -> None:
    x = torch.tensor([FP16_SMALLEST_SUBNORMAL, FP16_SMALLEST_NORMAL, 1.0])
    assert x.half().float().tolist() == x.tolist()  # both limits are fp16 numbers: nothing is lost at them
    max_abs, below_subnormal, below_normal, _ = tensor_stats(x).tolist()
    assert (max_abs, below_subnormal) == (1.0, 0.0) and below_normal == pytest.approx(1 / 3)  # only 2**-24


# meta: a device with no data, where torch loads its shape functions on first use (~2 s, once per process)
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("meta", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]
)
def test_an_empty_tensor_has_zero_stats_on_its_own_device(device) -> None:
    stats = tensor_stats(torch.empty(0, 3, device=device))  # e.g. a layer's output for a zero-length sequence
    assert stats.device.type == device and stats.shape == (4,) and stats.dtype == torch.float32
    if device != "meta":  # a meta tensor has a device and a shape but no values
        assert stats.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_headroom_is_log2_of_the_range_over_the_largest_value() -> None:
    assert headroom_doublings(65504 / 8) == pytest.approx(3.0)
    assert headroom_doublings(1e5) < 0  # already over fp16's range
    assert headroom_doublings(1.0, BF16_MAX) == pytest.approx(math.log2(BF16_MAX))
    assert (
        headroom_doublings(0.0) == math.inf
        and headroom_doublings(None) is None
        and headroom_doublings(math.nan) is None
    )


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
    # without a loss scaler no sample is divided by a scale, the first one included
    samples = on.headroom["samples"]
    assert [s["step"] for s in samples] == [0, 2] and [s["loss_scale"] for s in samples] == [None, None]
    assert all(g["max_abs"] == g["max_abs_scaled"] for s in samples for g in s["gradient"].values())


def test_leaf_modules_are_named_by_their_qualified_names() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 1)))
    hmap = HeadroomMap(model, every=1)
    assert hmap.names == ["0", "1.0", "1.1"]
    hmap.remove()
    assert HeadroomMap(torch.nn.Linear(2, 2), every=1).names == ["(model)"]


class TopOne(torch.nn.Module):
    """A leaf module with an integer output (the index of the best score)."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.argmax(-1, keepdim=True)


class Picker(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.score, self.top = torch.nn.Linear(4, 3), TopOne()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.score(x)
        return scores.gather(1, self.top(scores))


def test_only_floating_point_outputs_are_measured() -> None:
    model = Picker()
    hmap = HeadroomMap(model, every=1)
    one_step(hmap, model, torch.randn(2, 4))
    assert hmap.names == ["score", "top"]  # hooked: an integer output is only known when it runs
    (sample,) = hmap.samples
    assert list(sample["activation"]) == ["score"] and list(sample["gradient"]) == ["score"]
    assert [row["max_activation"] for row in headroom_table(hmap.to_dict())][1] is None


def test_a_forward_outside_a_step_is_not_recorded_and_removing_twice_is_harmless() -> None:
    model = torch.nn.Linear(2, 1)
    hmap = HeadroomMap(model, every=1)
    model(torch.full((1, 2), math.inf))  # before the first step (a user's own check of the model): not a step
    hmap.flush([], [])
    assert hmap.samples == [] and hmap.first_overflow == []
    hmap.remove()
    hmap.remove()
    assert not model._forward_hooks


# --- first overflow on real fp16 runs --------------------------------------------------------------


def test_an_overflow_on_an_unsampled_step_still_names_the_module_across_flushes(user_models) -> None:
    config = user_run("build_fp16_overflow", precision="fp16-mixed", allow_slow=True, steps=2, headroom_every=4,
                      log_every=1, init_scale=1024.0)  # fmt: skip
    result = train(config, write=False)  # step 1 is not sampled (every 4th step is), and flushed on its own
    assert [s["step"] for s in result.headroom["samples"]] == [0]
    assert result.headroom["first_overflow"] == [
        {"step": 0, "module": "big", "phase": "forward", "loss_scale": 1024.0},
        {"step": 1, "module": "big", "phase": "forward", "loss_scale": 512.0},
    ]


def test_a_skipped_step_whose_outputs_and_gradients_were_all_finite_names_no_module() -> None:
    # The scaler also skips a step for an overflow in a weight's own gradient, which no module output shows.
    model = torch.nn.Linear(2, 1)
    hmap = HeadroomMap(model, every=1)
    one_step(hmap, model, torch.ones(1, 2), scale=8.0, skipped=True)
    assert hmap.first_overflow == [] and [s["step"] for s in hmap.samples] == [0]


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
    config = user_run(
        "build_huge_loss", precision="fp16-mixed", allow_slow=True, steps=2, headroom_every=1, log_every=1
    )
    result = train(config, write=False)
    assert result.history[0].skipped
    assert result.headroom["first_overflow"][0] == {
        "step": 0,
        "module": "(model)",
        "phase": "backward",
        "loss_scale": 65536.0,
    }
    assert result.headroom["samples"][0]["activation"]["(model)"]["nonfinite"] == 0.0  # the forward was fine


def test_a_healthy_run_has_no_first_overflow_and_samples_every_n_steps(user_models) -> None:
    config = user_run("build_ok", precision="fp16-mixed", allow_slow=True, steps=5, headroom_every=2, init_scale=256.0)
    result = train(config, write=False)
    assert result.ok and not any(r.skipped for r in result.history)
    assert result.headroom["first_overflow"] == [] and result.headroom["every"] == 2
    assert [s["step"] for s in result.headroom["samples"]] == [0, 2, 4]
    assert [s["loss_scale"] for s in result.headroom["samples"]] == [256.0] * 3
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


@pytest.mark.parametrize("loss_scale", [None, "missing"])
def test_the_way_out_of_a_backward_overflow_without_a_known_scale_starts_below_the_default(loss_scale) -> None:
    overflow = {"step": 0, "module": "fc", "phase": "backward", "loss_scale": loss_scale}
    if loss_scale == "missing":
        del overflow["loss_scale"]
    remedies = way_out(overflow, bf16_available=True).split(": ", 1)[1].split("; or ")
    assert [r.split(" ", 2)[:2] for r in remedies] == [["train", "in"], ["keep", "`fc`"], ["start", "from"]]
    assert remedies[-1] == "start from a lower loss scale (init_scale below 65536)"  # GradScaler's default, 2**16


# --- the per-module table --------------------------------------------------------------------------


def test_a_table_row_has_the_maxima_headroom_and_worst_underflow_of_its_module() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 2.0**-16]]))
    hmap = HeadroomMap(model, every=1)
    one_step(hmap, model, torch.ones(1, 2))  # fp32: no loss scale, the gradient of the sum is 1 everywhere
    (sample,) = hmap.samples
    assert sample["loss_scale"] is None and sample["gradient"]["(model)"]["max_abs"] == 1.0
    assert headroom_table(hmap.to_dict()) == [
        {
            "module": "(model)",
            "max_activation": 3.0,
            "max_gradient": 1.0,
            "fp16_headroom_activation": math.log2(FP16_MAX / 3.0),
            "bf16_headroom_activation": math.log2(BF16_MAX / 3.0),
            "fp16_headroom_gradient": math.log2(FP16_MAX),
            "underflow_subnormal": 0.0,
            "underflow_normal": 0.5,  # the activation 2**-16 of the two
            "nonfinite": False,
        }
    ]


def test_an_inf_leaves_no_headroom_whatever_the_finite_values_and_only_in_its_own_phase() -> None:
    # x = 1: "a" outputs 1e-3, "b" 1e35, "c" 1e45 = inf in fp32. Scaled by 10, the gradient flowing back into
    # "c" is 10, into "b" 1e11 and into "a" 1e49 = inf.
    model = linears(a=1e-3, b=1e38, c=1e10)
    hmap = HeadroomMap(model, every=1)
    one_step(hmap, model, torch.ones(1, 1), scale=10.0, skipped=True)
    assert hmap.first_overflow == [{"step": 0, "module": "c", "phase": "forward", "loss_scale": 10.0}]
    a, b, c = headroom_table(hmap.to_dict())
    assert a["max_activation"] == pytest.approx(1e-3) and a["max_gradient"] == math.inf
    assert a["fp16_headroom_activation"] == pytest.approx(math.log2(FP16_MAX / 1e-3))
    assert a["fp16_headroom_gradient"] == -math.inf and a["nonfinite"]
    assert b["max_activation"] == pytest.approx(1e35, rel=1e-5) and b["max_gradient"] == pytest.approx(1e10, rel=1e-5)
    assert b["fp16_headroom_activation"] < 0 < b["bf16_headroom_activation"] and not b["nonfinite"]
    assert b["fp16_headroom_gradient"] == pytest.approx(math.log2(FP16_MAX / 1e11), rel=1e-5)  # the scaled one
    assert c["max_activation"] == math.inf and c["max_gradient"] == pytest.approx(1.0) and c["nonfinite"]
    assert c["fp16_headroom_activation"] == c["bf16_headroom_activation"] == -math.inf
    assert c["fp16_headroom_gradient"] == pytest.approx(math.log2(FP16_MAX / 10.0))


class FrozenStem(torch.nn.Module):
    """A frozen first layer (its output takes no gradient) and a spare layer the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head, self.spare = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def test_a_module_that_never_ran_or_took_no_gradient_has_empty_cells() -> None:
    model = FrozenStem()
    hmap = HeadroomMap(model, every=1)
    one_step(hmap, model, torch.ones(1, 2))
    stem, head, spare = headroom_table(hmap.to_dict())
    assert (stem["module"], head["module"], spare["module"]) == ("stem", "head", "spare")
    assert stem["max_activation"] > 0 and stem["underflow_normal"] is not None
    assert stem["max_gradient"] is None and stem["fp16_headroom_gradient"] is None
    assert head["max_gradient"] == 1.0
    assert spare == {
        "module": "spare", "max_activation": None, "max_gradient": None, "fp16_headroom_activation": None,
        "bf16_headroom_activation": None, "fp16_headroom_gradient": None, "underflow_subnormal": None,
        "underflow_normal": None, "nonfinite": False,
    }  # fmt: skip


def test_a_map_without_modules_samples_or_scaled_maxima_still_gives_a_table() -> None:
    # what a map read back from an older or cut-short result may lack
    assert headroom_table({}) == []
    (row,) = headroom_table({"modules": ["fc"]})
    assert row["max_activation"] is row["max_gradient"] is row["underflow_normal"] is None
    stats = {"max_abs": 2.0, "underflow_subnormal": 0.0, "underflow_normal": 0.0, "nonfinite": 0.0}
    old = {"modules": ["fc"], "samples": [{"step": 0, "activation": {"fc": stats}, "gradient": {"fc": stats}}]}
    (row,) = headroom_table(old)  # no "max_abs_scaled": the gradient's max_abs is the one to use
    assert row["fp16_headroom_gradient"] == pytest.approx(math.log2(FP16_MAX / 2.0)) and row["max_gradient"] == 2.0
