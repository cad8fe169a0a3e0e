"""Published checkpoint layouts onto the modules we run, each mapping in one place and tested by a round trip.

* DiT: our module tree is Wan's, so a generator only loses its training wrappers' prefixes (``model.`` of
  Self-Forcing's ``WanDiffusionWrapper``, FSDP's and ``torch.compile``'s markers).
* umT5: Wan's ``T5Encoder`` names onto ``transformers``' ``UMT5EncoderModel`` (and back, to write synthetic files).
* VAE: Wan's ``Wan2.1_VAE.pth`` onto ``diffusers``' ``AutoencoderKLWan`` by the library's own conversion.
* LoRA: a PEFT adapter (LongLive's ``lora.pt``) merged into the generator's weights, W += alpha / r * B @ A.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from services.gpu_worker.model.errors import CheckpointError, CheckpointKeyMismatch

_WRAPPER_MARKERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_WRAPPER_PREFIXES = ("module.", "model.diffusion_model.", "model.", "generator.")


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without training-wrapper markers, and without a prefix every key shares (``model.``, ...)."""
    keys = {key: key for key in state}
    for marker in _WRAPPER_MARKERS:
        keys = {original: key.replace(marker, "") for original, key in keys.items()}
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if keys and all(key.startswith(prefix) for key in keys.values()):
                keys = {original: key[len(prefix):] for original, key in keys.items()}
                changed = True
    return {keys[original]: value for original, value in state.items()}


# Wan's T5Encoder key -> UMT5EncoderModel key; "{i}" is the block index.
_T5_BLOCK_KEYS = {
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.q.weight": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    "blocks.{i}.attn.k.weight": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    "blocks.{i}.attn.v.weight": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    "blocks.{i}.attn.o.weight": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    "blocks.{i}.pos_embedding.embedding.weight":
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
}
_T5_FIXED_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


def _t5_pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_T5_TO_HF = [(_t5_pattern(wan), hf) for wan, hf in _T5_BLOCK_KEYS.items()]
_T5_TO_WAN = [(_t5_pattern(hf), wan) for wan, hf in _T5_BLOCK_KEYS.items()]


def _rename(key: str, fixed: Mapping[str, str], patterns: list[tuple[re.Pattern[str], str]]) -> str | None:
    if key in fixed:
        return fixed[key]
    for pattern, template in patterns:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.group(1))
    return None


def wan_t5_to_transformers(path: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's umT5 encoder state dict as ``UMT5EncoderModel``'s (its input embedding shares ``shared.weight``)."""
    converted: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        new_key = _rename(key, _T5_FIXED_KEYS, _T5_TO_HF)
        if new_key is None:
            unexpected.append(key)
        else:
            converted[new_key] = value
    if unexpected:
        raise CheckpointKeyMismatch(str(path), [], sorted(unexpected), [])
    if "shared.weight" in converted:
        converted["encoder.embed_tokens.weight"] = converted["shared.weight"]
    return converted


def transformers_t5_to_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``wan_t5_to_transformers``: how Wan saves the encoder (used to write synthetic files)."""
    inverse_fixed = {hf: wan for wan, hf in _T5_FIXED_KEYS.items()}
    converted = {}
    for key, value in state.items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        new_key = _rename(key, inverse_fixed, _T5_TO_WAN)
        if new_key is None:
            raise ValueError(f"UMT5 key {key!r} has no place in Wan's T5 layout")
        converted[new_key] = value
    return converted


def wan_vae_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Wan2.1_VAE.pth`` keys onto ``AutoencoderKLWan`` by ``diffusers``' own single-file conversion; a state dict
    already in the diffusers layout passes through."""
    if "decoder.middle.0.residual.0.gamma" not in state:
        return dict(state)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return dict(convert_wan_vae_to_diffusers(dict(state)))


_RESNET_PARTS = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                 "conv2": "residual.6", "conv_shortcut": "shortcut"}
# diffusers name (regex) -> Wan's; the decoder has 3 resnets + 1 upsampler per stage (num_res_blocks 2).
_VAE_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^quant_conv\.(.+)$"), lambda m: f"conv1.{m[1]}"),
    (re.compile(r"^post_quant_conv\.(.+)$"), lambda m: f"conv2.{m[1]}"),
    (re.compile(r"^(encoder|decoder)\.conv_in\.(.+)$"), lambda m: f"{m[1]}.conv1.{m[2]}"),
    (re.compile(r"^(encoder|decoder)\.norm_out\.gamma$"), lambda m: f"{m[1]}.head.0.gamma"),
    (re.compile(r"^(encoder|decoder)\.conv_out\.(.+)$"), lambda m: f"{m[1]}.head.2.{m[2]}"),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(norm1\.gamma|conv1|norm2\.gamma|conv2)(.*)$"),
     lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_RESNET_PARTS[m[3]]}{m[4]}"),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$"), lambda m: f"{m[1]}.middle.1.{m[2]}"),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)(.*)$"),
     lambda m: f"encoder.downsamples.{m[1]}.{_RESNET_PARTS[m[2]]}{m[3]}"),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$"), lambda m: f"encoder.downsamples.{m[1]}.{m[2]}"),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)"
                r"(.*)$"), lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESNET_PARTS[m[3]]}{m[4]}"),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$"),
     lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"),
]


def diffusers_vae_to_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How Wan saves the VAE (``Wan2.1_VAE.pth``), from ``AutoencoderKLWan``'s state dict; used to write synthetic
    files. Checked against the library's own conversion: converting the result back must give ``state``'s keys."""
    converted = {}
    for key, value in state.items():
        for pattern, rename in _VAE_RULES:
            match = pattern.match(key)
            if match:
                converted[rename(match)] = value
                break
        else:
            raise ValueError(f"AutoencoderKLWan key {key!r} has no place in Wan's VAE layout")
    back = wan_vae_to_diffusers(converted)
    if set(back) != set(state):
        raise ValueError(f"Wan VAE layout does not convert back: {sorted(set(state) ^ set(back))[:3]}")
    return converted


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight$")


def merge_lora(path: Path, base: dict[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], rank: int,
               alpha: int) -> None:
    """Add a PEFT LoRA into ``base`` in place: for each adapted Linear, W += alpha / rank * B @ A (in float32)."""
    if rank < 1:
        raise CheckpointError(f"{path}: a LoRA needs the config's lora_rank >= 1, got {rank}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in strip_wrappers({k.replace("base_model.model.", ""): v for k, v in adapter.items()}).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise CheckpointKeyMismatch(str(path), [], [key], [])
        pairs.setdefault(match["module"], {})[match["side"]] = value
    missing = sorted(f"{module}.weight" for module in pairs if f"{module}.weight" not in base)
    halves = sorted(f"{module}.lora_{'B' if 'A' in sides else 'A'}.weight" for module, sides in pairs.items()
                    if len(sides) != 2)
    if missing or halves:
        raise CheckpointKeyMismatch(str(path), halves, missing, [])
    scale = alpha / rank
    for module, sides in pairs.items():
        weight = base[f"{module}.weight"]
        delta = sides["B"].float() @ sides["A"].float()
        if delta.shape != weight.shape:
            raise CheckpointKeyMismatch(str(path), [], [], [f"{module} (B @ A {tuple(delta.shape)} vs W "
                                                            f"{tuple(weight.shape)})"])
        base[f"{module}.weight"] = (weight.float() + scale * delta).to(weight.dtype)
