"""The model batches sessions without changing any session's frames, and is deterministic by seed."""

from __future__ import annotations

import torch

from services.gpu_worker.model import StreamingVideoModel
from tests.synthetic_models import load_tiny


def _staggered_run(batched: bool) -> dict[tuple[str, int], torch.Tensor]:
    """Five sessions started one chunk apart (so their cache lengths differ, and some wrap), 7 rounds."""
    model = load_tiny(max_sessions=8)
    handles = []
    frames: dict[tuple[str, int], torch.Tensor] = {}
    for round_index in range(7):
        if round_index < 5:
            handles.append(model.new_session(f"s{round_index}", f"drifting colours number {round_index}", round_index))
        outputs = model.generate(handles) if batched else [model.generate([h])[0] for h in handles]
        for output in outputs:
            frames[(output.session_id, output.chunk_index)] = output.frames
    return frames


def test_sessions_at_different_cache_lengths_give_the_same_frames_batched_as_alone() -> None:
    alone = _staggered_run(batched=False)
    batched = _staggered_run(batched=True)
    tolerance = load_tiny().config.batch_tolerance
    assert alone.keys() == batched.keys()
    worst = max((alone[key].int() - batched[key].int()).abs().max().item() for key in alone)
    assert worst <= tolerance


def test_generate_returns_outputs_in_the_order_of_the_handles_given() -> None:
    model = load_tiny()
    first = model.new_session("first", "a", 1)
    second = model.new_session("second", "b", 2)
    outputs = model.generate([second, first])
    assert [o.session_id for o in outputs] == ["second", "first"]


def test_two_model_instances_with_the_same_seed_make_identical_frames() -> None:
    runs = []
    for _ in range(2):
        model = load_tiny()
        handle = model.new_session("s", "waves of light", 42)
        runs.append(torch.cat([model.generate([handle])[0].frames for _ in range(3)]))
    assert torch.equal(runs[0], runs[1])


def test_a_different_seed_makes_different_frames() -> None:
    model = load_tiny()
    one = model.new_session("one", "waves of light", 1)
    two = model.new_session("two", "waves of light", 2)
    out_one, out_two = model.generate([one, two])
    assert not torch.equal(out_one.frames, out_two.frames)


def test_chunks_are_uint8_frames_at_the_configured_size_nine_then_twelve_with_a_running_frame_cursor() -> None:
    model = load_tiny()
    config = model.config
    handle = model.new_session("s", "sunrise", 0)
    outputs = [model.generate([handle])[0] for _ in range(3)]
    assert isinstance(model, StreamingVideoModel)
    assert [o.frames.shape for o in outputs] == [(n, config.height_px, config.width_px, 3) for n in (9, 12, 12)]
    assert outputs[1].frames.dtype == torch.uint8 and outputs[1].frames.device.type == "cpu"
    assert [(o.chunk_index, o.first_frame) for o in outputs] == [(0, 0), (1, 9), (2, 21)]


def test_a_batch_mixing_first_chunks_and_later_ones_decodes_each_with_its_own_vae_cache() -> None:
    model = load_tiny()
    ahead = model.new_session("ahead", "a calm sea", 3)
    model.generate([ahead])
    late = model.new_session("late", "a calm sea", 3)
    mixed = model.generate([ahead, late])
    assert [o.frames.shape[0] for o in mixed] == [12, 9]
    reference = load_tiny()
    alone = reference.new_session("ahead", "a calm sea", 3)
    reference.generate([alone])
    worst = (reference.generate([alone])[0].frames.int() - mixed[0].frames.int()).abs().max().item()
    assert worst <= model.config.batch_tolerance
