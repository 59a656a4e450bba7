"""User model factories for the tests, imported as "user_models:<name>" (tests put this folder on sys.path)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from amp_lib.models import Workload


def _regression(config, n_batches: int = 4):
    gen = torch.Generator().manual_seed(config.seed)
    w = torch.randn(8, 1, generator=gen)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(config.batch_size, 8, generator=gen)
        batches.append((x, x @ w))
    torch.manual_seed(config.seed)
    return nn.Linear(8, 1), batches


def build_ok(config):
    model, batches = _regression(config)
    return model, batches, F.mse_loss


def nan_loss(output, target):
    return F.mse_loss(output.float(), target) * float("nan")


def build_nan(config):
    """Every loss is NaN: an fp32 run must end 'diverged'."""
    model, batches = _regression(config)
    return model, batches, nan_loss


def build_oom(config):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (test)")


def build_cpu_oom(config):
    """A model whose first forward asks the CPU for 1 PiB: torch's allocator refuses, as on a machine out of memory."""

    class Greedy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.empty(2**50, dtype=torch.uint8).sum()

    gen = torch.Generator().manual_seed(config.seed)
    return Greedy(), [(torch.randn(2, 4, generator=gen), torch.randn(2, 1, generator=gen))], F.mse_loss


def build_fail(config):
    raise RuntimeError("user factory exploded on purpose")


def build_bad_return(config):
    return 42


def build_empty(config):
    return nn.Linear(8, 1), [], F.mse_loss


def build_workload(config):
    """A Workload is taken as is: its train batches must cover every (micro-)step of the run."""
    model, batches = _regression(config, n_batches=config.steps * config.grad_accum)
    return Workload(
        model=model,
        train_batches=batches,
        eval_batches=batches,
        loss_fn=F.mse_loss,
        items_per_batch=config.batch_size,
        item_unit="rows",
    )


def build_callable(config):
    """Batches as a function of the step index."""
    model, batches = _regression(config)
    return model, (lambda i: batches[i % len(batches)]), F.mse_loss


def build_iterable(config):
    """Batches as a one-shot iterable (no __getitem__)."""
    model, batches = _regression(config)
    return model, iter(batches), F.mse_loss


def build_fails_mid_run(config):
    """The loss raises on its 6th call: the run fails after some history was flushed."""
    model, batches = _regression(config)
    calls = {"n": 0}

    def loss_fn(output, target):
        calls["n"] += 1
        if calls["n"] == 6:
            raise ArithmeticError("loss blew up at call 6")
        return F.mse_loss(output.float(), target)

    return model, batches, loss_fn


not_callable = 3


BUILT_MODELS: list = []  # weak references to the models build_tracked made


def build_tracked(config):
    """build_ok, keeping a weak reference to the model so a test can see when it is freed."""
    import weakref

    model, batches, loss_fn = build_ok(config)
    BUILT_MODELS.append(weakref.ref(model))
    return model, batches, loss_fn


SEEN_DTYPES: list = []  # (parameter dtype, output dtype, TF32 allowed) per loss call of build_dtype_probe
# (precision, parameter dtype, output dtype) each training loop must run build_dtype_probe's model in
PLAN_DTYPES = [
    ("fp32", torch.float32, torch.float32),
    ("bf16-mixed", torch.float32, torch.bfloat16),
    ("bf16-true", torch.bfloat16, torch.bfloat16),
]


def build_dtype_probe(config):
    """build_ok whose loss records the dtypes the training loop ran the model in."""
    model, batches = _regression(config)

    def loss_fn(output, target):
        SEEN_DTYPES.append((model.weight.dtype, output.dtype, torch.backends.cuda.matmul.allow_tf32))
        return F.mse_loss(output.float(), target)

    return model, batches, loss_fn


COMPILING: dict = {}  # "forward": whether torch.compile traced build_compile_probe's model's last forward


