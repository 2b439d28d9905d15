"""A few fixed input shapes for the encoders of `layerfusion serve`, each run once before the server is ready.

Every new `[rows, tokens]` shape an encoder sees makes oneDNN and the allocator keep memory for it
(`benchmarks/serve_memory.json`: +399 MiB over 200 random shapes in bf16, 6 MiB more when they repeat),
so a server fed arbitrary batches grows for as long as new shapes come. Here each forward pass of a
serving encoder is padded up to a bucket: token length to a multiple of 8 up to 64, then steps of x1.5
to the encoder's `max_length`; rows (by repeating the last row, whose outputs are dropped) to every
count up to 4, then steps of a quarter of the power of two below, up to the batch size (a batch of 9
runs as 10). The extra tokens are padding under the attention mask, on the tokenizer's padding side, as
when a longer text shares the batch; the shared tokenizing of training and the feature cache is unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

STEP, FINE_UP_TO, GROWTH = 8, 64, 1.5


def length_buckets(max_length: int) -> list[int]:
    """Padded token lengths: multiples of 8 up to 64, then x1.5 steps (rounded to 8), `max_length` last."""
    out = list(range(STEP, min(FINE_UP_TO, max_length) + 1, STEP))
    while not out or out[-1] < max_length:
        nxt = int(out[-1] * GROWTH) // STEP * STEP if out else max_length
        out.append(min(nxt, max_length))
    return out


def row_buckets(max_rows: int) -> list[int]:
    """Padded row counts: every count up to 4, then steps of a quarter of the power of two below
    (5, 6, 7, 8, 10, ..., 16, 20, ...), `max_rows` last: a batch gets at most a quarter more rows."""
    out = [1]
    while out[-1] < max_rows:
        step = max(1, (1 << (out[-1].bit_length() - 1)) // 4)
        out.append(min(out[-1] + step, max_rows))
    return out


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `n` (`n` itself beyond the largest)."""
    return next((b for b in buckets if b >= n), n)


class ShapeBuckets:
    """Forward hooks on a `FrozenEncoder` that pad each call's `input_ids` / `attention_mask` to a bucket
    shape and drop the padded rows from its output; `warm_up` runs every bucket once.

    Args:
        encoder: the encoder (called as `encoder(input_ids, attention_mask, depth=...)`).
        max_rows: the most rows one forward pass gets (the classifier's `batch_size`).
    """

    def __init__(self, encoder, max_rows: int) -> None:
        self.encoder = encoder
        self.lengths = length_buckets(encoder.max_length)
        self.rows = row_buckets(max_rows)
        tokenizer = encoder.tokenizer
        self.pad_id, self.left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
        self._given = threading.local()  # rows of the call in flight, per thread
        self._hooks = [
            encoder.register_forward_pre_hook(self._pad, with_kwargs=True),
            encoder.register_forward_hook(self._crop),
        ]

    def shapes(self, token_budget: int | None = None) -> list[tuple[int, int]]:
        """Every (rows, length) a forward pass can be padded to, when batches hold at most `token_budget`
        padded tokens (a single row of any length always can)."""
        out = []
        for i, rows in enumerate(self.rows):
            least_rows = self.rows[i - 1] + 1 if i else 1
            for j, length in enumerate(self.lengths):
                least = least_rows * (self.lengths[j - 1] + 1 if j else 1)
                if least_rows == 1 or token_budget is None or least <= token_budget:
                    out.append((rows, length))
        return out

    def warm_up(self, depth: int, device, token_budget: int | None = None) -> int:
        """One forward pass on `device` through layers 0..`depth` of every shape in `shapes`; how many."""
        self.encoder.to(device)
        shapes = self.shapes(token_budget)
        for rows, length in shapes:
            ids = torch.full((rows, length), self.pad_id, dtype=torch.long, device=device)
            self.encoder(ids, torch.ones_like(ids), depth=depth)
        return len(shapes)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _pad(self, module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        ids, mask, *rest = args
        rows, length = ids.shape
        extra_rows = bucket(rows, self.rows) - rows
        extra_tokens = bucket(length, self.lengths) - length
        self._given.rows = rows
        if extra_tokens:
            width = (extra_tokens, 0) if self.left else (0, extra_tokens)
            ids = torch.nn.functional.pad(ids, width, value=self.pad_id)
            mask = torch.nn.functional.pad(mask, width, value=0)
        if extra_rows:
            ids = torch.cat([ids, ids[-1:].expand(extra_rows, -1)])
            mask = torch.cat([mask, mask[-1:].expand(extra_rows, -1)])
        return (ids, mask, *rest), kwargs

    def _crop(self, module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[: self._given.rows]
