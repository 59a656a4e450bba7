"""`amp_lib.amp_state`: finding a GradScaler and its scale, precision names and states, the skip counter,
the `amp/*` log row and the hook guard both training callbacks share. Real `torch.amp.GradScaler('cpu')`
and real fp16 autocast throughout; the Trainers themselves are in tests/test_hf.py and
tests/test_lightning_callback.py."""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from amp_lib.amp_state import (
    AmpRunLog,
    HookGuard,
    PrecisionState,
    SkipCounter,
    active_grad_scaler,
    amp_enabled,
    attr_or_none,
    canonical_name,
    find_grad_scaler,
    get_loss_scale,
)
from amp_lib.scaler import AmpScaler

DEFAULT_INIT = 2.0**16
FP16_ON_CPU = PrecisionState(
    "fp16-mixed", "fp32", "Accelerate runs fp16 on a CPU in fp32: no autocast and no GradScaler"
)


def make_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 4).to(device)


def fp16_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, overflow: bool) -> None:
    """One real fp16-autocast step through a GradScaler; `overflow` makes the loss infinite, so the step is skipped."""
    device = next(model.parameters()).device
    x, y = torch.ones(6, 8, device=device), torch.zeros(6, 4, device=device)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16):
        out = model(x)
    loss = nn.functional.mse_loss(out.float(), y)
    scaler.scale(loss * float("inf") if overflow else loss).backward()
    scaler.step(opt)
    scaler.update()


def gradscaler_with_scale(value: float) -> torch.amp.GradScaler:
    gs = torch.amp.GradScaler("cpu")
    state = gs.state_dict()
    state["scale"] = value
    gs.load_state_dict(state)
    return gs


# --- find_grad_scaler and active_grad_scaler ---


class PrecisionPlugin:
    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler


class Strategy:
    def __init__(self, plugin: Any) -> None:
        self.precision_plugin = plugin


class Trainer:
    """Shaped like a Lightning trainer: the scaler sits at `trainer.strategy.precision_plugin.scaler`."""

    def __init__(self, scaler: Any) -> None:
        self.strategy = Strategy(PrecisionPlugin(scaler))


class DetachedTrainer:
    """A Lightning trainer before its strategy is attached: reading the property raises."""

    @property
    def strategy(self) -> Any:
        raise RuntimeError("strategy is not attached yet")


class DetachedStrategy:
    @property
    def precision_plugin(self) -> Any:
        raise TypeError("no plugin yet")


class NotPrepared:
    """An object whose `scaler` property raises (an accelerate object read too early)."""

    @property
    def scaler(self) -> Any:
        raise RuntimeError("not prepared yet")


def test_find_grad_scaler_of_a_gradscaler_an_ampscaler_and_a_trainer():
    gs = torch.amp.GradScaler("cpu")
    assert find_grad_scaler(gs) is gs
    amp = AmpScaler("cpu")
    assert find_grad_scaler(amp) is amp.scaler
    assert find_grad_scaler(Trainer(gs)) is gs
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert find_grad_scaler(disabled) is disabled  # found; get_loss_scale is what calls it no scale


def test_find_grad_scaler_of_what_holds_it_as_scaler():
    """An Accelerator, an AcceleratedOptimizer, a Lightning precision plugin or trainer keep it as `.scaler`."""
    gs = torch.amp.GradScaler("cpu")
    assert find_grad_scaler(types.SimpleNamespace(scaler=gs)) is gs
    assert find_grad_scaler(PrecisionPlugin(gs)) is gs
    assert find_grad_scaler(types.SimpleNamespace(scaler=None, strategy=Strategy(PrecisionPlugin(gs)))) is gs


@pytest.mark.parametrize(
    "obj",
    [
        None,
        object(),
        1.0,
        Trainer(None),
        Trainer(1.0),
        DetachedTrainer(),
        types.SimpleNamespace(strategy=DetachedStrategy()),
        NotPrepared(),
        types.SimpleNamespace(scaler=1.0),
    ],
    ids=[
        "none",
        "object",
        "float",
        "scaler-none",
        "scaler-float",
        "raising-strategy",
        "raising-plugin",
        "raising-scaler",
        "held-float",
    ],
)
def test_find_grad_scaler_none_wherever_there_is_none(obj):
    assert find_grad_scaler(obj) is None
    assert active_grad_scaler(obj) is None
    assert get_loss_scale(obj) is None


