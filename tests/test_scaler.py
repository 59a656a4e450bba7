"""AmpScaler and get_loss_scale on a real `torch.amp.GradScaler('cpu')`: skips, backoff, growth, clipping."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

from amp_lib.scaler import AmpScaler, StepOutcome, get_loss_scale, total_grad_norm

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
    assert scaler.skipped_steps == 1


def test_inf_gradient_from_a_backward_hook_skips_the_whole_step():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    last_bias = list(model.parameters())[-1]
    handle = last_bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = params_of(model)
    outcome = clean_step(model, opt, scaler, x, y, max_grad_norm=1.0)
    handle.remove()
    assert bool(outcome.skipped)
    assert same_params(before, params_of(model)), "no parameter moves on a skipped step, not only the inf one"
    assert scaler.get_scale() == DEFAULT_INIT / 2
    # the next clean step goes through
    outcome = clean_step(model, opt, scaler, x, y, max_grad_norm=1.0)
    assert not bool(outcome.skipped)
    assert not same_params(before, params_of(model))
    assert scaler.skipped_steps == 1


def test_clean_fp16_step_updates_params_and_keeps_scale():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AmpScaler("cpu")
    before = params_of(model)
    outcome = clean_step(model, opt, scaler, x, y)
    assert not bool(outcome.skipped)
    assert math.isfinite(float(outcome.grad_norm)) and float(outcome.grad_norm) > 0
    assert not same_params(before, params_of(model))
    assert scaler.get_scale() == DEFAULT_INIT
    assert scaler.skipped_steps == 0


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


def test_skipped_steps_counter_and_scale_history():
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
    assert scaler.skipped_steps == sum(pattern)
    assert scaler.scale_history == expected
    assert scaler.scale_history == expected  # reading it twice neither loses nor duplicates
    clean_step(model, opt, scaler, x, y)
    assert scaler.scale_history == expected + [scale]


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
    assert scaler.scale_history == [DEFAULT_INIT]


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
    assert scaler.skipped_steps == int(backed_off)
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
    assert fresh.skipped_steps == scaler.skipped_steps == 1

    for overflow in (False, False, True, False):
        step = inf_step if overflow else clean_step
        a = step(model, opt, scaler, x, y)
        b = step(model2, opt2, fresh, x, y)
        assert bool(a.skipped) == bool(b.skipped) == overflow
        assert float(a.scale) == float(b.scale)
    assert same_params(params_of(model), params_of(model2))
    assert fresh.skipped_steps == scaler.skipped_steps == 2
    assert fresh.scaler.get_growth_interval() == 3
    assert fresh.scale_history == scaler.scale_history[-4:]


def test_state_dict_without_skipped_steps_defaults_to_zero():
    scaler = AmpScaler("cpu", init_scale=256.0)
    state = scaler.state_dict()
    state.pop("skipped_steps")
    fresh = AmpScaler("cpu")
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 0 and fresh.get_scale() == 256.0


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
    assert scaler.scale_history == [] and scaler.skipped_steps == 0


# --- get_loss_scale -----------------------------------------------------------------------------


def gradscaler_with_scale(value: float) -> torch.amp.GradScaler:
    gs = torch.amp.GradScaler("cpu")
    state = gs.state_dict()
    state["scale"] = value
    gs.load_state_dict(state)
    return gs


def test_get_loss_scale_of_gradscaler_and_ampscaler():
    gs = torch.amp.GradScaler("cpu", init_scale=512.0)
    assert get_loss_scale(gs) == 512.0
    amp = AmpScaler("cpu", init_scale=1024.0)
    assert get_loss_scale(amp) == 1024.0
    assert amp.get_scale() == 1024.0


def test_get_loss_scale_follows_lightning_trainer_shape():
    gs = torch.amp.GradScaler("cpu", init_scale=2048.0)
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=gs)))
    assert get_loss_scale(trainer) == 2048.0


@pytest.mark.parametrize(
    "obj",
    [
        None,
        object(),
        types.SimpleNamespace(),  # no strategy
        types.SimpleNamespace(strategy=types.SimpleNamespace()),  # strategy without precision_plugin
        types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=types.SimpleNamespace())),  # no scaler
        types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=None))),
        types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=1.0))),
    ],
    ids=["none", "object", "no-strategy", "no-plugin", "no-scaler", "scaler-none", "scaler-not-gradscaler"],
)
def test_get_loss_scale_none_when_there_is_no_scaler(obj):
    assert get_loss_scale(obj) is None


def test_get_loss_scale_none_for_disabled_scalers():
    assert get_loss_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    assert get_loss_scale(AmpScaler("cpu", enabled=False)) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_get_loss_scale_none_for_non_finite_scale(value):
    assert get_loss_scale(gradscaler_with_scale(value)) is None
    assert get_loss_scale(torch.amp.GradScaler("cpu", init_scale=value)) is None


@pytest.mark.parametrize("value", [0.0, 1e10, 1.0, 2.0**-24], ids=repr)
def test_get_loss_scale_returns_finite_scales_as_floats(value):
    for gs in (gradscaler_with_scale(value), torch.amp.GradScaler("cpu", init_scale=value)):
        got = get_loss_scale(gs)
        assert type(got) is float and got == value


def test_get_loss_scale_reads_the_live_scale_after_steps():
    model, (x, y) = make_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpScaler("cpu")
    inf_step(model, opt, scaler, x, y)
    assert get_loss_scale(scaler) == get_loss_scale(scaler.scaler) == DEFAULT_INIT / 2
