"""Deterministic prompt tokenizer: lowercase words hashed into the vocab, so no vocabulary file is downloaded."""

from __future__ import annotations

import re
import zlib

import torch

PAD_ID = 0
BOS_ID = 1
_FIRST_WORD_ID = 2
_WORD = re.compile(r"[a-z0-9']+")


def tokenize(prompt: str, vocab_size: int, max_len: int) -> torch.Tensor:
    """Token ids [max_len] int64: BOS, then one id per word (crc32, stable across processes), truncated, PAD after.

    BOS is always present so even an empty prompt gives the cross-attention one key to attend to.
    """
    if vocab_size <= _FIRST_WORD_ID:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {_FIRST_WORD_ID} reserved ids")
    word_ids = [
        _FIRST_WORD_ID + zlib.crc32(word.encode()) % (vocab_size - _FIRST_WORD_ID)
        for word in _WORD.findall(prompt.lower())
    ]
    ids = ([BOS_ID] + word_ids)[:max_len]
    return torch.tensor(ids + [PAD_ID] * (max_len - len(ids)), dtype=torch.long)


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True where a token is real (not PAD): the keys cross-attention may look at."""
    return tokens != PAD_ID
