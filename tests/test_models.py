"""amp_lib.models: the GPT, the built-in workloads and the user-factory hook."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amp_lib.config import BUILTIN_BLOCK_SIZES, BUILTIN_MODELS, RunConfig
from amp_lib.data import CharTokenizer, corpus
from amp_lib.models import (
    GPT,
    GPT_SIZES,
    GPTConfig,
    Workload,
    build_workload,
    class_loss,
    default_model_for,
    lm_loss,
    load_user_factory,
)
from amp_lib.train import train

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _seeded():
    """Model construction draws from torch's global RNG: seed it in every test."""
    torch.manual_seed(0)


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=11, block_size=12, **kw))


def _reference_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A pre-LayerNorm residual block written out with torch.nn.functional, from the block's own weights."""
    b, t, c = x.shape
    h = block.n_head
    q, k, v = F.linear(
        F.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias), block.qkv.weight, block.qkv.bias
    ).split(c, 2)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
    att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(b, t, c), block.proj.weight, block.proj.bias)
    fc, proj = block.mlp[0], block.mlp[2]  # Linear, GELU, Linear, Dropout
    hidden = F.gelu(F.linear(F.layer_norm(x, (c,), block.ln_2.weight, block.ln_2.bias), fc.weight, fc.bias))
    return x + F.linear(hidden, proj.weight, proj.bias)


# --- GPT -----------------------------------------------------------------------------------------


def test_gpt_forward_shape_and_weight_tying():
    model = tiny_gpt()
    idx = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, 7, 11)
    assert model.wte.weight is model.lm_head.weight


def test_gpt_matches_a_written_out_reference_transformer():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=11, block_size=16)).eval()
    for module in model.modules():  # non-zero biases, so a dropped bias or a flipped residual shows
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.1)
    idx = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    x = model.wte(idx) + model.wpe(torch.arange(9))
    for block in model.blocks:
        x = _reference_block(block, x)
    expected = F.linear(F.layer_norm(x, (32,), model.ln_f.weight, model.ln_f.bias), model.wte.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, rtol=1e-4, atol=1e-5)
    assert model.lm_head.bias is None and len(model.blocks) == 2


def test_gpt_is_causal():
    model = tiny_gpt().eval()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (1, 8), generator=gen)
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_gpt_init_zeroes_biases_and_draws_weights_with_std_0_02():
    model = tiny_gpt()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.25)


def test_gpt_init_is_centred():
    weight = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=128, vocab_size=64)).blocks[0].qkv.weight
    assert abs(weight.mean().item()) < 2e-3 and weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dropout_is_active_in_training_only_and_off_by_default() -> None:
    x = torch.randint(0, 64, (2, 16))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.5)).train()
    assert not torch.equal(model(x), model(x))  # a new mask on each pass
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).train()
    assert torch.equal(plain(x), plain(x))
    config = RunConfig(model="gpt-tiny", dropout=0.2, steps=2, timing_warmup_steps=0, seq_len=8, device="cpu")
    built = build_workload(config, CPU).model
    assert built.cfg.dropout == 0.2 and {m.p for m in built.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}


def test_dropout_also_drops_attention_weights_in_training() -> None:
    # What attention hands the output projection: the same in eval mode pass after pass, and, with
    # attention dropout, different from it in training (the residual and MLP dropouts come after it).
    block = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.5)).blocks[0]
    seen: list[torch.Tensor] = []
    block.proj.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    x = torch.randn(2, 16, 32)
    block.eval()(x)
    block.eval()(x)
    block.train()(x)
    evaluated, again, trained = seen
    assert torch.equal(evaluated, again) and not torch.allclose(trained, evaluated)


def test_dropout_drops_both_residual_branches_in_training() -> None:
    # With p=1 every dropped branch adds nothing, so a block in training passes its input through: the
    # attention branch and the MLP branch are each followed by dropout, as in nanoGPT.
    block = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, dropout=1.0)).blocks[0]
    x = torch.randn(2, 16, 32)
    assert torch.equal(block.train()(x), x)
    assert not torch.allclose(block.eval()(x), x)


@pytest.mark.parametrize("model", ["gpt-tiny", "mlp"])
def test_eval_batches_sets_how_many_held_out_batches_an_eval_takes(model: str) -> None:
    config = RunConfig(
        model=model, eval_batches=7, steps=2, timing_warmup_steps=0, batch_size=2, seq_len=8, device="cpu"
    )
    assert len(build_workload(config, CPU).eval_batches) == 7


