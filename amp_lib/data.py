"""Built-in data: a deterministic text corpus and synthetic tensors, generated, never downloaded.

All batches of a run are indexed on the device up front, so fetching a batch in the hot loop is a
device-side gather with no host-to-device copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

_SUBJECTS = ["the cat", "a dog", "the model", "my friend", "the engineer", "a small bird", "the GPU"]
_VERBS = ["sees", "trains", "likes", "follows", "measures", "scales", "finds"]
_OBJECTS = ["the loss", "a red ball", "the gradient", "its shadow", "the garden", "a fast kernel"]
_ENDINGS = [".", " today.", " again.", " in the morning.", " with care."]


@lru_cache(maxsize=4)
def corpus(n_chars: int = 200_000, seed: int = 1234) -> str:
    """A learnable toy language: short sentences from a fixed grammar, same text every time."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}\n"
        parts.append(s)
        size += len(s)
    return "".join(parts)[:n_chars]


@dataclass(frozen=True)
class CharTokenizer:
    chars: str

    @classmethod
    def for_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)


class TokenBatches:
    """Random windows of a token stream; batch `i` is the same for every precision and run."""

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        num_batches: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if tokens.numel() < seq_len + 1:  # a window is seq_len inputs and, one token on, their targets
            raise ValueError(f"seq_len={seq_len} is too long for a stream of {tokens.numel()} tokens")
        gen = torch.Generator().manual_seed(seed)
        # a window of seq_len + 1 tokens starts anywhere from 0 to numel - seq_len - 1 (randint's high is exclusive)
        starts = torch.randint(0, tokens.numel() - seq_len, (num_batches, batch_size, 1), generator=gen)
        self._windows = (starts + torch.arange(seq_len + 1)).to(device)
        self._tokens = tokens.to(device)
        self.batch_size, self.seq_len = batch_size, seq_len

    def __len__(self) -> int:
        return self._windows.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self._tokens[self._windows[i % len(self)]]
        return window[:, :-1], window[:, 1:]


class TensorBatches:
    """Synthetic classification: inputs and the labels a fixed random teacher assigns them."""

    def __init__(
        self,
        *,
        num_batches: int,
        batch_size: int,
        in_features: int,
        num_classes: int,
        seed: int,
        teacher_seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """`teacher_seed` fixes the labelling rule apart from the inputs' `seed`: held-out batches need the
        training batches' teacher, or their loss measures a different task (default: drawn from `seed`)."""
        gen = torch.Generator().manual_seed(seed)
        teacher_gen = gen if teacher_seed is None else torch.Generator().manual_seed(teacher_seed)
        teacher = torch.randn(in_features, num_classes, generator=teacher_gen)
        x = torch.randn(num_batches, batch_size, in_features, generator=gen)
        self._x = x.to(device)
        self._y = (x @ teacher).argmax(-1).to(device)

    def __len__(self) -> int:
        return self._x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._x[i % len(self)], self._y[i % len(self)]