class _CompileProbe(nn.Linear):
    def forward(self, x):
        # dynamo replays the store on every compiled call (a list's append would be guarded on its length:
        # a recompile per call, until dynamo gives up and runs the forward eagerly)
        COMPILING["forward"] = torch.compiler.is_compiling()
        return super().forward(x)


def build_compile_probe(config):
    """build_ok whose model records whether it runs under torch.compile."""
    _, batches = _regression(config)
    torch.manual_seed(config.seed)
    return _CompileProbe(8, 1), batches, F.mse_loss


SPIKE_AT: dict = {"call": None}  # build_memory_spike touches 512 MiB in this loss call (0-based)


def build_memory_spike(config):
    """build_ok whose loss, on one call, allocates and touches 512 MiB and frees it again (more than an earlier
    test can leave resident in the process for it to reuse)."""
    model, batches = _regression(config)
    calls = {"n": 0}

    def loss_fn(output, target):
        if calls["n"] == SPIKE_AT["call"]:
            torch.ones(128 * 2**20).add_(1)
        calls["n"] += 1
        return F.mse_loss(output, target)

    return model, batches, loss_fn


def build_bad_eval(config):
    """Training is fine; the held-out batches are all infinite, so only the eval loss is non-finite."""
    model, batches = _regression(config, n_batches=config.steps)
    bad = [(x * math.inf, y) for x, y in batches]
    return Workload(model=model, train_batches=batches, eval_batches=bad, loss_fn=F.mse_loss, items_per_batch=config.batch_size)


EVAL_FORWARD_S = 0.1


class SlowToEvaluate(nn.Linear):
    """A linear layer whose forward pass sleeps in eval mode: evaluations a training clock must leave out."""

    def forward(self, x):
        if not self.training:
            time.sleep(EVAL_FORWARD_S)
        return super().forward(x)


def build_slow_eval(config):
    """Training as build_ok; each evaluation takes 4 x EVAL_FORWARD_S (it runs over the 4 batches)."""
    model, batches = _regression(config)
    slow = SlowToEvaluate(8, 1)
    slow.load_state_dict(model.state_dict())
    return slow, batches, F.mse_loss


def huge_loss(output, target):
    """Finite in fp32, but infinite once GradScaler multiplies it by its initial 2**16."""
    return F.mse_loss(output, target) * 1e34


def build_huge_loss(config):
    model, batches = _regression(config)
    return model, batches, huge_loss


def build_fails_in_fp32(config):
    """Fails for fp32 only: a bench over several precisions must go on to the next one."""
    if config.precision == "fp32":
        raise RuntimeError("this factory refuses fp32")
    return build_ok(config)


class IndexedOnly:
    """A dataset that records which batches were taken and is also callable (for something else):
    it must be indexed, lazily, and never called."""

    def __init__(self, batches):
        self.batches, self.made = batches, []

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        batch = self.batches[i]  # IndexError past the end, as a sequence should
        self.made.append(i)
        return batch

    def __call__(self, *args):
        raise AssertionError("batches that can be indexed must not be called")


def build_indexable_and_callable(config):
    model, batches = _regression(config)
    return model, IndexedOnly(batches), F.mse_loss


def build_short_last_batch(config):
    """A full first batch and a smaller last one, as a DataLoader without drop_last gives."""
    model, (first, last, *_) = _regression(config)
    return model, [first, (last[0][:-1], last[1][:-1])], F.mse_loss


def build_no_targets(config):
    """Self-supervised: batches are (inputs, None) and the loss ignores the targets."""
    model, batches = _regression(config)
    return model, [(x, None) for x, _ in batches], lambda out, _: out.pow(2).mean()


def build_tuple_inputs(config):
    """Inputs without a shape (a tuple of tensors): one item per batch."""
    model, batches = _regression(config)
    return model, [((x,), y) for x, y in batches], F.mse_loss


