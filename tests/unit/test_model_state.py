"""Export/import of a session's state, the rolling cache's layout, and prompt changes."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.model import SessionHandle, WanStreamingModel
from tests.synthetic_models import load_tiny


def _run(model: WanStreamingModel, handle: SessionHandle, chunks: int) -> list[torch.Tensor]:
    return [model.generate([handle])[0].frames for _ in range(chunks)]


def test_an_exported_session_continues_identically_in_another_model_instance() -> None:
    source = load_tiny()
    handle = source.new_session("s", "violet storm", 9)
    _run(source, handle, 4)
    state = source.export_state(handle)
    target = load_tiny()
    target.new_session("other", "something else", 1)  # the session lands in a different slot
    moved = target.import_state("s", {name: tensor.clone() for name, tensor in state.items()})
    assert moved.slot != handle.slot
    expected = _run(source, handle, 3)
    got = _run(target, moved, 3)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_export_names_the_documented_tensors_with_kv_in_pack_layout() -> None:
    model = load_tiny()
    config = model.config
    handle = model.new_session("s", "x", 0)
    _run(model, handle, 2)
    state = model.export_state(handle)
    d = config.dit
    assert state["kv"].shape == (d.num_layers, 2, 2 * config.chunk_tokens, d.num_heads, d.head_dim)
    assert state["cross_kv"].shape == (d.num_layers, 2, d.text_len, d.num_heads, d.head_dim)
    assert int(state["chunk_index"]) == 2 and int(state["seed"]) == 0
    assert state["rng_state"].dtype == torch.uint8
    assert torch.equal(state["kv"][1, 1], model.pools.v_pools[1][handle.slot, : 2 * config.chunk_tokens])
    vae = [name for name in state if name.startswith("vae_cache.")]
    assert [tuple(state[name].shape) for name in sorted(vae)] == model.vae_cache_shapes
    exported = sum(state[name].nbytes for name in vae)
    assert exported == model.state_bytes().vae  # the VAE cache is counted in the state's size


def test_state_bytes_count_the_vae_cache_beside_the_kv() -> None:
    model = load_tiny()
    sizes = model.state_bytes()
    assert sizes.kv == model.config.kv_bytes(4) and sizes.vae > 0 and sizes.total == sizes.kv + sizes.vae


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    common = before.shape[2]
    differs = (before != after[:, :, :common]).flatten(3).any(dim=-1).any(dim=0).any(dim=0)
    return {int(r) for r in differs.nonzero().flatten()} | set(range(common, after.shape[2]))


@pytest.mark.parametrize(("first_chunk", "last_chunk"), [(0, 0), (1, 2), (2, 2), (3, 3), (2, 6), (4, 5)])
def test_kv_rows_written_names_exactly_the_rows_that_change(first_chunk: int, last_chunk: int) -> None:
    model = load_tiny()
    handle = model.new_session("s", "ring", 5)
    _run(model, handle, first_chunk)
    before = model.export_state(handle)["kv"]
    _run(model, handle, last_chunk - first_chunk + 1)
    after = model.export_state(handle)["kv"]
    assert _changed_rows(before, after) == set(model.kv_rows_written(first_chunk, last_chunk))


def test_the_cache_wraps_after_many_chunks_keeping_sink_rows_and_capacity() -> None:
    model = load_tiny()
    config = model.config
    handle = model.new_session("s", "long stream", 6)
    _run(model, handle, config.sink_chunks)
    sink_before = model.export_state(handle)["kv"][:, :, : config.sink_tokens].clone()
    chunks = config.sink_chunks + 3 * config.window_chunks + 1
    frames = _run(model, handle, chunks)
    state = model.export_state(handle)
    assert state["kv"].shape[2] == config.cache_capacity_tokens
    assert torch.equal(state["kv"][:, :, : config.sink_tokens], sink_before)
    assert int(state["chunk_index"]) == config.sink_chunks + chunks
    assert model.kv_rows_written(config.sink_chunks, config.sink_chunks) == model.kv_rows_written(
        config.sink_chunks + config.window_chunks, config.sink_chunks + config.window_chunks
    )
    assert (frames[-1].float() - frames[-2].float()).abs().mean() > 1.0


def test_kv_rows_written_spanning_the_whole_ring_names_every_ring_row_once() -> None:
    model = load_tiny()
    config = model.config
    rows = model.kv_rows_written(config.sink_chunks, config.sink_chunks + 10 * config.window_chunks)
    assert rows == list(range(config.sink_tokens, config.cache_capacity_tokens))


def test_a_prompt_change_alters_later_frames_and_leaves_earlier_ones_alone() -> None:
    model = load_tiny()
    steady = model.new_session("steady", "a quiet blue lake", 11)
    switched = model.new_session("switched", "a quiet blue lake", 11)
    early = model.generate([steady, switched])
    assert torch.equal(early[0].frames, early[1].frames)
    model.set_prompt(switched, "fire and molten gold")
    later = [model.generate([steady, switched]) for _ in range(3)]
    gaps = [(pair[0].frames.float() - pair[1].frames.float()).abs().mean().item() for pair in later]
    assert gaps[0] > 0.3 and gaps[2] > 3.0  # from the next chunk on, growing as the new prompt fills the cache


def test_a_session_exported_before_its_first_chunk_imports_and_runs_like_the_original() -> None:
    source = load_tiny()
    handle = source.new_session("s", "dawn", 4)
    state = source.export_state(handle)
    assert state["kv"].shape[2] == 0 and not any(name.startswith("vae_cache.") for name in state)
    target = load_tiny()
    moved = target.import_state("s", state)
    assert torch.equal(_run(source, handle, 2)[1], _run(target, moved, 2)[1])


class Fence:
    """Stands in for an import's copy of one part: notes when the batch orders itself after it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def order_before(self, stream: object) -> None:
        self.log.append(self.name)


def test_a_batch_waits_for_each_layer_of_an_import_just_before_that_layer_reads_its_cache() -> None:
    model = load_tiny()
    handle = model.new_session("s", "violet storm", 9)
    _run(model, handle, 1)
    log: list[str] = []
    layers = model.config.dit.num_layers
    model.pools.fences.add(Fence("prompt", log), [Fence(f"layer {i}", log) for i in range(layers)],
                           Fence("rest", log))
    for index in range(layers):
        model.dit.block(index).self_attn.register_forward_pre_hook(
            lambda *_, index=index: log.append(f"attend {index}"))  # type: ignore[misc]
    model.generate([handle])
    first_pass = ["prompt"] + [entry for i in range(layers) for entry in (f"layer {i}", f"attend {i}")]
    assert log[: len(first_pass)] == first_pass  # not all up front: layer i's copy may still run while i-1 computes
    assert log.count("rest") == 1 and log.index("rest") > log.index(f"attend {layers - 1}")
    assert all(log.count(f"layer {i}") == 1 for i in range(layers))  # waited for once, then done with