# --- flops ---------------------------------------------------------------------------------------


def test_flops_per_token_follows_the_nanogpt_formula():
    model = tiny_gpt()
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - cfg.block_size * cfg.n_embd
    for t in (1, 8):
        assert model.flops_per_token(t) == 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * t


def test_attention_flops_grow_by_12_L_d_per_token_of_context():
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=10))
    assert model.flops_per_token(200) - model.flops_per_token(100) == 12 * 3 * 64 * 100


# --- losses --------------------------------------------------------------------------------------


def test_losses_compute_in_fp32():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=gen).bfloat16()
    targets = torch.randint(0, 5, (2, 3), generator=gen)
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().reshape(-1, 5), targets.reshape(-1)))
    flat = class_loss(logits[:, 0], targets[:, 0])
    assert flat.dtype == torch.float32
    torch.testing.assert_close(flat, F.cross_entropy(logits[:, 0].float(), targets[:, 0]))


# --- built-in workloads --------------------------------------------------------------------------


def test_builtin_model_names():
    assert set(GPT_SIZES) | {"mlp"} == set(BUILTIN_MODELS)
    assert default_model_for("cpu") == "gpt-tiny" and default_model_for("cuda") == "gpt2-124m"
    assert default_model_for("cpu") in BUILTIN_MODELS and default_model_for("cuda") in BUILTIN_MODELS


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(name, marks=[pytest.mark.slow] if name in ("gpt-small", "gpt2-124m") else [])
        for name in BUILTIN_MODELS
    ],
)
def test_every_builtin_model_builds_a_workload_that_trains_a_step(model):
    # tiny batches and sequences; the model itself is the named size (gpt2-124m takes seconds to initialise)
    config = RunConfig(model=model, steps=2, timing_warmup_steps=0, batch_size=2, seq_len=8, device="cpu")
    w = build_workload(config, CPU)
    assert isinstance(w, Workload) and len(w.train_batches) == 2 and len(w.eval_batches) == 4
    assert next(w.model.parameters()).dtype == torch.float32
    if model in GPT_SIZES:
        size = GPT_SIZES[model]
        assert (w.model.cfg.n_layer, w.model.cfg.n_head, w.model.cfg.n_embd) == (size.n_layer, size.n_head, size.n_embd)
        assert (w.item_unit, w.items_per_batch, w.loss_fn) == ("tokens", 2 * 8, lm_loss)
    else:
        assert (w.item_unit, w.items_per_batch, w.loss_fn) == ("samples", 2, class_loss)
    assert w.flops_per_item > 0
    x, y = w.train_batches[0]
    loss = w.loss_fn(w.model(x), y)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in w.model.parameters())


def test_gpt_tiny_workload():
    config = RunConfig(
        model="gpt-tiny", steps=5, timing_warmup_steps=1, batch_size=3, seq_len=16, grad_accum=2, device="cpu"
    )
    w = build_workload(config, CPU)
    assert w.item_unit == "tokens" and w.items_per_batch == 3 * 16
    assert len(w.train_batches) == config.steps * config.grad_accum
    assert len(w.eval_batches) == 4
    x, y = w.train_batches[0]
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    vocab = CharTokenizer.for_text(corpus()).vocab_size
    assert w.model.lm_head.out_features == vocab
    assert int(x.max()) < vocab
    assert w.flops_per_item == w.model.flops_per_token(16)
    assert w.loss_fn is lm_loss


def test_the_block_sizes_the_config_checks_are_the_models_own():
    # RunConfig refuses a longer seq_len before anything runs (test_config.py); the model is built to this size
    assert {name: size.block_size for name, size in GPT_SIZES.items()} == {
        k: v for k, v in BUILTIN_BLOCK_SIZES.items() if v is not None
    }
    with pytest.raises(ValueError, match="block size"):
        RunConfig(model="gpt-tiny", seq_len=GPT_SIZES["gpt-tiny"].block_size + 1, device="cpu")


