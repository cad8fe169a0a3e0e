"""Synthetic model directories: seeded weights written in the exact published layouts, read by the real loader.

No machine here can download the published checkpoints, so everything that serves a model (``make up``, the e2e
tests, the benchmarks) runs on a directory made by ``turboserve model synth``: the generator as Self-Forcing
saves it (``generator`` and ``generator_ema`` entries under ``WanDiffusionWrapper``'s ``model.`` prefix), the VAE
and the umT5 encoder in Wan's own layouts, and a small umT5-style tokenizer built with ``tokenizers``.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from services.gpu_worker.model import checkpoint_files as files
from services.gpu_worker.model.config import ModelConfig, get_config
from services.gpu_worker.model.conversions import diffusers_vae_to_wan, transformers_t5_to_wan
from services.gpu_worker.model.dit import WanCausalDiT
from services.gpu_worker.model.loader import on_meta, umt5_config
from services.gpu_worker.model.streaming_model import WanStreamingModel
from services.gpu_worker.model.text_encoder import PromptEncoder
from services.gpu_worker.model.vae import build_vae

_CROSS_ATTENTION_GAIN = 4.0
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5's vocabulary
_WORDS = (
    "a the of and in on with at to from by over under near through into",
    "red orange yellow green blue purple pink white black grey gold silver bright dark",
    "fox cat dog horse bird fish whale robot car train boat ship city forest ocean river mountain desert sky sun",
    "moon star cloud rain snow fire water tree flower street road bridge tower house room window light shadow",
    "running walking flying swimming jumping dancing driving falling glowing shining moving slowly quickly",
    "small large tall tiny huge old new calm stormy sunny night day morning evening winter summer",
    "camera view close aerial shot scene video cinematic realistic painting style colorful",
)


def synthetic_networks(config: ModelConfig, seed: int = 0) -> tuple[WanCausalDiT, AutoencoderKLWan,
                                                                       UMT5EncoderModel]:
    """The three networks with seeded weights (each network its own seed, so changing one leaves the others)."""
    networks: list[torch.nn.Module] = []
    builders: tuple[Callable[[], torch.nn.Module], ...] = (
        lambda: WanCausalDiT(config.dit), lambda: build_vae(config.vae),
        lambda: UMT5EncoderModel(umt5_config(config.text_encoder)),
    )
    for offset, build in enumerate(builders):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 3 + offset)
            networks.append(build().eval().requires_grad_(False))
    dit, vae, encoder = networks
    assert isinstance(dit, WanCausalDiT)
    with torch.no_grad():  # untrained cross-attention barely moves the picture; a prompt switch should show
        for layer in range(config.dit.num_layers):
            dit.block(layer).cross_attn.o.weight.mul_(_CROSS_ATTENTION_GAIN)
    return dit, vae, encoder


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A umT5-style tokenizer (pad 0, end-of-sequence 1 appended, unk 2) over a small English vocabulary: whole
    words where known, else single characters, so two different prompts almost never tokenize the same."""
    vocab = list(_SPECIAL_TOKENS)
    vocab += [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab += [w for line in _WORDS for w in line.split() if w not in vocab]
    if len(vocab) > vocab_size:
        raise ValueError(f"a synthetic tokenizer needs a vocabulary of at least {len(vocab)}, config has {vocab_size}")
    vocab += [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _write_tokenizer(directory: Path, config: ModelConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    synthetic_tokenizer(config.text_encoder.vocab_size).save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.dit.text_len,
                "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "right"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _lora_for(dit: WanCausalDiT, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT adapter over every Linear of the blocks, as LongLive trains it (``base_model.model.`` keys)."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, module in dit.blocks.named_modules(prefix="blocks"):
        if isinstance(module, torch.nn.Linear):
            prefix = f"base_model.model.{name}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    return adapter


def write_synthetic_dir(config: ModelConfig, directory: str | Path, seed: int = 0,
                        dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a servable model directory for ``config``; DiT and umT5 in ``dtype`` (bf16 as published), VAE fp32."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dit, vae, encoder = synthetic_networks(config, seed)
    generator = {f"model.{key}": value.to(dtype) for key, value in dit.state_dict().items()}
    generator_path = directory / config.checkpoint.generator[0]
    generator_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": generator, "generator_ema": generator}, generator_path)
    if config.checkpoint.lora:
        lora_path = directory / config.checkpoint.lora[0]
        lora_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"generator_lora": _lora_for(dit, config.checkpoint.lora_rank, seed)}, lora_path)
    torch.save(diffusers_vae_to_wan(vae.state_dict()), directory / files.VAE_FILES[0])
    t5_state = {key: value.to(dtype) for key, value in transformers_t5_to_wan(encoder.state_dict()).items()}
    torch.save(t5_state, directory / files.T5_FILES[0])
    _write_tokenizer(directory / files.TOKENIZER_DIRS[0], config)
    (directory / files.DIRECTORY_CONFIG).write_text(json.dumps({"config": config.name}) + "\n", encoding="utf-8")
    return directory


def synthetic_model_on_device(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                              max_sessions: int) -> WanStreamingModel:
    """A model with random weights made on the device itself, no files: for timing the full size on a GPU, where a
    host-side init of 7B parameters would take minutes. The values only have to keep activations in range."""
    dit, vae, encoder = on_meta(config)
    generator = torch.Generator(device=device).manual_seed(0)
    for module in (dit, vae, encoder):
        module.to_empty(device=device)
        assert not list(module.buffers()), "a buffer would stay uninitialised"
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.endswith(("gamma", "norm.weight", "norm_q.weight", "norm_k.weight", "norm3.weight",
                                  "layer_norm.weight")):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                    param.normal_(0.0, fan_in**-0.5, generator=generator)
        torch.nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=synthetic_tokenizer(config.text_encoder.vocab_size),
                                        pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text = PromptEncoder(encoder, tokenizer, config.dit.text_len, device, dtype)
    return WanStreamingModel(config, dit, vae, text, device, dtype, max_sessions)


@functools.cache
def temporary_synthetic_dir(config_name: str = "tiny") -> Path:
    """One synthetic directory per process for benchmarks and tests, removed when the process exits."""
    directory = Path(tempfile.mkdtemp(prefix=f"turboserve-{config_name}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return write_synthetic_dir(get_config(config_name), directory)
