"""amp_lib.optim: the optimizer choices (fused AdamW, torchao's bf16 / 8-bit / 4-bit / fp8-state AdamW), the
combinations that cannot run, and the bytes the optimizer state really holds. Real torch and torchao; the
torchao optimizers compile their step (seconds the first time), so their training tests are `slow`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchao.optim.subclass_4bit import OptimState4bit
from torchao.optim.subclass_8bit import OptimState8bit
from torchao.optim.subclass_fp8 import OptimStateFp8

from amp_lib.optim import (
    OPTIMIZERS,
    compiler_available,
    make_optimizer,
    optimizer_problem,
    parse_optimizer,
    state_bytes,
    tensor_bytes,
)

CPU = torch.device("cpu")

# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("adamw", "adamw"), ("AdamW-8bit", "adamw-8bit"), ("adamw_4bit", "adamw-4bit"), (" adamw-fp8 ", "adamw-fp8"),
     ("adamw-bf16", "adamw-bf16"), ("adamw-fp32", "adamw"), ("adamw8bit", "adamw-8bit")],
)  # fmt: skip
def test_optimizer_names_resolve_to_the_canonical_ones(spelling, canonical):
    assert parse_optimizer(spelling) == canonical


@pytest.mark.parametrize("bad", ["sgd", "adam-8bit", "", None])
def test_an_unknown_optimizer_is_one_value_error_listing_the_choices(bad):
    with pytest.raises(ValueError, match=r"invalid optimizer .*; valid values are: adamw, adamw-bf16, adamw-8bit, "):
        parse_optimizer(bad)


# --- combinations that cannot run -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_fused_adamw_runs_with_any_parameters_and_needs_nothing_extra(dtype):
    assert optimizer_problem("adamw", dtype, "cpu", has_torchao=False, can_compile=False) is None


def test_adamw_bf16_needs_bf16_parameters():
    reason = optimizer_problem("adamw-bf16", torch.float32, "cuda", has_torchao=True, can_compile=True)
    assert reason == (
        "optimizer 'adamw-bf16' keeps bf16 parameters and state (stochastic rounding): it needs bf16 parameters "
        "(precision bf16-true); this run's parameters are fp32"
    )
    assert optimizer_problem("adamw-bf16", "bf16", "cuda", has_torchao=True, can_compile=True) is None


@pytest.mark.parametrize("name", ["adamw-bf16", "adamw-8bit", "adamw-4bit", "adamw-fp8"])
def test_torchaos_optimizers_need_torchao_and_a_compiler(name):
    missing = optimizer_problem(name, "bf16", "cpu", has_torchao=False, can_compile=True)
    assert missing == f"optimizer {name!r} needs torchao (pip install torchao, the fp8 extra); it is not installed"
    cpu = optimizer_problem(name, "bf16", "cpu", has_torchao=True, can_compile=False)
    assert cpu.endswith("needs a C++ compiler (set CXX, or install g++) on cpu")
    gpu = optimizer_problem(name, "bf16", torch.device("cuda", 1), has_torchao=True, can_compile=False)
    assert gpu.endswith("needs triton on cuda")


def test_a_sweep_skips_what_cannot_run_in_one_line():
    runnable = [o for o in OPTIMIZERS if not optimizer_problem(o, "fp32", "cpu", has_torchao=True, can_compile=True)]
    assert runnable == ["adamw", "adamw-8bit", "adamw-4bit", "adamw-fp8"]


def test_this_machine_has_what_torchaos_optimizers_need():
    """The machine facts are probed when not given: here torchao is installed and a C++ compiler is on PATH."""
    assert compiler_available("cpu")
    assert optimizer_problem("adamw-8bit", "fp32", "cpu") is None


def test_make_optimizer_refuses_a_combination_with_its_reason():
    with pytest.raises(ValueError, match="needs bf16 parameters"):
        make_optimizer(nn.Linear(4, 4), 1e-3, (0.9, 0.99), 0.0, CPU, "adamw-bf16")


@pytest.mark.parametrize("dtype", ["fp64", "int8"])
def test_an_unknown_parameter_dtype_is_a_value_error(dtype):
    with pytest.raises(ValueError, match=rf"invalid parameter dtype '{dtype}'; valid: fp32, bf16, fp16"):
        optimizer_problem("adamw-8bit", dtype)


# --- adamw: today's behaviour ---------------------------------------------------------------------


def test_adamw_is_fused_on_this_cpu_and_follows_a_tensor_learning_rate():
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    lr = torch.tensor(0.0)
    opt = make_optimizer(model, lr, (0.9, 0.99), 0.1, CPU)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    before = model.weight.detach().clone()
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()
    assert torch.equal(model.weight, before)  # lr 0: no update, not even weight decay
    lr.fill_(1e-2)  # a schedule updates the tensor in place
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.weight, before)


# --- the bytes of the state -----------------------------------------------------------------------


def test_tensor_bytes_counts_each_storage_once_and_a_subclass_by_its_inner_tensors():
    base = torch.zeros(1024, dtype=torch.float32)
    assert tensor_bytes([base, base[:10], base.view(32, 32)]) == 4096
    n = 1024 * 1024
    eight = OptimState8bit.zeros((1024, 1024), signed=True, block_size=256)
    assert tensor_bytes([eight]) == n + 4 * (n // 256) + 4 * 256  # codes, a scale per block, the code table
    four = OptimState4bit.zeros((1024, 1024), signed=True, block_size=128)
    assert tensor_bytes([four]) == n // 2 + 4 * (n // 128) + 4 * 16  # two codes a byte
    fp8 = OptimStateFp8.zeros((1024, 1024), block_size=256)
    assert tensor_bytes([fp8]) == n + 4 * (n // 256)
    assert eight.numel() * eight.element_size() == 4 * n  # what a count by appearance would say


def big_model(dtype: torch.dtype) -> nn.Module:
    """Two 1024 x 1024 linears, no bias: quantized states with negligible metadata, one compiled shape."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.ReLU(), nn.Linear(1024, 1024, bias=False)).to(dtype)