def test_gpt_accepts_a_sequence_as_long_as_its_block_and_keeps_the_size_block():
    config = RunConfig(
        model="gpt-tiny", seq_len=GPT_SIZES["gpt-tiny"].block_size, steps=2, timing_warmup_steps=0, device="cpu"
    )
    assert build_workload(config, CPU).train_batches[0][0].shape == (8, 256)
    small = build_workload(
        RunConfig(model="gpt-small", seq_len=512, batch_size=1, steps=1, timing_warmup_steps=0, device="cpu"), CPU
    )
    assert small.model.cfg.block_size == GPT_SIZES["gpt-small"].block_size


def test_gpt_eval_windows_come_from_the_held_out_last_tenth():
    text = corpus()
    split = int(0.9 * len(text))  # one character per token
    tok = CharTokenizer.for_text(text)
    w = build_workload(RunConfig(model="gpt-tiny", steps=8, seq_len=64, batch_size=8, device="cpu"), CPU)

    def windows(batches) -> list[str]:
        return ["".join(tok.chars[i] for i in row.tolist()) for j in range(len(batches)) for row in batches[j][0]]

    evals, trains = windows(w.eval_batches), windows(w.train_batches)
    assert all(s in text[split:] for s in evals) and all(s in text[:split] for s in trains)
    assert not set(evals) & set(trains)


def test_mlp_workload():
    config = RunConfig(model="mlp", steps=3, timing_warmup_steps=0, batch_size=5, device="cpu")
    w = build_workload(config, CPU)
    x, y = w.train_batches[1]
    assert x.shape == (5, 256) and y.shape == (5,)
    assert w.model(x).shape == (5, 16)
    assert 0 <= int(y.min()) and int(y.max()) < 16
    assert w.item_unit == "samples" and w.items_per_batch == 5
    assert w.flops_per_item == 6.0 * sum(p.numel() for p in w.model.parameters())
    assert len(w.train_batches) == 3 and len(w.eval_batches) == 4


def test_mlp_is_the_documented_256_1024_1024_16_gelu_mlp():
    # README "Built-in models": benchmark figures are only comparable across versions for the same model.
    w = build_workload(RunConfig(model="mlp", device="cpu"), CPU)
    assert [type(m).__name__ for m in w.model] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [(m.in_features, m.out_features) for m in w.model[::2]] == [(256, 1024), (1024, 1024), (1024, 16)]


@pytest.mark.slow
def test_mlp_eval_batches_are_labelled_by_the_training_teacher():
    # Held-out inputs, same labelling rule: training lowers the eval loss well below chance (ln 16).
    # (With a different teacher for the eval batches, the eval loss rose above chance as it trained.)
    config = RunConfig(model="mlp", steps=60, timing_warmup_steps=1, batch_size=32, lr=1e-3, log_every=20, device="cpu")
    result = train(config, write=False)
    assert result.status == "ok" and result.metrics.eval_loss < math.log(16) - 0.5
    w = build_workload(config, CPU)
    assert not any(torch.equal(w.eval_batches[i][0], w.train_batches[j][0]) for i in range(4) for j in range(60))


@pytest.mark.parametrize("model", ["gpt-tiny", "mlp"])
def test_builtin_batches_land_on_the_given_device_and_the_model_runs_there(model):
    # The meta device stands in for a GPU on a CPU build: a batch or position index made without the
    # device would come out on the CPU (or fail to mix with meta weights).
    meta = torch.device("meta")
    w = build_workload(RunConfig(model=model, steps=2, timing_warmup_steps=1, device="cpu"), meta)
    assert next(w.model.parameters()).device == CPU  # the model is moved by the loop, after the cast
    for batches in (w.train_batches, w.eval_batches):
        assert {t.device for i in range(len(batches)) for t in batches[i]} == {meta}
    assert w.model.to(meta)(w.train_batches[0][0]).device == meta


# --- user factories ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,text",
    [
        ("no_colon", "package.module:function"),
        (":fn", "package.module:function"),
        ("mod:", "package.module:function"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("user_models:missing", "no callable 'missing'"),
        ("user_models:not_callable", "no callable 'not_callable'"),
        ("user_models:build_ok:extra", "'user_models' has no callable 'build_ok:extra'"),  # split at the first colon
    ],
)
def test_load_user_factory_errors_name_the_spec(user_models, spec, text):
    with pytest.raises(ValueError) as info:
        load_user_factory(spec)
    assert repr(spec) in str(info.value) and text in str(info.value)


