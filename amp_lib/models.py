"""Built-in workloads (`gpt-*`, `mlp`) and the hook for a user's own `"package.module:function"`.

A user function takes the `RunConfig` and returns either a `Workload` (its own train and eval batches)
or a tuple `(model, batches, loss_fn)`: `batches` is a sequence (or a callable `i -> batch`) of
`(inputs, targets)` pairs already on the run's device (`config.device`), and `loss_fn(model(inputs),
targets)` is a scalar loss. With the tuple form, training cycles through a sequence (batch `i % len`) or
calls the callable with every micro-batch index `0 .. steps * grad_accum - 1`; evaluation uses the same
batches (the whole sequence, or the callable's indices `0 .. eval_batches - 1`): there is no held-out data
unless you return a `Workload`. Example (see `amp_lib.examples`):

    def build(config):
        model = torch.nn.Linear(32, 1)
        batches = [(torch.randn(16, 32), torch.randn(16, 1)) for _ in range(8)]
        return model, batches, torch.nn.functional.mse_loss

    python -m amp_lib.sweep -p model=my_pkg.my_mod:build
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amp_lib.config import BUILTIN_BLOCK_SIZES, BUILTIN_MODELS, RunConfig
from amp_lib.data import TRAIN_FRACTION, CharTokenizer, TensorBatches, TokenBatches, corpus

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 64
    block_size: int = 256
    dropout: float = 0.0


GPT_SIZES: dict[str, GPTConfig] = {
    "gpt-tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=BUILTIN_BLOCK_SIZES["gpt-tiny"] or 0),
    "gpt-small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=BUILTIN_BLOCK_SIZES["gpt-small"] or 0),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=BUILTIN_BLOCK_SIZES["gpt2-124m"] or 0),
}


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout)
        )
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's decoder-only transformer, trimmed to what a precision study needs."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def flops_per_token(self, seq_len: int) -> float:
        """nanoGPT's 6N + 12·L·H·Q·T training flops per token (N without position embeddings)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        cfg = self.cfg
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


@dataclass(frozen=True)
class Workload:
    """A model with its batches and loss: everything `train` needs besides the precision."""

    model: nn.Module
    train_batches: Any  # indexable and sized: the loop cycles through it
    eval_batches: Any  # indexable and sized
    loss_fn: Callable[[Any, Any], torch.Tensor]
    items_per_batch: int
    item_unit: str = "samples"
    flops_per_item: float | None = None


class _CallableBatches:
    def __init__(self, fn: Callable[[int], Batch], length: int) -> None:
        self.fn, self.length = fn, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Batch:
        return self.fn(i)


class _CycledBatches:
    def __init__(self, items: Sequence[Batch]) -> None:
        if len(items) == 0:
            raise ValueError("a user model returned no batches")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Batch:
        return self.items[i % len(self.items)]


def text_batches(config: RunConfig, device: torch.device) -> tuple[TokenBatches, TokenBatches, int]:
    """The built-in text as character windows: training batches from the first 90%, `eval_batches`
    held-out batches from the last 10%, and the vocabulary size (every language model here uses these)."""
    text = corpus()
    tok = CharTokenizer.for_text(text)
    ids = tok.encode(text)
    split = int(TRAIN_FRACTION * ids.numel())
    common: dict[str, Any] = {"batch_size": config.batch_size, "seq_len": config.seq_len, "device": device}
    train = TokenBatches(ids[:split], num_batches=config.steps * config.grad_accum, seed=config.seed, **common)
    evals = TokenBatches(ids[split:], num_batches=config.eval_batches, seed=10_000 + config.seed, **common)
    return train, evals, tok.vocab_size


def _gpt_workload(name: str, config: RunConfig, device: torch.device) -> Workload:
    base = GPT_SIZES[name]  # RunConfig refuses a seq_len beyond its block size
    train, evals, vocab_size = text_batches(config, device)
    cfg = GPTConfig(
        base.n_layer, base.n_head, base.n_embd, vocab_size=vocab_size, block_size=base.block_size, dropout=config.dropout
    )
    model = GPT(cfg)
    return Workload(
        model=model,
        train_batches=train,
        eval_batches=evals,
        loss_fn=lm_loss,
        items_per_batch=config.batch_size * config.seq_len,
        item_unit="tokens",
        flops_per_item=model.flops_per_token(config.seq_len),
    )


def _mlp_workload(config: RunConfig, device: torch.device) -> Workload:
    width, hidden, classes = 256, 1024, 16
    model = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, classes))
    common: dict[str, Any] = {"batch_size": config.batch_size, "in_features": width, "num_classes": classes, "device": device}
    n_params = sum(p.numel() for p in model.parameters())
    return Workload(
        model=model,
        train_batches=TensorBatches(num_batches=config.steps * config.grad_accum, seed=config.seed, **common),
        eval_batches=TensorBatches(num_batches=config.eval_batches, seed=10_000 + config.seed, teacher_seed=config.seed, **common),
        loss_fn=class_loss,
        items_per_batch=config.batch_size,
        flops_per_item=6.0 * n_params,
    )


def load_user_factory(spec: str) -> Callable[..., Any]:
    """Import `"package.module:function"`; errors name the spec and what went wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"invalid model {spec!r}; use a built-in ({', '.join(BUILTIN_MODELS)}) or 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"invalid model {spec!r}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        # ValueError, as for every invalid config value: the notebook and the sweep report it as one
        raise ValueError(f"invalid model {spec!r}: {module_name!r} has no callable {attr!r}")  # noqa: TRY004
    return factory


def _user_workload(spec: str, config: RunConfig) -> Workload:
    built = load_user_factory(spec)(config)
    if isinstance(built, Workload):
        return built
    try:
        model, batches, loss_fn = built
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model factory {spec!r} must return a Workload or (model, batches, loss_fn)") from exc
    evals = None
    if callable(batches) and not hasattr(batches, "__getitem__"):
        evals = _CycledBatches(_CallableBatches(batches, config.eval_batches))
        batches = _CallableBatches(batches, config.steps * config.grad_accum)
    elif not hasattr(batches, "__getitem__"):
        batches = list(batches)
    # The training loop indexes modulo len(), bench's bare loop by step: cycling gives both the same batches.
    batches = _CycledBatches(batches)
    first_inputs = batches[0][0]
    return Workload(
        model=model,
        train_batches=batches,
        eval_batches=evals or batches,
        loss_fn=loss_fn,
        items_per_batch=int(first_inputs.shape[0]) if hasattr(first_inputs, "shape") else 1,
    )


def build_workload(config: RunConfig, device: torch.device) -> Workload:
    """The workload a `RunConfig` names, its model on CPU in fp32 and its batches on `device`."""
    if config.model in GPT_SIZES:
        return _gpt_workload(config.model, config, device)
    if config.model == "mlp":
        return _mlp_workload(config, device)
    return _user_workload(config.model, config)


def default_model_for(device_type: str) -> str:
    """The built-in model the default sweep uses: tiny on a CPU, GPT-2 small on a GPU."""
    return "gpt2-124m" if device_type == "cuda" else "gpt-tiny"