def train(name: str, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer, list[float], torch.Tensor]:
    dtype = torch.bfloat16 if name == "adamw-bf16" else torch.float32
    model = big_model(dtype)
    lr = torch.tensor(1e-3)
    opt = make_optimizer(model, lr, (0.9, 0.999), 0.01, CPU, name)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1024, generator=gen).to(dtype), torch.randn(16, 1024, generator=gen).to(dtype)
    losses = []
    for _ in range(steps):
        loss = (model(x).float() - y.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, opt, losses, lr


# Bytes of the two moments per parameter, as a share of fp32 AdamW's 8: codes plus one fp32 scale per block.
EXPECTED_RATIO = {
    "adamw": 1.0,
    "adamw-bf16": 2 / 4,
    "adamw-8bit": (1 + 4 / 256) / 4,
    "adamw-4bit": (0.5 + 4 / 128) / 4,
    "adamw-fp8": (1 + 4 / 256) / 4,
}
# Within 1%: what else the state holds is a step counter per parameter and the 8-bit/4-bit code tables (256 or
# 16 floats per moment), < 0.1% of a million-value tensor; an 8-bit count that forgot the block scales would
# be 1.5% off, and one that counted the fp32 the codes pose as, 300%.
RATIO_BAND = 0.01


@pytest.fixture(scope="module")
def fp32_state_bytes() -> int:
    return state_bytes(train("adamw", steps=1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_its_state_holds_the_expected_share_of_fp32_adamws(name, fp32_state_bytes):
    model, opt, losses, lr = train(name)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    ratio = state_bytes(opt) / fp32_state_bytes
    assert ratio == pytest.approx(EXPECTED_RATIO[name], rel=RATIO_BAND)
    # the schedule's tensor learning rate is what every choice reads: at 0 nothing moves
    lr.fill_(0.0)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(2, 1024, dtype=before[0].dtype)).float().sum()).backward()
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.slow
def test_adamw_bf16_keeps_bf16_parameters_and_state():
    model, opt, _, _ = train("adamw-bf16", steps=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert {m.dtype for m in moments} == {torch.bfloat16} and all(type(m) is torch.Tensor for m in moments)
    assert opt.bf16_stochastic_round is True
