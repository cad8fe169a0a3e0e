"""The reference model batches sessions without changing any session's frames, and is deterministic by seed."""

from __future__ import annotations

import torch

from services.gpu_worker.model import StreamingVideoModel, load_model


def _staggered_run(batched: bool) -> dict[tuple[str, int], torch.Tensor]:
    """Five sessions started one chunk apart (so their cache lengths differ, and some wrap), 7 rounds."""
    model = load_model("tiny", max_sessions=8)
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
    tolerance = load_model("tiny").config.batch_tolerance
    assert alone.keys() == batched.keys()
    worst = max((alone[key].int() - batched[key].int()).abs().max().item() for key in alone)
    assert worst <= tolerance


def test_generate_returns_outputs_in_the_order_of_the_handles_given() -> None:
    model = load_model("tiny")
    first = model.new_session("first", "a", 1)
    second = model.new_session("second", "b", 2)
    outputs = model.generate([second, first])
    assert [o.session_id for o in outputs] == ["second", "first"]


def test_two_model_instances_with_the_same_seed_make_identical_frames() -> None:
    runs = []
    for _ in range(2):
        model = load_model("tiny")
        handle = model.new_session("s", "waves of light", 42)
        runs.append(torch.cat([model.generate([handle])[0].frames for _ in range(3)]))
    assert torch.equal(runs[0], runs[1])


def test_a_different_seed_makes_different_frames() -> None:
    model = load_model("tiny")
    one = model.new_session("one", "waves of light", 1)
    two = model.new_session("two", "waves of light", 2)
    out_one, out_two = model.generate([one, two])
    assert not torch.equal(out_one.frames, out_two.frames)


def test_chunks_are_uint8_frames_at_the_configured_size_with_a_running_frame_cursor() -> None:
    model = load_model("tiny")
    config = model.config
    handle = model.new_session("s", "sunrise", 0)
    outputs = [model.generate([handle])[0] for _ in range(2)]
    assert isinstance(model, StreamingVideoModel)
    assert outputs[1].frames.shape == (config.video_frames_per_chunk, config.height_px, config.width_px, 3)
    assert outputs[1].frames.dtype == torch.uint8 and outputs[1].frames.device.type == "cpu"
    assert [(o.chunk_index, o.first_frame) for o in outputs] == [(0, 0), (1, config.video_frames_per_chunk)]


def test_frames_move_within_a_chunk_and_from_chunk_to_chunk_without_being_noise() -> None:
    model = load_model("tiny")
    handle = model.new_session("s", "a calm sea", 3)
    first, second = (model.generate([handle])[0].frames.float() for _ in range(2))
    assert (first[0] - first[-1]).abs().mean() > 2.0
    assert (first[-1] - second[-1]).abs().mean() > 2.0
    neighbour_step = (first[:, :, 1:] - first[:, :, :-1]).abs().mean()
    assert neighbour_step < 0.25 * first.std()  # smooth fields: adjacent pixels far closer than the spread
