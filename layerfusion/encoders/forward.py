"""Texts to pooled layers: the one tokenize function and the one batched forward of an encoder."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from layerfusion.encoders.frozen import FrozenEncoder


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of `texts`, truncated to `max_length`, padded to the longest.

    Single texts only (no `token_type_ids`: GPT-2 would embed them with its token table). Safe to call
    from several threads at once, with different `max_length`s (see `token_ids`).
    """
    return pad(tokenizer, token_ids(tokenizer, texts, max_length))


def token_ids(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """The token ids of each text, truncated to `max_length`, unpadded.

    A Hugging Face fast tokenizer keeps each call's truncation and padding settings on the shared
    tokenizer object, so concurrent calls with different settings can get each other's (measured: wrong
    lengths in 51 of 240 calls); the calls are serialised here (tokenizing is short beside the forward).
    """
    with _TOKENIZING:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad(tokenizer, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """`ids` padded to the longest (on the tokenizer's padding side): `input_ids`, `attention_mask`."""
    with _TOKENIZING:
        batch = tokenizer.pad({"input_ids": list(ids)}, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def forward_batches(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    layers: list[int],
    device,
    token_budget: int | None,
    max_rows: int | None,
    sort_by_length: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, fp32 CPU features `[B, len(layers), d]`) per batch of `token_batches` over `texts`; the
    encoder stops at the deepest of `layers` (early exit)."""
    ids = token_ids(encoder.tokenizer, texts, encoder.max_length)
    depth = max(layers)
    pick = None if layers == list(range(depth + 1)) else torch.tensor(layers)
    encoder.to(device)
    with torch.inference_mode():
        for rows in token_batches([len(i) for i in ids], token_budget, max_rows, sort_by_length):
            batch = pad(encoder.tokenizer, [ids[i] for i in rows])
            feats = encoder(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), depth=depth
            )
            if pick is not None:
                feats = feats.index_select(1, pick.to(feats.device))
            yield rows, feats.float().cpu()


def token_batches(
    lengths: Sequence[int],
    token_budget: int | None,
    max_rows: int | None = None,
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Row indices in batches (longest rows first) whose padded size, rows x longest row, stays within
    `token_budget` and whose row count within `max_rows` (None: no bound). A row longer than the budget
    is a batch of its own."""
    order = (
        sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        if sort_by_length
        else range(len(lengths))
    )
    budget, cap = token_budget or math.inf, max_rows or math.inf
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        wider = max(width, lengths[i])
        if current and ((len(current) + 1) * wider > budget or len(current) >= cap):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        width = wider
    if current:
        batches.append(current)
    return batches


_TOKENIZING = threading.Lock()
"""Serialises tokenizer calls (module level: a lock attribute would not pickle for ddp_spawn)."""