def test_active_grad_scaler_is_only_an_enabled_one():
    gs = torch.amp.GradScaler("cpu")
    assert active_grad_scaler(gs) is gs and active_grad_scaler(types.SimpleNamespace(scaler=gs)) is gs
    assert active_grad_scaler(torch.amp.GradScaler("cpu", enabled=False)) is None
    assert active_grad_scaler(AmpScaler("cpu", enabled=False)) is None


def test_attr_or_none_swallows_what_a_property_raises():
    assert attr_or_none(DetachedTrainer(), "strategy") is None
    assert attr_or_none(object(), "missing") is None
    assert attr_or_none(types.SimpleNamespace(a=1), "a") == 1


# --- get_loss_scale ---


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


def test_get_loss_scale_none_for_disabled_scalers():
    assert get_loss_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    assert get_loss_scale(AmpScaler("cpu", enabled=False)) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_get_loss_scale_none_for_non_finite_scale(value):
    assert get_loss_scale(gradscaler_with_scale(value)) is None
    assert get_loss_scale(torch.amp.GradScaler("cpu", init_scale=value)) is None
    assert AmpScaler("cpu", init_scale=value).get_scale() is None  # AmpScaler's own reading agrees


@pytest.mark.parametrize("value", [0.0, 1e10, 1.0, 2.0**-24], ids=repr)
def test_get_loss_scale_returns_finite_scales_as_floats(value):
    for gs in (gradscaler_with_scale(value), torch.amp.GradScaler("cpu", init_scale=value)):
        got = get_loss_scale(gs)
        assert type(got) is float and got == value


def test_get_loss_scale_reads_the_live_scale_after_steps():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpScaler("cpu")
    fp16_step(model, opt, scaler.scaler, overflow=True)
    assert get_loss_scale(scaler) == get_loss_scale(scaler.scaler) == DEFAULT_INIT / 2


# --- precision names and states ---


def test_canonical_name_of_every_spelling_and_the_names_that_have_none():
    assert [canonical_name(v) for v in ("16-mixed", 16, "bf16", "32-true", "no", "16_true")] == [
        "fp16-mixed",
        "fp16-mixed",
        "bf16-mixed",
        "fp32",
        "fp32",
        "fp16-true",
    ]
    # Lightning's precisions without a canonical name stay what they are, never an error
    assert [canonical_name(v) for v in ("64-true", "transformer-engine", None)] == [
        "64-true",
        "transformer-engine",
        "None",
    ]


def test_amp_is_enabled_for_reduced_precisions_only():
    reduced = ["fp16-mixed", "bf16-mixed", "fp16-true", "bf16-true", "fp8-mixed", "transformer-engine"]
    assert [amp_enabled(n) for n in reduced] == [True] * len(reduced)
    assert [amp_enabled(n) for n in ("fp32", "tf32", "64-true", "64")] == [False] * 4


def test_a_precision_state_says_whether_it_fell_back_and_whether_amp_ran():
    assert FP16_ON_CPU.fell_back and not FP16_ON_CPU.enabled
    same = PrecisionState("bf16-mixed", "bf16-mixed")
    assert not same.fell_back and same.enabled and same.reason is None
    with pytest.raises(AttributeError):
        same.effective = "fp32"  # type: ignore[misc]  # a frozen record


# --- SkipCounter: skipped steps as decreases of the scale tensor ---


def test_the_counter_counts_each_skipped_step_and_no_growth():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # grows after every good step
    counter = SkipCounter()
    counter.prime(scaler)  # before the first step: no scale tensor yet, the initial scale as a float
    scales = []
    for overflow in (True, False, False, True, True, False):  # the first step's skip counts too
        fp16_step(model, opt, scaler, overflow)
        counter.observe(scaler)
        counter.observe(scaler)  # a second look at the same step counts nothing
        scales.append(scaler.get_scale())
    assert scales == [512.0, 1024.0, 2048.0, 1024.0, 512.0, 1024.0]  # backed off exactly at the three skips
    assert counter.count == 3
    assert isinstance(counter.skipped, torch.Tensor)  # held on the device between reads


def test_priming_again_changes_nothing_and_an_unprimed_counter_starts_at_its_first_observation():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    primed, late = SkipCounter(), SkipCounter()
    primed.prime(scaler)
    fp16_step(model, opt, scaler, overflow=True)  # 1024 -> 512
    primed.prime(scaler)  # already primed: the 1024 before the step is kept
    late.observe(scaler)  # nothing to compare with yet: this step is not counted
    primed.observe(scaler)
    fp16_step(model, opt, scaler, overflow=True)  # 512 -> 256
    primed.observe(scaler)
    late.observe(scaler)
    assert (primed.count, late.count) == (2, 1)


