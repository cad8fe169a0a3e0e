"""A model directory's files under their published names, read without executing pickled code.

Layout of ``TURBOSERVE_MODEL_DIR`` (the Wan2.1-T2V-1.3B folder plus a distilled generator)::

    Wan2.1_VAE.pth                       the VAE, Wan's own layout (or vae/diffusion_pytorch_model.safetensors)
    models_t5_umt5-xxl-enc-bf16.pth      the umT5-XXL encoder, Wan's own layout
    google/umt5-xxl/                     its tokenizer (tokenizer.json, tokenizer_config.json, ...)
    self_forcing_dmd.pt | model.pt | longlive_base.pt (+ lora.pt)   the causal generator, per model config
    turboserve.json                      optional: {"config": "<name>"} when the directory does not say by itself
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from services.gpu_worker.model.config import ModelConfig, config_names, get_config
from services.gpu_worker.model.errors import CheckpointDtypeError, CheckpointError, MissingCheckpointFile

VAE_FILES = ("Wan2.1_VAE.pth", "vae/diffusion_pytorch_model.safetensors")
T5_FILES = ("models_t5_umt5-xxl-enc-bf16.pth",)
TOKENIZER_DIRS = ("google/umt5-xxl",)
DIRECTORY_CONFIG = "turboserve.json"

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def find_file(model_dir: Path, candidates: Sequence[str], what: str) -> Path:
    """The first candidate that exists under ``model_dir``; ``MissingCheckpointFile`` names them all."""
    for name in candidates:
        path = model_dir / name
        if path.exists():
            return path
    raise MissingCheckpointFile(f"{model_dir}: no {what}; looked for {', '.join(candidates)}")


def resolve_config(model_dir: Path, requested: str | None = None) -> ModelConfig:
    """The config to serve ``model_dir`` with: the one asked for, else the directory's ``turboserve.json``, else
    the first config whose generator file the directory holds."""
    if not model_dir.is_dir():
        raise MissingCheckpointFile(f"model directory {model_dir} does not exist")
    if requested:
        return get_config(requested)
    marker = model_dir / DIRECTORY_CONFIG
    if marker.exists():
        try:
            name = json.loads(marker.read_text(encoding="utf-8"))["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{marker}: expected {{\"config\": \"<name>\"}} ({exc})") from None
        return get_config(str(name))
    for name in config_names():
        config = get_config(name)
        if any((model_dir / candidate).exists() for candidate in config.checkpoint.generator):
            return config
    raise MissingCheckpointFile(f"{model_dir}: no generator checkpoint of any known model ({config_names()}); "
                                f"name the config with TURBOSERVE_MODEL or {DIRECTORY_CONFIG}")


def read_tensors(path: Path, device: str = "cpu") -> dict[str, object]:
    """A checkpoint's top-level mapping, memory-mapped where the format allows; never runs pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device=device))
        loaded = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({first_line})") from None
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a mapping of tensors")
    return dict(loaded)


def state_dict_of(path: Path, loaded: Mapping[str, object], entries: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, taken from its first present training ``entries`` (``generator_ema``, ...) or
    from the top level; every value must be a float tensor."""
    source: object = loaded
    for entry in entries:
        if entry in loaded:
            source = loaded[entry]
            break
    if not isinstance(source, Mapping):
        raise CheckpointError(f"{path}: entry is a {type(source).__name__}, not a state dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            listed = f"; expected one of the entries {list(entries)}" if entries else ""
            raise CheckpointError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor{listed}")
        if value.dtype not in _FLOAT_DTYPES:
            raise CheckpointDtypeError(f"{path}: {key!r} has dtype {value.dtype}; the model computes in "
                                       "float32, float16 or bfloat16")
        tensors[str(key)] = value
    return tensors
