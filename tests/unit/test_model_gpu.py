"""On a real GPU: the full-size Wan2.1-1.3B causal model at 832x480 in bf16 (synthetic weights made on the device)
streams 9 then 12 frames, batches without changing a session's frames, and moves its state exactly.

Skipped on hosts without CUDA; ``bench/model.py`` times the same model."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.model import get_config
from services.gpu_worker.model.synth import synthetic_model_on_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_full_size_model_streams_batches_and_moves_its_state_on_the_gpu() -> None:
    model = synthetic_model_on_device(get_config("self-forcing"), torch.device("cuda"), torch.bfloat16, 3)
    batched = [model.new_session(f"s{i}", f"a fox number {i}", i) for i in range(2)]
    outputs = [model.generate(batched) for _ in range(2)]
    assert [o[0].frames.shape for o in outputs] == [(9, 480, 832, 3), (12, 480, 832, 3)]
    state = model.export_state(batched[1])
    assert state["vae_cache.000"].is_cuda and sum(t.nbytes for t in state.values()) > 1 << 30
    model.release(batched[1])
    alone = model.import_state("s1", state)
    together = model.generate([batched[0]])[0].frames.float()
    moved = model.generate([alone])[0].frames.float()
    assert (together - moved).abs().mean() > 1.0  # different seeds stay different
    reference = synthetic_model_on_device(get_config("self-forcing"), torch.device("cuda"), torch.bfloat16, 1)
    single = reference.new_session("s1", "a fox number 1", 1)
    frames = [reference.generate([single])[0].frames.float() for _ in range(3)]
    assert (frames[-1] - moved).abs().mean() <= 1.0  # batched, exported and imported: as if alone


def test_a_state_restored_from_pinned_host_memory_streams_in_under_the_next_batch_exactly() -> None:
    config, cuda = get_config("self-forcing"), torch.device("cuda")
    model = synthetic_model_on_device(config, cuda, torch.bfloat16, 2)
    reference = synthetic_model_on_device(config, cuda, torch.bfloat16, 1)
    ours, theirs = model.new_session("s", "a fox in the snow", 5), reference.new_session("s", "a fox in the snow", 5)
    for _ in range(2):
        model.generate([ours]), reference.generate([theirs])
    host = {name: tensor.cpu().pin_memory() for name, tensor in model.export_state(ours).items()}
    model.release(ours)
    beside = model.new_session("b", "a cat", 6)
    restored = model.import_state("s", host)
    landed = model.import_landed(restored)
    assert not landed.done()  # the import returned with its copies still in flight
    frames = model.generate([beside, restored])[1].frames.float()
    landed.wait()
    assert (frames - reference.generate([theirs])[0].frames.float()).abs().mean() <= 1.0
