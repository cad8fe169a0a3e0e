"""LongLive's KV re-cache: on a prompt switch the cached chunks' K/V are recomputed under the new prompt, oldest
first, and every chunk's rows end up where the ring layout keeps them."""

from __future__ import annotations

import dataclasses

import torch

from services.gpu_worker.model import WanStreamingModel, get_config
from services.gpu_worker.model.streaming_model import WanStreamingModel as Model
from tests.synthetic_models import load_tiny

PROMPT = "a quiet blue lake at dawn"


def _recaching(model: WanStreamingModel) -> WanStreamingModel:
    config = model.config
    config = dataclasses.replace(config, stream=dataclasses.replace(config.stream, recache_on_prompt_switch=True))
    return Model(config, model.dit, model.vae.vae, model.text, model.device, model.dtype, model.max_sessions)


def test_the_shipped_longlive_config_recaches_and_the_others_do_not() -> None:
    assert get_config("longlive").stream.recache_on_prompt_switch
    assert not any(get_config(name).stream.recache_on_prompt_switch for name in ("self-forcing", "causvid", "tiny"))


def test_recaching_under_the_same_prompt_before_the_ring_wraps_rebuilds_the_cache_bit_for_bit() -> None:
    model = _recaching(load_tiny(max_sessions=1))
    handle = model.new_session("s", PROMPT, 3)
    for _ in range(model.config.sink_chunks + model.config.window_chunks):
        model.generate([handle])
    before = model.export_state(handle)
    model.set_prompt(handle, PROMPT)
    after = model.export_state(handle)
    assert torch.equal(before["kv"], after["kv"]) and torch.equal(before["cache_latents"], after["cache_latents"])


def test_after_the_ring_wraps_every_chunk_is_recomputed_into_its_own_segment() -> None:
    model = _recaching(load_tiny(max_sessions=1))
    config = model.config
    handle = model.new_session("s", PROMPT, 3)
    for _ in range(config.sink_chunks + 2 * config.window_chunks + 1):  # the ring has wrapped and is out of order
        model.generate([handle])
    before = model.export_state(handle)["kv"]
    model.set_prompt(handle, "fire and molten gold under a storm")
    after = model.export_state(handle)["kv"]
    # Layer 0's keys depend only on a chunk's own latents and position: unchanged iff each chunk is back in place.
    assert torch.equal(before[0, 0], after[0, 0])
    assert not torch.allclose(before[-1], after[-1])  # deeper layers now carry the new prompt


def test_a_switch_with_recache_changes_what_follows_more_than_one_without() -> None:
    frames = {}
    for recache in (False, True):
        model = load_tiny(max_sessions=1)
        model = _recaching(model) if recache else model
        steady = model.new_session("s", PROMPT, 8)
        for _ in range(4):
            model.generate([steady])
        model.set_prompt(steady, "fire and molten gold under a storm")
        frames[recache] = model.generate([steady])[0].frames.float()
    reference = load_tiny(max_sessions=1)
    unswitched = reference.new_session("s", PROMPT, 8)
    for _ in range(4):
        reference.generate([unswitched])
    kept = reference.generate([unswitched])[0].frames.float()
    assert (frames[True] - kept).abs().mean() > (frames[False] - kept).abs().mean()
