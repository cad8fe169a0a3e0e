"""Config arithmetic, the registry and the tokenizer: pure functions the worker and scheduler size things with."""

from __future__ import annotations

import torch

from services.gpu_worker.model import CONFIGS, get_config
from services.gpu_worker.model.kv_cache import CacheLayout
from services.gpu_worker.model.tokenizer import BOS_ID, PAD_ID, tokenize


def test_wan_config_has_wan21_1_3b_dimensions_and_a_twelve_frame_window() -> None:
    wan = get_config("wan-1.3b")
    assert (wan.layers, wan.dim, wan.heads, wan.ffn_dim) == (30, 1536, 12, 8960)
    assert (wan.width_px, wan.height_px, wan.tokens_per_frame) == (832, 480, 1560)
    assert wan.cache_capacity_tokens == 12 * 1560
    assert 3.4e9 < wan.state_bytes(element_bytes=2) < 3.7e9  # "about 3.5 GB in bf16"


def test_tiny_config_is_the_cpu_size_the_issue_names() -> None:
    tiny = get_config("tiny")
    assert (tiny.width_px, tiny.height_px, tiny.tokens_per_frame, tiny.chunk_tokens) == (64, 64, 16, 48)
    assert tiny.video_frames_per_chunk == 12
    assert set(CONFIGS) == {"tiny", "wan-1.3b"}


def test_sink_chunks_keep_their_rows_and_later_chunks_cycle_through_the_ring() -> None:
    layout = CacheLayout(get_config("tiny"))
    starts = [layout.first_row(chunk) for chunk in range(6)]
    assert starts == [0, 48, 96, 48, 96, 48]
    assert [layout.valid_rows(done) for done in (0, 1, 3, 9)] == [0, 48, 144, 144]


def test_the_tokenizer_ignores_case_and_punctuation_and_pads_after_a_bos() -> None:
    tokens = tokenize("Hello, World!", vocab_size=4096, max_len=8)
    assert torch.equal(tokens, tokenize("hello world", vocab_size=4096, max_len=8))
    assert tokens[0] == BOS_ID and (tokens[3:] == PAD_ID).all() and (tokens[1:3] > BOS_ID).all()


def test_the_tokenizer_truncates_long_prompts_to_the_context_length() -> None:
    tokens = tokenize(" ".join(f"word{i}" for i in range(100)), vocab_size=4096, max_len=8)
    assert tokens.shape == (8,) and (tokens != PAD_ID).all()
