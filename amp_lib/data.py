"""Built-in data: real text shipped with the package, and synthetic tensors; nothing is downloaded.

The language-modelling data is "tiny Shakespeare" (about 40,000 lines of Shakespeare's plays, public
domain; 1,115,394 bytes, sha256 86c4e6aa…c565ed), the character-level corpus of char-rnn and nanoGPT, taken
from `data/tinyshakespeare/input.txt` of the public repository karpathy/char-rnn and shipped gzipped as
`amp_lib/tinyshakespeare.txt.gz`. As in nanoGPT, the first 90% is for training, the last 10% for validation.

All batches of a run are indexed on the device up front, so fetching a batch in the hot loop is a
device-side gather with no host-to-device copy.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

CORPUS_PATH = Path(__file__).with_name("tinyshakespeare.txt.gz")
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


@cache
def corpus() -> str:
    """The shipped tiny-Shakespeare text, whole."""
    return gzip.decompress(CORPUS_PATH.read_bytes()).decode("utf-8")


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
    """Random windows of a token stream; batch `i` is the same for every precision and run.

    Only the windows' start positions are kept (a window is gathered when its batch is taken), so even the
    full recipe's 5,000 x 64 windows cost a few MB of device memory.
    """

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
        self._starts = torch.randint(0, tokens.numel() - seq_len, (num_batches, batch_size, 1), generator=gen).to(device)
        self._offsets = torch.arange(seq_len + 1, device=device)
        self._tokens = tokens.to(device)
        self.batch_size, self.seq_len = batch_size, seq_len

    def __len__(self) -> int:
        return self._starts.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self._tokens[self._starts[i % len(self)] + self._offsets]
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