def build_step_function(config):
    """Batches as a function of the index that never repeats by itself: batch i is drawn with seed i."""
    model, _ = _regression(config)

    def batch(i: int):
        x = torch.randn(config.batch_size, 8, generator=torch.Generator().manual_seed(i))
        return x, x.sum(1, keepdim=True)

    return model, batch, F.mse_loss


def build_overflow_at_batch_2(config):
    """Batch 2's targets are 1e17 times larger: its loss (~1e34) is finite, but scaled by 2**16 it overflows,
    so an fp16-mixed run skips exactly the steps that take batch 2 (and an fp32 run takes them)."""
    model, batches = _regression(config)
    x, y = batches[2]
    batches[2] = (x, y * 1e17)
    return model, batches, F.mse_loss


def build_fp16_overflow(config):
    """A three-layer model whose middle layer ("big") outputs 1e5 on every input: finite in fp32, inf in fp16."""
    from collections import OrderedDict

    inp, big, out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 1)
    with torch.no_grad():
        inp.weight.zero_()
        inp.bias.fill_(1.0)  # every hidden unit is exactly 1 ...
        big.weight.copy_(torch.eye(16) * 1e5)  # ... so every output of "big" is 1e5 > 65504
        big.bias.zero_()
    model = nn.Sequential(OrderedDict(inp=inp, act=nn.ReLU(), big=big, out=out))
    batches = [(torch.randn(config.batch_size, 8), torch.randn(config.batch_size, 1)) for _ in range(4)]
    return model, batches, F.mse_loss


HOOKED: list = []  # (forward hooks on the model's modules at each loss call), and the model, for build_hook_probe


def build_hook_probe(config):
    """build_ok whose loss records how many forward hooks the model carries while it trains."""
    model, batches = _regression(config)
    HOOKED.append(model)

    def loss(output, target):
        HOOKED.append(sum(len(m._forward_hooks) for m in model.modules()))
        return F.mse_loss(output, target)

    return model, batches, loss


def build_fails_with_half_weights(config):
    """build_ok whose loss refuses half-precision parameters: fp32 and the mixed precisions run, a 'true' one
    (bf16-true, fp16-true) fails on its first step, as a model with an op that has no half kernel would."""
    model, batches = _regression(config)

    def loss_fn(output, target):
        if model.weight.dtype != torch.float32:
            raise NotImplementedError(f"this loss has no {model.weight.dtype} kernel")
        return F.mse_loss(output.float(), target)

    return model, batches, loss_fn


HALF_STEP_SLEEP_S = 0.02


def build_slow_in_half(config):
    """build_ok whose loss sleeps HALF_STEP_SLEEP_S whenever the model computed in half precision: a precision
    that is certainly slower than fp32, for a timing that must decide."""
    model, batches = _regression(config)

    def loss_fn(output, target):
        if output.dtype != torch.float32:
            time.sleep(HALF_STEP_SLEEP_S)
        return F.mse_loss(output.float(), target)

    return model, batches, loss_fn


def build_fp8_gpt(config):
    """gpt-tiny's shape with a 64-token vocabulary on random tokens: every linear (lm_head too) has dims that are
    multiples of 16, so each can run in fp8, and each weight has at least 4096 values (torchao's low-bit
    optimizers quantize exactly such state)."""
    from amp_lib.models import GPT, GPTConfig, lm_loss

    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=64, block_size=config.seq_len))
    gen = torch.Generator().manual_seed(config.seed)
    tokens = torch.randint(0, 64, (4, config.batch_size, config.seq_len + 1), generator=gen)
    return model, [(t[:, :-1], t[:, 1:]) for t in tokens], lm_loss


BUILD_SLEEP_S = 1.0


def build_slow_to_build(config):
    """build_ok that takes BUILD_SLEEP_S to build: setting up a timing on a busy machine, which its budget
    must not count."""
    time.sleep(BUILD_SLEEP_S)
    return build_ok(config)
