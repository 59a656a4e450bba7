"""AmpScaler and GradScaler's internals on a real `torch.amp.GradScaler('cpu')`: skips, backoff, growth,
clipping and state. Finding a trainer's scaler and reading its scale are `amp_lib.amp_state`'s (tests/test_amp_state.py)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from amp_lib.record import Diverged, check_divergence
from amp_lib.results import HistoryRow
from amp_lib.scaler import (
    COLLAPSED_SCALE,
    AmpScaler,
    StepOutcome,
    check_gradscaler_internals,
    found_inf,
    scale_tensor,
    total_grad_norm,
)

DEFAULT_INIT = 2.0**16


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)


def fp16_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    return nn.functional.mse_loss(out.float(), y)


def fp32_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def clean_step(model, opt, scaler, x, y, max_grad_norm=None) -> StepOutcome:
    opt.zero_grad(set_to_none=True)
    return scaler.step(fp16_loss(model, x, y), opt, max_grad_norm)


def inf_step(model, opt, scaler, x, y, max_grad_norm=None) -> StepOutcome:
    opt.zero_grad(set_to_none=True)
    return scaler.step(fp16_loss(model, x, y) * float("inf"), opt, max_grad_norm)


# --- skipping and backoff -----------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no-clip", "clip"])
def test_inf_loss_skips_the_step_leaves_params_and_halves_the_scale(max_grad_norm):
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    before = params_of(model)
    outcome = inf_step(model, opt, scaler, x, y, max_grad_norm)
    assert bool(outcome.skipped)
    assert not math.isfinite(float(outcome.grad_norm))
    assert same_params(before, params_of(model))
    assert scaler.get_scale() == DEFAULT_INIT * 0.5 == float(outcome.scale)


def test_inf_gradient_from_a_backward_hook_skips_the_whole_step():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    last_bias = list(model.parameters())[-1]
    handle = last_bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = params_of(model)
    first = clean_step(model, opt, scaler, x, y, max_grad_norm=1.0)
    handle.remove()
    assert bool(first.skipped)
    assert same_params(before, params_of(model)), "no parameter moves on a skipped step, not only the inf one"
    assert scaler.get_scale() == DEFAULT_INIT / 2
    # the next clean step goes through
    second = clean_step(model, opt, scaler, x, y, max_grad_norm=1.0)
    assert not bool(second.skipped)
    assert not same_params(before, params_of(model))
    assert [bool(first.skipped), bool(second.skipped)] == [True, False]
    assert [float(first.scale), float(second.scale)] == [DEFAULT_INIT / 2] * 2


def test_clean_fp16_step_updates_params_and_keeps_scale():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    before = params_of(model)
    outcome = clean_step(model, opt, scaler, x, y)
    assert not bool(outcome.skipped)
    assert math.isfinite(float(outcome.grad_norm)) and float(outcome.grad_norm) > 0
    assert not same_params(before, params_of(model))
    assert scaler.get_scale() == DEFAULT_INIT == float(outcome.scale)
    assert outcome.skipped.dtype == torch.bool and outcome.skipped.shape == ()


def test_growth_after_growth_interval_clean_steps_and_not_before():
    interval = 3
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpScaler("cpu", growth_interval=interval)
    init = scaler.get_scale()
    for _ in range(interval - 1):
        clean_step(model, opt, scaler, x, y)
        assert scaler.get_scale() == init
    clean_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == init * 2.0
    for _ in range(interval - 1):
        clean_step(model, opt, scaler, x, y)
        assert scaler.get_scale() == init * 2.0
    clean_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == init * 4.0


def test_an_overflow_resets_the_growth_count():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpScaler("cpu", growth_interval=2)
    init = scaler.get_scale()
    clean_step(model, opt, scaler, x, y)
    inf_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == init / 2
    clean_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == init / 2  # one clean step since the overflow: no growth yet
    clean_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == init


def test_each_outcome_records_its_skip_and_the_scale_after_it():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpScaler("cpu", init_scale=1024.0, growth_interval=100)
    pattern = [False, True, False, True, True, False]  # True: overflow
    expected, scale = [], 1024.0
    outcomes = []
    for overflow in pattern:
        outcomes.append((inf_step if overflow else clean_step)(model, opt, scaler, x, y))
        scale = scale * 0.5 if overflow else scale
        expected.append(scale)
    assert [bool(o.skipped) for o in outcomes] == pattern
    assert [float(o.scale) for o in outcomes] == expected
    # each outcome is a snapshot: later steps (which update GradScaler's scale in place) leave it as it was
    inf_step(model, opt, scaler, x, y)
    assert [float(o.scale) for o in outcomes] == expected
    assert [bool(o.skipped) for o in outcomes] == pattern
    assert scaler.get_scale() == scale / 2


def test_accumulation_update_false_only_backwards():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    before = params_of(model)
    assert scaler.step(fp16_loss(model, x, y), opt, update=False) is None
    assert same_params(before, params_of(model))
    assert all(p.grad is not None for p in model.parameters())
    one_micro = [p.grad.clone() for p in model.parameters()]
    outcome = scaler.step(fp16_loss(model, x, y), opt)
    assert not bool(outcome.skipped)
    assert not same_params(before, params_of(model))
    # the unscaled gradient of two identical micro-batches is twice that of one (scaled grads accumulate)
    for g1, p in zip(one_micro, model.parameters()):
        torch.testing.assert_close(p.grad, 2 * g1 / scaler.get_scale(), rtol=1e-5, atol=1e-7)
    assert float(outcome.scale) == DEFAULT_INIT


# --- clipping sees unscaled gradients -----------------------------------------------------------


def reference_norm(seed: int, loss_fn, scale_loss: float = 1.0) -> float:
    """Total grad norm of the same model and batch, without any scaler."""
    model, (x, y) = make_model(seed), make_batch()
    (loss_fn(model, x, y) * scale_loss).backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


@pytest.mark.parametrize("max_grad_norm", [None, 1e9], ids=["total_grad_norm", "clip_grad_norm_"])
def test_grad_norm_is_of_unscaled_gradients_fp32_forward(max_grad_norm):
    expected = reference_norm(3, fp32_loss)
    model, (x, y) = make_model(3), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    outcome = scaler.step(fp32_loss(model, x, y), opt, max_grad_norm)
    assert float(outcome.grad_norm) == pytest.approx(expected, rel=1e-5)
    assert scaler.get_scale() > 1000  # the scale really was large: a scaled norm would be far off


def test_grad_norm_is_of_unscaled_gradients_fp16_autocast():
    expected = reference_norm(4, fp32_loss)
    model, (x, y) = make_model(4), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    outcome = scaler.step(fp16_loss(model, x, y), opt, max_grad_norm=1e9)
    assert float(outcome.grad_norm) == pytest.approx(expected, rel=2e-2)


def test_extreme_finite_gradients_are_clipped_to_max_after_unscale():
    big = 1e6
    expected = reference_norm(5, fp32_loss, scale_loss=big)
    model, (x, y) = make_model(5), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = AmpScaler("cpu")
    max_norm = 0.5
    outcome = scaler.step(fp32_loss(model, x, y) * big, opt, max_grad_norm=max_norm)
    assert not bool(outcome.skipped)
    assert expected > 1e3 * max_norm
    assert float(outcome.grad_norm) == pytest.approx(expected, rel=1e-4)  # reported: before clipping
    assert float(total_grad_norm(list(model.parameters()))) == pytest.approx(max_norm, rel=1e-3)
    assert scaler.get_scale() == DEFAULT_INIT


@pytest.mark.parametrize("factor", [1.0, 1e6, 1e25, float("inf"), float("nan")], ids=repr)
@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no-clip", "clip"])
def test_skipped_is_exactly_gradscalers_decision(factor, max_grad_norm):
    # 1e25: every gradient is finite (GradScaler steps and keeps its scale) though their fp32 norm overflows
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    scaler = AmpScaler("cpu")
    outcome = scaler.step(fp32_loss(model, x, y) * factor, opt, max_grad_norm)
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    backed_off = scaler.get_scale() < DEFAULT_INIT
    assert bool(outcome.skipped) is backed_off
    assert backed_off is (not math.isfinite(factor))
    assert float(outcome.scale) == scaler.get_scale()
    if factor == 1e25:
        assert grads_finite


def test_zero_gradients_norm_zero_and_clipping_changes_nothing():
    model, (x, _) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no weight decay, no momentum: zero grad, no move
    scaler = AmpScaler("cpu")
    before = params_of(model)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = (model(x).float() * 0).sum()  # an fp16 loss would overflow when scaled by 65536
    outcome = scaler.step(loss, opt, max_grad_norm=1.0)
    assert float(outcome.grad_norm) == 0.0
    assert not bool(outcome.skipped)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert same_params(before, params_of(model))


@pytest.mark.parametrize("off", [None, 0, 0.0, -1.0], ids=repr)
def test_max_grad_norm_zero_or_less_means_no_clipping(off):
    # the same step with clipping off and with a huge limit moves the parameters identically
    runs = []
    for max_grad_norm in (off, 1e9):
        model, (x, y) = make_model(6), make_batch()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        outcome = AmpScaler("cpu").step(fp32_loss(model, x, y) * 100, opt, max_grad_norm)
        runs.append((params_of(model), float(outcome.grad_norm)))
    assert same_params(runs[0][0], runs[1][0])
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-6) and runs[0][1] > 1.0


def test_total_grad_norm_of_fp16_gradients_is_taken_in_fp32():
    # fp16-true training: each parameter's gradient norm fits fp16, their total (84853) does not
    params = [torch.zeros(4, dtype=torch.float16, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.full((4,), 30000.0, dtype=torch.float16)  # norm 60000 each, fp16 max is 65504
    norm = total_grad_norm(params)
    assert norm.dtype == torch.float32
    assert float(norm) == pytest.approx(60000.0 * math.sqrt(2), rel=1e-3)


def test_total_grad_norm_without_grads_is_zero():
    model = make_model()
    assert float(total_grad_norm(list(model.parameters()))) == 0.0


# --- state, knobs, disabled ---------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpScaler("cpu", growth_interval=3)
    clean_step(model, opt, scaler, x, y)
    inf_step(model, opt, scaler, x, y)
    clean_step(model, opt, scaler, x, y)  # growth tracker is 1 now: part of the state
    state = scaler.state_dict()

    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    fresh = AmpScaler("cpu")  # default knobs: all of them come from the state
    fresh.load_state_dict(state)
    assert fresh.get_scale() == scaler.get_scale() == DEFAULT_INIT / 2

    scales = []
    for overflow in (False, False, True, False):
        step = inf_step if overflow else clean_step
        a = step(model, opt, scaler, x, y)
        b = step(model2, opt2, fresh, x, y)
        assert bool(a.skipped) == bool(b.skipped) == overflow
        assert float(a.scale) == float(b.scale)
        scales.append(float(b.scale))
    # the growth tracker came along: one clean step was in the state, so the second one after loading grows
    assert scales == [DEFAULT_INIT / 2, DEFAULT_INIT, DEFAULT_INIT / 2, DEFAULT_INIT / 2]
    assert same_params(params_of(model), params_of(model2))
    assert fresh.scaler.get_growth_interval() == 3


def test_state_dict_is_gradscalers_own_both_ways():
    scaler = AmpScaler("cpu", init_scale=256.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=7)
    state = scaler.state_dict()
    assert state == scaler.scaler.state_dict()
    assert state == {"scale": 256.0, "growth_factor": 4.0, "backoff_factor": 0.25, "growth_interval": 7,
                     "_growth_tracker": 0}  # fmt: skip
    plain = torch.amp.GradScaler("cpu")  # e.g. a Lightning checkpoint's scaler takes an AmpScaler's state
    plain.load_state_dict(state)
    assert plain.state_dict() == state
    other = AmpScaler("cpu")  # and an AmpScaler takes a GradScaler's
    other.load_state_dict(torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3).state_dict())
    assert other.get_scale() == 8.0 and other.scaler.get_growth_interval() == 3
    assert AmpScaler("cpu", enabled=False).state_dict() == {}  # as GradScaler's when disabled


def test_gradscaler_knobs_pass_through():
    scaler = AmpScaler("cpu", init_scale=128.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=2)
    gs = scaler.scaler
    assert isinstance(gs, torch.amp.GradScaler)
    assert (gs.get_scale(), gs.get_growth_factor(), gs.get_backoff_factor(), gs.get_growth_interval()) == (
        128.0,
        4.0,
        0.25,
        2,
    )
    # and they act: backoff by 0.25, growth by 4 after 2 clean steps
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inf_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == 128.0 * 0.25
    clean_step(model, opt, scaler, x, y)
    clean_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == 128.0 * 0.25 * 4.0


def test_defaults_are_gradscalers_for_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "GradScaler is enabled, but CUDA is not available"
        scaler = AmpScaler()
    assert scaler.enabled is torch.cuda.is_available()  # like GradScaler: disabled where CUDA is missing
    fresh = AmpScaler("cpu")
    gs = torch.amp.GradScaler("cpu")
    assert fresh.get_scale() == gs.get_scale() == DEFAULT_INIT
    assert fresh.scaler.get_growth_interval() == gs.get_growth_interval() == 2000
    assert (fresh.scaler.get_growth_factor(), fresh.scaler.get_backoff_factor()) == (2.0, 0.5)


def test_disabled_scaler_is_a_plain_step():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu", enabled=False)
    assert not scaler.enabled
    expected = reference_norm(0, fp32_loss)
    before = params_of(model)
    outcome = scaler.step(fp32_loss(model, x, y), opt, max_grad_norm=1e9)
    assert outcome.scale is None and not bool(outcome.skipped)
    assert outcome.skipped.dtype == torch.bool and outcome.skipped.device == outcome.grad_norm.device
    assert float(outcome.grad_norm) == pytest.approx(expected, rel=1e-6)
    assert not same_params(before, params_of(model))
    assert scaler.get_scale() is None
    assert scale_tensor(scaler.scaler) is None  # a disabled GradScaler never makes a scale tensor


# --- where the outcome lives: the gradients' device, one whole norm under FSDP2 ---------------------


def test_a_disabled_scalers_outcome_is_on_the_gradients_device():
    # "meta" stands in for a GPU here: the loop stacks these flags with other tensors of the model's device
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outcome = AmpScaler("cpu", enabled=False).step(model(torch.ones(4, 3, device="meta")).sum(), opt)
    assert outcome.grad_norm.device.type == outcome.skipped.device.type == "meta"


@pytest.mark.parametrize("max_grad_norm", [None, 100.0])
def test_sharded_gradients_give_a_plain_tensor_of_the_whole_norm(one_rank_group, max_grad_norm):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    weight = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    opt = torch.optim.SGD([weight], lr=0.1)
    for enabled in (True, False):
        opt.zero_grad(set_to_none=True)
        outcome = AmpScaler("cpu", enabled=enabled).step(weight.sum(), opt, max_grad_norm)
        assert type(outcome.grad_norm) is torch.Tensor  # not a DTensor: the recorder stacks it with the others
        assert float(outcome.grad_norm) == pytest.approx(math.sqrt(12))  # d(sum)/dw is all ones: sqrt(4 * 3)
        assert not bool(outcome.skipped)


# --- GradScaler's private attributes, read in one place each --------------------------------------
# scale_tensor reads `_scale` and found_inf reads `_found_inf_per_device`. These tests compare them
# with GradScaler's public behaviour, so a torch release that renames or repurposes either fails here
# (and check_gradscaler_internals fails at AmpScaler's construction, naming the torch version).


def test_check_gradscaler_internals_passes_on_this_torch():
    assert check_gradscaler_internals() is None
    probe = torch.amp.GradScaler("cpu")
    assert hasattr(probe, "_scale") and hasattr(probe, "_found_inf_per_device")  # what it checks for


def test_scale_tensor_is_a_copy_of_the_live_scale():
    gs = torch.amp.GradScaler("cpu", init_scale=512.0)
    assert scale_tensor(gs) is None  # GradScaler makes its scale tensor lazily, at the first scale()
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gs.scale(fp32_loss(model, x, y) * float("inf")).backward()
    gs.step(opt)
    gs.update()
    scale = scale_tensor(gs)
    assert isinstance(scale, torch.Tensor) and float(scale) == gs.get_scale() == 256.0
    gs.update(1024.0)  # GradScaler's own scale moves; the copy taken before does not
    assert float(scale) == 256.0 and float(scale_tensor(gs)) == gs.get_scale() == 1024.0
    assert not scale.requires_grad


@pytest.mark.parametrize("factor,overflow", [(1.0, False), (1e25, False), (float("inf"), True), (float("nan"), True)])
def test_found_inf_is_gradscalers_own_skip_decision(factor, overflow):
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    gs = torch.amp.GradScaler("cpu")
    gs.scale(fp32_loss(model, x, y) * factor).backward()
    gs.unscale_(opt)
    flag = found_inf(gs, opt)
    assert flag.dtype == torch.bool and flag.shape == ()
    assert bool(flag) is overflow
    gs.step(opt)
    gs.update()
    assert (gs.get_scale() < DEFAULT_INIT) is overflow  # GradScaler agrees: it backed off exactly then


def test_ampscaler_checks_the_internals_when_it_is_made():
    check_gradscaler_internals.cache_clear()
    AmpScaler("cpu")
    assert check_gradscaler_internals.cache_info().currsize == 1  # ran (once, then cached)


# --- COLLAPSED_SCALE ------------------------------------------------------------------------------


def test_collapsed_scale_is_the_smallest_fp16_subnormal():
    assert COLLAPSED_SCALE == 2.0**-24
    assert float(torch.tensor(COLLAPSED_SCALE, dtype=torch.float16)) == COLLAPSED_SCALE  # representable
    assert float(torch.tensor(COLLAPSED_SCALE / 2, dtype=torch.float16)) == 0.0  # half of it is not


def test_loss_scale_collapse_is_strictly_below_the_smallest_fp16_subnormal():
    at_floor = HistoryRow(step=1, loss=1.0, loss_scale=COLLAPSED_SCALE, grad_norm=0.0, step_time_ms=None)
    check_divergence([at_floor], use_scaler=True)
    with pytest.raises(Diverged, match="loss scale collapsed"):
        check_divergence([replace(at_floor, loss_scale=COLLAPSED_SCALE / 2)], use_scaler=True)