def test_a_disabled_scaler_or_none_is_never_counted():
    counter = SkipCounter()
    counter.prime(None)  # what a callback hands it where there is no enabled scaler
    counter.observe(torch.amp.GradScaler("cpu", enabled=False))
    counter.observe(None)
    assert counter.count == 0 and counter.skipped == 0
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    counter.prime(scaler)  # None primed nothing: the first real scale is still recorded
    model = make_model()
    fp16_step(model, torch.optim.SGD(model.parameters(), lr=0.01), scaler, overflow=True)
    counter.observe(scaler)
    assert counter.count == 1


# --- AmpRunLog: the amp/* row ---


def test_the_row_of_a_run_that_ran_as_asked_has_no_requested_key():
    log = AmpRunLog()
    assert log.row(PrecisionState("bf16-mixed", "bf16-mixed"), None) == {
        "amp/enabled": 1,
        "amp/precision": "bf16-mixed",
    }
    assert log.row(PrecisionState("fp32", "fp32"), None) == {"amp/enabled": 0, "amp/precision": "fp32"}


def test_a_fallback_names_the_request_in_every_row_and_the_reason_in_the_first_only():
    log = AmpRunLog()
    rows = [log.row(FP16_ON_CPU, None) for _ in range(3)]
    first = {"amp/enabled": 0, "amp/precision": "fp32", "amp/requested": "fp16-mixed"}
    assert rows[0] == {**first, "amp/fallback_reason": FP16_ON_CPU.reason}
    assert rows[1] == rows[2] == first
    assert AmpRunLog().row(FP16_ON_CPU, None)["amp/fallback_reason"] == FP16_ON_CPU.reason  # a new run: again
    broken = torch.amp.GradScaler("cpu")
    broken._scale = "not a tensor"  # type: ignore[assignment]  # reading its scale fails
    failing = AmpRunLog()
    with pytest.raises(AttributeError):
        failing.row(FP16_ON_CPU, broken)
    assert failing.row(FP16_ON_CPU, None)["amp/fallback_reason"] == FP16_ON_CPU.reason  # not lost with that row
    without_reason = AmpRunLog().row(PrecisionState("fp16-mixed", "bf16-mixed"), None)
    assert without_reason == {"amp/enabled": 1, "amp/precision": "bf16-mixed", "amp/requested": "fp16-mixed"}


def test_the_row_with_a_gradscaler_carries_its_scale_and_the_skips_counted():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    log = AmpRunLog()
    log.skips.prime(scaler)
    fp16_step(model, opt, scaler, overflow=True)
    log.skips.observe(scaler)
    fp16 = PrecisionState("fp16-mixed", "fp16-mixed")
    assert log.row(fp16, scaler) == {
        "amp/enabled": 1,
        "amp/precision": "fp16-mixed",
        "amp/skipped_steps": 1,
        "amp/loss_scale": 512.0,
    }
    assert log.scale_row(scaler) == {"amp/skipped_steps": 1, "amp/loss_scale": 512.0}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_scale_is_left_out_but_the_skips_are_not(value: float):
    log = AmpRunLog()
    assert log.scale_row(torch.amp.GradScaler("cpu", init_scale=value)) == {"amp/skipped_steps": 0}
    assert log.scale_row(torch.amp.GradScaler("cpu", enabled=False)) == {}
    assert log.scale_row(None) == {}


# --- HookGuard ---


def test_the_guard_returns_the_result_and_turns_errors_into_one_warning(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("amp_lib.test_guard")
    guard = HookGuard(logger, "SomeCallback")

    def fail(message: str) -> None:
        raise RuntimeError(message)

    with caplog.at_level(logging.WARNING, logger="amp_lib.test_guard"):
        assert guard(lambda a, b: a + b, 1, 2) == 3
        assert not guard.warned
        assert guard(fail, "scale is gone") is None
        assert guard(fail, "again") is None
        assert guard(lambda: "still runs") == "still runs"
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("amp_lib.test_guard", "SomeCallback: logging failed and is skipped: RuntimeError: scale is gone")
    ]
    assert guard.warned


# --- no host-device sync between logs ---


@contextlib.contextmanager
def no_sync_allowed() -> Iterator[None]:
    """CUDA raises on any host-device sync inside."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_counting_forces_no_host_sync_on_cuda():
    """prime and observe run under sync_debug_mode "error": a sync there would raise."""
    model = make_model("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    counter = SkipCounter()
    for overflow in (False, True, False):
        with no_sync_allowed():
            counter.prime(scaler)
        fp16_step(model, opt, scaler, overflow)
        with no_sync_allowed():
            counter.observe(scaler)
    assert counter.count == 1 and scaler.get_scale() == 512.0
