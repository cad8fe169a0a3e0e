"""Model configs are data files; their arithmetic sizes the cache, the frames and the schedule the worker runs."""

from __future__ import annotations

import pytest

from services.gpu_worker.model import InvalidModelConfig, config_names, get_config
from services.gpu_worker.model.config import parse_config
from services.gpu_worker.model.kv_cache import CacheLayout
from services.gpu_worker.model.sampler import FlowSchedule


def test_every_config_file_parses_and_the_served_models_are_listed() -> None:
    assert config_names() == ["causvid", "longlive", "self-forcing", "tiny"]
    for name in config_names():
        assert get_config(name).name == name


def test_the_full_size_configs_have_wan21_1_3b_dimensions_at_832x480() -> None:
    config = get_config("self-forcing")
    d = config.dit
    assert (d.num_layers, d.dim, d.num_heads, d.ffn_dim, d.text_dim, d.text_len) == (30, 1536, 12, 8960, 4096, 512)
    assert (config.width_px, config.height_px, config.tokens_per_frame) == (832, 480, 1560)
    assert config.text_encoder.d_model == 4096 and config.text_encoder.num_layers == 24


def test_attention_windows_are_self_forcings_and_longlives() -> None:
    self_forcing, longlive = get_config("self-forcing"), get_config("longlive")
    assert (self_forcing.sink_chunks, self_forcing.window_chunks) == (0, 6)  # 21 frames: 18 cached + the chunk
    assert self_forcing.cache_capacity_tokens == 18 * 1560
    assert (longlive.sink_chunks, longlive.window_chunks) == (1, 2)  # 12 frames: sink 3 + 6 + the chunk
    assert longlive.cache_capacity_tokens == 9 * 1560
    assert (longlive.checkpoint.lora_rank, longlive.checkpoint.lora_alpha) == (256, 256)


def test_the_first_chunk_decodes_to_nine_frames_and_every_later_one_to_twelve() -> None:
    config = get_config("self-forcing")
    assert [config.video_frames(k) for k in range(3)] == [9, 12, 12]
    assert [config.first_video_frame(k) for k in range(4)] == [0, 9, 21, 33]


def test_self_forcing_conditions_on_warped_timesteps_and_causvid_on_the_listed_ones() -> None:
    warped = FlowSchedule.from_config(get_config("self-forcing").stream)
    assert warped.model_timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0))
    assert warped.sigmas == pytest.approx(tuple(t / 1000 for t in warped.model_timesteps))
    listed = FlowSchedule.from_config(get_config("causvid").stream)
    assert listed.model_timesteps == (1000.0, 757.0, 522.0)
    assert listed.sigmas == pytest.approx((1.0, 0.757, 0.522), abs=1e-3)  # the shift-8 grid point nearest each


def test_sink_chunks_keep_their_rows_and_later_chunks_cycle_through_the_ring() -> None:
    config = get_config("tiny")
    layout = CacheLayout(config)
    rows = config.chunk_tokens
    assert [layout.first_row(chunk) for chunk in range(6)] == [0, rows, 2 * rows, rows, 2 * rows, rows]
    assert [layout.valid_rows(done) for done in (0, 1, 3, 9)] == [0, rows, 3 * rows, 3 * rows]


@pytest.mark.parametrize(("change", "message"), [
    ({"stream": {"sink_frames": 2}}, "sink_frames=2"),
    ({"stream": {"attention_frames": 6, "sink_frames": 3}}, "attention_frames=6"),
    ({"stream": {"frames_per_chunk": 1, "attention_frames": 3}}, "frames_per_chunk=1"),
    ({"dit": {"dim": 100}}, "num_heads"),
    ({"vae": {"colour": 3}}, "unknown field"),
    ({"text_encoder": {"d_model": 64}}, "text_dim"),
])
def test_a_bad_config_file_is_refused_naming_the_field(change: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(InvalidModelConfig, match=message):
        parse_config({"name": "bad", **change}, "bad.json")