def test_a_spec_without_a_colon_lists_the_builtins_separated_by_commas():
    with pytest.raises(ValueError) as info:
        load_user_factory("no_colon_here")
    assert str(info.value) == (
        "invalid model 'no_colon_here'; use a built-in (gpt-tiny, gpt-small, gpt2-124m, mlp) or 'package.module:function'"
    )


def test_load_user_factory_imports_a_function(user_models):
    import user_models as um

    assert load_user_factory("user_models:build_ok") is um.build_ok


def user_config(name: str, **kw) -> RunConfig:
    return RunConfig(model=f"user_models:{name}", steps=6, timing_warmup_steps=1, batch_size=4, device="cpu", **kw)


def test_user_tuple_batches_are_cycled(user_models):
    w = build_workload(user_config("build_ok"), CPU)
    assert isinstance(w, Workload)
    assert len(w.train_batches) == 4 and w.items_per_batch == 4
    for i in range(4):
        assert w.train_batches[i + 4][0] is w.train_batches[i][0]
    assert w.eval_batches is w.train_batches
    assert (w.loss_fn, w.item_unit, w.flops_per_item) == (F.mse_loss, "samples", None)


def test_user_callable_batches(user_models):
    w = build_workload(user_config("build_callable"), CPU)
    torch.testing.assert_close(w.train_batches[5][0], w.train_batches[1][0])  # this function repeats every 4


def test_user_callable_batches_are_called_with_every_micro_batch_index_and_evaluate_on_the_first_ones(user_models):
    # A function that gives a new batch for every index gets every index of the run: steps x grad_accum of
    # them (the training loop asks for index % len(), bench's bare loop for the step: the same batch).
    config = RunConfig(
        model="user_models:build_step_function",
        steps=5,
        timing_warmup_steps=1,
        grad_accum=2,
        eval_batches=3,
        batch_size=4,
    )
    w = build_workload(config, CPU)
    assert len(w.train_batches) == 10 and len(w.eval_batches) == 3
    assert len({float(w.train_batches[i][0].sum()) for i in range(10)}) == 10
    torch.testing.assert_close(w.train_batches[12][0], w.train_batches[2][0])
    torch.testing.assert_close(w.eval_batches[1][0], w.train_batches[1][0])  # evaluation reuses training data


def test_user_iterable_batches_become_a_list(user_models):
    w = build_workload(user_config("build_iterable"), CPU)
    assert len(w.train_batches) == 4
    torch.testing.assert_close(w.train_batches[6][1], w.train_batches[2][1])


def test_user_workload_is_taken_as_is(user_models):
    w = build_workload(user_config("build_workload"), CPU)
    assert w.item_unit == "rows" and len(w.train_batches) == 6


@pytest.mark.parametrize(
    "name,error,text", [("build_bad_return", TypeError, "must return"), ("build_empty", ValueError, "no batches")]
)
def test_user_factory_bad_returns(user_models, name, error, text):
    with pytest.raises(error, match=text):
        build_workload(user_config(name), CPU)


def test_user_factory_bad_return_names_the_spec_and_the_two_shapes(user_models):
    with pytest.raises(TypeError) as info:
        build_workload(user_config("build_bad_return"), CPU)
    assert (
        str(info.value)
        == "model factory 'user_models:build_bad_return' must return a Workload or (model, batches, loss_fn)"
    )


def test_empty_user_batches_error_exactly(user_models):
    with pytest.raises(ValueError) as info:
        build_workload(user_config("build_empty"), CPU)
    assert str(info.value) == "a user model returned no batches"


def test_user_batches_that_can_be_indexed_are_indexed_lazily_and_never_called(user_models):
    w = build_workload(user_config("build_indexable_and_callable"), CPU)
    assert w.train_batches.items.made == [0]  # only the first batch, to read the batch size; no list() of all
    assert len(w.train_batches) == 4 and w.items_per_batch == 4
    torch.testing.assert_close(w.train_batches[5][0], w.train_batches[1][0])  # by index (calling raises)
    assert w.train_batches.items.made == [0, 1, 1]


@pytest.mark.parametrize(
    "name,items", [("build_short_last_batch", 4), ("build_no_targets", 4), ("build_tuple_inputs", 1)]
)
def test_items_per_batch_is_the_first_batchs_input_rows(user_models, name, items):
    # The first batch's inputs set the throughput unit: not a smaller last batch, not the targets; inputs
    # without a shape count one item per batch.
    assert build_workload(user_config(name), CPU).items_per_batch == items
