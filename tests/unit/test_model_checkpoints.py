"""Published checkpoints load unchanged: the full-size key sets, the layout mappings, wrappers, LoRA, typed errors,
and ``turboserve model check``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.cli import main as cli
from services.gpu_worker.model import (
    CheckpointDtypeError,
    CheckpointError,
    CheckpointKeyMismatch,
    MissingCheckpointFile,
    get_config,
)
from services.gpu_worker.model.config import CheckpointConfig
from services.gpu_worker.model.conversions import (
    diffusers_vae_to_wan,
    merge_lora,
    strip_wrappers,
    transformers_t5_to_wan,
    wan_t5_to_transformers,
)
from services.gpu_worker.model.loader import generator_state, load_parts, on_meta
from services.gpu_worker.model.synth import synthetic_networks, write_synthetic_dir
from tests.synthetic_models import tiny_model_dir

PUBLISHED = Path(__file__).parents[1] / "data" / "published_keys"
TINY = get_config("tiny")


def _published(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in json.loads((PUBLISHED / f"{name}.json").read_text()).items()}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def test_the_full_size_networks_built_on_meta_take_exactly_the_published_keys_and_shapes() -> None:
    dit, vae, encoder = on_meta(get_config("self-forcing"))
    assert _shapes(dit.state_dict()) == _published("dit")
    assert _shapes(transformers_t5_to_wan(encoder.state_dict())) == _published("t5")
    assert _shapes(diffusers_vae_to_wan(vae.state_dict())) == _published("vae")  # checked back by the library


def test_the_t5_layout_mapping_round_trips() -> None:
    _, _, encoder = synthetic_networks(TINY)
    state = encoder.state_dict()
    back = wan_t5_to_transformers(Path("t5.pth"), transformers_t5_to_wan(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir(), tmp_path / "model"))


def _generator_file(model_dir: Path) -> Path:
    return model_dir / TINY.checkpoint.generator[0]


def _rewrite_generator(model_dir: Path, change: object) -> None:
    checkpoint = torch.load(_generator_file(model_dir), weights_only=True)
    change(checkpoint["generator_ema"])  # type: ignore[operator]
    torch.save(checkpoint, _generator_file(model_dir))


def test_the_synthetic_directory_loads_through_the_real_loader_with_the_seeded_weights() -> None:
    parts = load_parts(tiny_model_dir())
    dit, _, _ = synthetic_networks(TINY)
    for key, value in dit.state_dict().items():
        assert torch.equal(parts.dit.state_dict()[key], value.to(torch.bfloat16).float()), key


def test_training_wrapper_prefixes_are_stripped_and_the_ema_entry_is_preferred(model_dir: Path) -> None:
    checkpoint = torch.load(_generator_file(model_dir), weights_only=True)
    wrapped = {key.replace("model.", "model._fsdp_wrapped_module._orig_mod.", 1): value
               for key, value in checkpoint["generator_ema"].items()}
    torch.save({"generator": {k: torch.zeros_like(v) for k, v in wrapped.items()}, "generator_ema": wrapped},
               _generator_file(model_dir))
    _, state = generator_state(model_dir, TINY)
    assert state.keys() == strip_wrappers(checkpoint["generator_ema"]).keys()
    assert all(value.abs().sum() > 0 for key, value in state.items() if key.endswith("weight"))


def test_a_safetensors_generator_loads_like_the_pt(model_dir: Path) -> None:
    checkpoint = torch.load(_generator_file(model_dir), weights_only=True)
    save_file({k: v.contiguous() for k, v in checkpoint["generator_ema"].items()}, model_dir / "model.safetensors")
    config = dataclasses.replace(TINY, checkpoint=CheckpointConfig(generator=("model.safetensors",)))
    _, state = generator_state(model_dir, config)
    assert all(torch.equal(state[k], v) for k, v in strip_wrappers(checkpoint["generator_ema"]).items())


def test_a_missing_and_an_unexpected_key_are_named(model_dir: Path) -> None:
    def change(state: dict[str, torch.Tensor]) -> None:
        del state["model.blocks.1.ffn.2.bias"]
        state["model.blocks.1.ffn.3.bias"] = torch.zeros(1)

    _rewrite_generator(model_dir, change)
    with pytest.raises(CheckpointKeyMismatch, match=r"1 missing \(first: blocks.1.ffn.2.bias\).*"
                                                    r"1 unexpected \(first: blocks.1.ffn.3.bias\)"):
        load_parts(model_dir)


def test_a_wrong_shape_is_named(model_dir: Path) -> None:
    _rewrite_generator(model_dir, lambda s: s.update({"model.head.head.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointKeyMismatch, match=r"wrong shape \(first: head.head.weight \(3, 3\)"):
        load_parts(model_dir)


def test_an_integer_tensor_is_a_dtype_error(model_dir: Path) -> None:
    _rewrite_generator(model_dir, lambda s: s.update({"model.head.head.bias": torch.zeros(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointDtypeError, match=r"head.head.bias.*torch.int8"):
        load_parts(model_dir)


def test_a_missing_file_is_named_with_where_it_was_looked_for(model_dir: Path) -> None:
    (model_dir / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(MissingCheckpointFile, match=r"no VAE; looked for Wan2.1_VAE.pth"):
        load_parts(model_dir)


class _NotATensor:
    pass


def test_a_checkpoint_that_needs_arbitrary_code_to_unpickle_is_refused(model_dir: Path) -> None:
    torch.save({"generator_ema": _NotATensor()}, _generator_file(model_dir))
    with pytest.raises(CheckpointError, match="weights-only"):
        load_parts(model_dir)


def test_a_peft_lora_merges_as_w_plus_alpha_over_rank_b_a() -> None:
    base = {"blocks.0.self_attn.q.weight": torch.randn(8, 6), "blocks.0.ffn.0.weight": torch.randn(5, 8)}
    a, b = torch.randn(2, 6), torch.randn(8, 2)
    adapter = {"base_model.model.blocks.0.self_attn.q.lora_A.weight": a,
               "base_model.model.blocks.0.self_attn.q.lora_B.weight": b}
    expected = base["blocks.0.self_attn.q.weight"] + 4 / 2 * b @ a
    untouched = base["blocks.0.ffn.0.weight"].clone()
    merge_lora(Path("lora.pt"), base, adapter, rank=2, alpha=4)
    assert torch.allclose(base["blocks.0.self_attn.q.weight"], expected)
    assert torch.equal(base["blocks.0.ffn.0.weight"], untouched)
    with pytest.raises(CheckpointKeyMismatch, match="lora_B"):
        merge_lora(Path("lora.pt"), base, {k: v for k, v in adapter.items() if "lora_A" in k}, rank=2, alpha=4)


def test_a_longlive_layout_directory_loads_its_base_with_the_lora_merged(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, checkpoint=CheckpointConfig(
        generator=("longlive_base.pt",), entries=("generator",), lora=("lora.pt",), lora_rank=4, lora_alpha=8))
    write_synthetic_dir(config, tmp_path)
    _, merged = generator_state(tmp_path, config)
    base = strip_wrappers(torch.load(tmp_path / "longlive_base.pt", weights_only=True)["generator"])
    adapter = torch.load(tmp_path / "lora.pt", weights_only=True)["generator_lora"]
    a = adapter["base_model.model.blocks.0.cross_attn.o.lora_A.weight"]
    b = adapter["base_model.model.blocks.0.cross_attn.o.lora_B.weight"]
    want = (base["blocks.0.cross_attn.o.weight"].float() + 2 * b @ a).to(torch.bfloat16)
    assert torch.equal(merged["blocks.0.cross_attn.o.weight"], want)
    assert torch.equal(merged["head.head.weight"], base["head.head.weight"])  # only the blocks are adapted


def test_model_check_passes_a_good_directory_and_names_the_first_bad_key(
    model_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(["model", "check", str(model_dir), "--gpu-memory-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok") >= 4 and "VAE cache" in out and "sessions in 1 GiB" in out
    _rewrite_generator(model_dir, lambda s: s.pop("model.blocks.0.self_attn.norm_q.weight"))
    assert cli(["model", "check", str(model_dir)]) == 2
    assert "blocks.0.self_attn.norm_q.weight" in capsys.readouterr().out


def test_model_check_sizes_the_full_model_without_its_files(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "turboserve.json").write_text(json.dumps({"config": "longlive"}))
    assert cli(["model", "check", str(tmp_path), "--gpu-memory-gib", "80"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "no longlive generator checkpoint; looked for longlive_base.pt" in out
    assert "KV 2.50 GiB + VAE cache 1.76 GiB" in out  # 12-frame window with a sink; 832x480 decoder cache


def test_a_model_made_on_a_device_without_files_runs_like_any_other() -> None:
    from services.gpu_worker.model.synth import synthetic_model_on_device

    model = synthetic_model_on_device(TINY, torch.device("cpu"), torch.float32, 1)
    handle = model.new_session("s", "a fox", 0)
    assert [model.generate([handle])[0].frames.shape[0] for _ in range(2)] == [9, 12]
