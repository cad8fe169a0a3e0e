"""Prompts to the DiT's text context: ``transformers``' umT5 encoder and tokenizer, as Wan runs them.

Wan tokenizes to ``text_len`` tokens (end-of-sequence token added, padding masked inside the encoder), keeps the
encoder output of the real tokens only and zero-pads it back to ``text_len`` rows; the DiT then attends to all
rows unmasked. Many sessions share a prompt, so contexts are cached by prompt text; the encoder may sit on
another device than the DiT (``TURBOSERVE_TEXT_DEVICE``), since umT5-XXL alone is 11 GB in bf16.
"""

from __future__ import annotations

import html
import re
import threading
from collections import OrderedDict

import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(prompt: str) -> str:
    """Wan's ``clean='whitespace'``: HTML entities unescaped, runs of whitespace folded to one space.

    Wan also runs ``ftfy.fix_text`` first; we do not depend on ftfy, so mojibake in a prompt stays as typed.
    """
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(prompt))).strip()


class PromptEncoder:
    """prompt -> context [text_len, text_dim] on the DiT's device, cached by prompt (least recently used out)."""

    def __init__(self, encoder: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int,
                 output_device: torch.device, output_dtype: torch.dtype, cached_prompts: int = 256) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_len = text_len
        self._output_device = output_device
        self._output_dtype = output_dtype
        self._cached_prompts = cached_prompts
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0
        """Prompts actually run through the encoder (cache misses)."""

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.encoder.parameters()).device
        return device

    def encode(self, prompt: str) -> torch.Tensor:
        with self._lock:
            cached = self._cache.get(prompt)
            if cached is not None:
                self._cache.move_to_end(prompt)
                return cached
        context = self._encode(prompt)
        with self._lock:
            self._cache[prompt] = context
            self.encoded += 1
            while len(self._cache) > self._cached_prompts:
                self._cache.popitem(last=False)
        return context

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """input ids and attention mask [1, text_len] as Wan's tokenizer wrapper makes them."""
        batch = self.tokenizer([clean_prompt(prompt)], padding="max_length", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def _encode(self, prompt: str) -> torch.Tensor:
        ids, mask = self.tokenize(prompt)
        hidden = self.encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        length = int(mask.sum())
        context = torch.zeros(self.text_len, hidden.shape[-1], device=self._output_device, dtype=self._output_dtype)
        context[:length] = hidden[0, :length].to(self._output_device, self._output_dtype)
        return context
