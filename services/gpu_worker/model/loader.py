"""Builds the model's three networks from a model directory, with the published weights loaded ``strict``.

Each network is built on the meta device and takes the checkpoint's tensors by assignment, so a 1.3B DiT and an
11 GB text encoder never pass through a random initialisation, and a key or shape mismatch is a typed error
naming the file and the first offending key before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from services.gpu_worker.model import checkpoint_files as files
from services.gpu_worker.model.config import ModelConfig, TextEncoderConfig
from services.gpu_worker.model.conversions import (
    merge_lora,
    strip_wrappers,
    wan_t5_to_transformers,
    wan_vae_to_diffusers,
)
from services.gpu_worker.model.dit import WanCausalDiT
from services.gpu_worker.model.errors import CheckpointKeyMismatch, MissingCheckpointFile
from services.gpu_worker.model.streaming_model import WanStreamingModel
from services.gpu_worker.model.text_encoder import PromptEncoder
from services.gpu_worker.model.vae import build_vae


def umt5_config(config: TextEncoderConfig) -> UMT5Config:
    return UMT5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_heads=config.num_heads, num_layers=config.num_layers, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, layer_norm_epsilon=1e-6,
        dropout_rate=0.0, tie_word_embeddings=False,
    )


def on_meta(config: ModelConfig) -> tuple[WanCausalDiT, AutoencoderKLWan, UMT5EncoderModel]:
    """The three networks with every parameter on the meta device: shapes without bytes."""
    with torch.device("meta"):
        return WanCausalDiT(config.dit), build_vae(config.vae), UMT5EncoderModel(umt5_config(config.text_encoder))


def compare_keys(path: Path, expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``CheckpointKeyMismatch`` unless ``state`` has exactly ``expected``'s keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
                         for key in set(expected) & set(state) if state[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointKeyMismatch(str(path), missing, unexpected, wrong_shape)


def generator_state(model_dir: Path, config: ModelConfig) -> tuple[Path, dict[str, torch.Tensor]]:
    """The generator's state dict with training wrappers stripped and a configured LoRA merged in."""
    path = files.find_file(model_dir, config.checkpoint.generator, f"{config.name} generator checkpoint")
    state = strip_wrappers(files.state_dict_of(path, files.read_tensors(path), config.checkpoint.entries))
    if config.checkpoint.lora:
        lora_path = files.find_file(model_dir, config.checkpoint.lora, f"{config.name} LoRA")
        adapter = files.state_dict_of(lora_path, files.read_tensors(lora_path), ("generator_lora", "lora"))
        merge_lora(lora_path, state, adapter, config.checkpoint.lora_rank, config.checkpoint.lora_alpha)
    return path, state


def vae_state(model_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = files.find_file(model_dir, files.VAE_FILES, "VAE")
    return path, wan_vae_to_diffusers(files.state_dict_of(path, files.read_tensors(path)))


def text_encoder_state(model_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = files.find_file(model_dir, files.T5_FILES, "umT5 encoder")
    return path, wan_t5_to_transformers(path, files.state_dict_of(path, files.read_tensors(path)))


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    path = files.find_file(model_dir, files.TOKENIZER_DIRS, "umT5 tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MissingCheckpointFile(f"{path}: not a tokenizer folder ({str(exc).splitlines()[0]})") from None


def _assign(module: nn.Module, path: Path, state: Mapping[str, torch.Tensor], device: torch.device,
            dtype: torch.dtype) -> nn.Module:
    compare_keys(path, module.state_dict(), state)
    module.load_state_dict(state, strict=True, assign=True)
    # nn.Module's own .to: diffusers' override warns about fp32-only modules, and Wan's VAE has none.
    return nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass(frozen=True, slots=True)
class ModelParts:
    config: ModelConfig
    dit: WanCausalDiT
    vae: AutoencoderKLWan
    text: PromptEncoder


def load_parts(model_dir: str | Path, config_name: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, text_device: str | torch.device | None = None) -> ModelParts:
    """Read every published file of ``model_dir`` onto ``device`` (the text encoder onto ``text_device``)."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    text_device = torch.device(text_device) if text_device is not None else device
    config = files.resolve_config(model_dir, config_name)
    dit, vae, encoder = on_meta(config)
    _assign(dit, *generator_state(model_dir, config), device, dtype)
    _assign(vae, *vae_state(model_dir), device, dtype)
    t5_path, t5_state = text_encoder_state(model_dir)
    _assign(encoder, t5_path, t5_state, text_device, dtype)
    encoder.encoder.embed_tokens = encoder.shared  # tied as in transformers' own init
    text = PromptEncoder(encoder, load_tokenizer(model_dir), config.dit.text_len, device, dtype)
    return ModelParts(config, dit, vae, text)


def load_model(model_dir: str | Path, config_name: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, max_sessions: int | None = None,
               text_device: str | torch.device | None = None) -> WanStreamingModel:
    """The streaming model serving ``model_dir``; ``max_sessions`` defaults to the config's slot count."""
    parts = load_parts(model_dir, config_name, device, dtype, text_device)
    slots = parts.config.default_max_sessions if max_sessions is None else max_sessions
    return WanStreamingModel(parts.config, parts.dit, parts.vae, parts.text, torch.device(device), dtype, slots)
