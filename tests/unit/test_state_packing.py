"""Packing named state tensors into a few contiguous buffers and back."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.state.errors import ManifestError
from services.gpu_worker.state.packing import (
    ALIGN_BYTES,
    StateManifest,
    copy_pairs,
    pack_for_send,
    plan_manifest,
    unpack,
)


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "kv": torch.randn((2, 2, 64, 4, 32), generator=generator).to(torch.bfloat16),  # 64 KiB
        "prompt_cache": torch.randn((2, 2, 3, 4, 32), generator=generator).to(torch.bfloat16),
        "cursor": torch.tensor([5, 60], dtype=torch.int64),
        "rng": torch.Generator().manual_seed(9).get_state(),
        "scale": torch.randn(7, generator=generator),
        "gate": torch.ones(5, dtype=torch.bfloat16),
    }


def _packed(tensors: dict[str, torch.Tensor], manifest: StateManifest) -> list[torch.Tensor]:
    buffers = [torch.empty(spec.numel, dtype=spec.dtype) for spec in manifest.buffers]
    for destination, source in copy_pairs(manifest, tensors, buffers):
        destination.copy_(source)
    return buffers


def test_packing_and_unpacking_returns_every_tensor_bit_exact() -> None:
    state = _state()
    manifest = plan_manifest(state, own_buffer_min_bytes=32 * 1024)
    restored = unpack(manifest, _packed(state, manifest))
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name


def test_large_tensors_get_their_own_buffer_and_small_ones_share_one_per_dtype() -> None:
    manifest = plan_manifest(_state(), own_buffer_min_bytes=32 * 1024)
    assert [spec.dtype for spec in manifest.buffers] == [torch.bfloat16, torch.bfloat16, torch.int64, torch.uint8,
                                                        torch.float32]
    assert manifest.own_buffer_names() == {0: "kv", 2: "cursor", 3: "rng", 4: "scale"}  # 1: prompt_cache + gate
    assert manifest.nbytes >= sum(t.numel() * t.element_size() for t in _state().values())


def test_views_sharing_a_buffer_start_on_aligned_offsets() -> None:
    small = {f"t{i}": torch.ones(i + 1, dtype=torch.float16) for i in range(5)}
    manifest = plan_manifest(small)
    assert len(manifest.buffers) == 1
    offsets_bytes = [view.offset * 2 for view in manifest.views]
    assert all(offset % ALIGN_BYTES == 0 for offset in offsets_bytes)
    assert len(set(offsets_bytes)) == 5


def test_a_contiguous_tensor_alone_in_its_buffer_is_sent_without_a_copy() -> None:
    state = _state()
    manifest = plan_manifest(state, own_buffer_min_bytes=32 * 1024)
    buffers = pack_for_send(manifest, state)
    assert buffers[0].data_ptr() == state["kv"].data_ptr()
    restored = unpack(manifest, buffers)
    assert torch.equal(restored["prompt_cache"], state["prompt_cache"])


def test_a_manifest_survives_the_wire_unchanged() -> None:
    manifest = plan_manifest(_state(), own_buffer_min_bytes=32 * 1024)
    assert StateManifest.from_wire(manifest.to_wire()) == manifest


@pytest.mark.parametrize(
    "wire",
    [
        {"buffers": [["bfloat16", 10]], "views": [["a", "bfloat16", [4], 0, 8]]},  # runs past the buffer
        {"buffers": [["bfloat16", 10]], "views": [["a", "float32", [4], 0, 0]]},  # dtype differs from buffer
        {"buffers": [["bfloat16", 10]], "views": [["a", "bfloat16", [2], 1, 0]]},  # no such buffer
        {"buffers": [["bfloat16", 10]], "views": [["a", "bfloat16", [2], 0, 0], ["a", "bfloat16", [2], 0, 4]]},
        {"buffers": [["complex32", 10]], "views": []},
        {"buffers": [["bfloat16", -1]], "views": []},
        {"buffers": "nope", "views": []},
        {"buffers": [["bfloat16"]], "views": []},
    ],
)
def test_a_manifest_from_the_wire_is_refused_when_it_does_not_describe_its_buffers(wire: object) -> None:
    with pytest.raises(ManifestError):
        StateManifest.from_wire(wire)


def test_packing_refuses_tensors_that_differ_from_the_manifest() -> None:
    state = _state()
    manifest = plan_manifest(state)
    buffers = [torch.empty(spec.numel, dtype=spec.dtype) for spec in manifest.buffers]
    with pytest.raises(ManifestError, match="cursor"):
        copy_pairs(manifest, {**state, "cursor": torch.zeros(3, dtype=torch.int64)}, buffers)
    with pytest.raises(ManifestError, match="do not match"):
        copy_pairs(manifest, {"kv": state["kv"]}, buffers)


def test_unpacking_refuses_buffers_smaller_than_the_manifest() -> None:
    manifest = plan_manifest(_state())
    buffers = [torch.empty(spec.numel - 1, dtype=spec.dtype) for spec in manifest.buffers]
    with pytest.raises(ManifestError, match="buffer 0"):
        unpack(manifest, buffers)
