"""Model configurations as data: one JSON file per served model under ``configs/``.

Every field defaults to the published Wan2.1-T2V-1.3B architecture (DiT, umT5-XXL encoder, Wan VAE) at 832x480,
so a file names only what it changes: a distilled checkpoint's schedule and attention window, or every size for
the CPU ``tiny``. The same classes build ``tiny`` on a CPU and the full size on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from services.gpu_worker.model.errors import InvalidModelConfig, UnknownModelConfig

PATCH_SIZE = (1, 2, 2)
"""Latent patch (frames, rows, cols) of Wan2.1's patch embedding."""

VAE_SPATIAL = 8
"""Wan's VAE turns one latent pixel into 8 x 8 RGB pixels."""

VAE_TEMPORAL = 4
"""Each latent frame after the first decodes to 4 video frames; the stream's very first latent frame to 1."""


@dataclass(frozen=True, slots=True)
class DiTConfig:
    """Wan2.1 ``WanModel`` hyperparameters, named as in Wan's own config."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    """Prompt context length: the T5 output is zero-padded to it and cross-attention reads every row, unmasked."""
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True, slots=True)
class TextEncoderConfig:
    """umT5 encoder sizes as ``transformers.UMT5Config`` names them (umT5-XXL by default)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


@dataclass(frozen=True, slots=True)
class VaeConfig:
    """``diffusers.AutoencoderKLWan`` arguments (Wan2.1's VAE by default)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """How the causal model runs a stream: chunk size, attention window, few-step schedule."""

    latent_height: int = 60
    latent_width: int = 104
    frames_per_chunk: int = 3
    """Latent frames per chunk (Self-Forcing's ``num_frame_per_block``)."""
    sink_frames: int = 0
    """First latent frames whose K/V stay forever (LongLive's ``sink_size``)."""
    attention_frames: int = 21
    """Latent frames a chunk's queries see, its own included (``local_attn_size``; Self-Forcing's -1 is 21)."""
    denoise_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    timestep_shift: float = 5.0
    warp_timesteps: bool = True
    """Self-Forcing's ``warp_denoising_step``: condition on the shifted timestep rather than the listed one."""
    recache_on_prompt_switch: bool = False
    """LongLive's KV re-cache: on a prompt switch, recompute the cached chunks' K/V under the new prompt."""


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """Where a served model's generator weights sit in ``TURBOSERVE_MODEL_DIR`` under their published names."""

    generator: tuple[str, ...] = ("generator.pt",)
    """Candidate paths of the DiT checkpoint, first found wins."""
    entries: tuple[str, ...] = ("generator_ema", "generator")
    """Top-level entries of a training checkpoint holding the generator's state dict, first found wins."""
    lora: tuple[str, ...] = ()
    """Candidate paths of a LoRA merged into the generator at load (LongLive)."""
    lora_rank: int = 0
    lora_alpha: int = 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A served model: architecture, stream and checkpoint layout; derived sizes are properties."""

    name: str
    about: str = ""
    dit: DiTConfig = field(default_factory=DiTConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    default_max_sessions: int = 4
    batch_tolerance: float = 4.0
    """Max abs difference of uint8 frame values a session may show between running alone and batched."""

    def __post_init__(self) -> None:
        d, s = self.dit, self.stream
        if d.dim % d.num_heads or d.head_dim % 2:
            raise InvalidModelConfig(f"{self.name}: dim={d.dim} / num_heads={d.num_heads} must give an even head dim")
        if d.head_dim < 6:
            raise InvalidModelConfig(f"{self.name}: head dim {d.head_dim} too small to split over 3 RoPE axes")
        if s.latent_height % PATCH_SIZE[1] or s.latent_width % PATCH_SIZE[2]:
            raise InvalidModelConfig(f"{self.name}: latent {s.latent_height}x{s.latent_width} is not a whole number "
                                     f"of {PATCH_SIZE[1]}x{PATCH_SIZE[2]} patches")
        if s.frames_per_chunk < 2:
            raise InvalidModelConfig(f"{self.name}: frames_per_chunk={s.frames_per_chunk} must be >= 2 (the VAE's "
                                     "causal cache is whole only after two latent frames)")
        if s.sink_frames < 0 or s.sink_frames % s.frames_per_chunk:
            raise InvalidModelConfig(f"{self.name}: sink_frames={s.sink_frames} must be a multiple of "
                                     f"frames_per_chunk={s.frames_per_chunk}")
        past = s.attention_frames - s.frames_per_chunk - s.sink_frames
        if past < s.frames_per_chunk or past % s.frames_per_chunk:
            raise InvalidModelConfig(
                f"{self.name}: attention_frames={s.attention_frames} must leave at least one whole chunk of "
                f"{s.frames_per_chunk} frames between the sink ({s.sink_frames}) and the chunk itself"
            )
        if not s.denoise_timesteps or any(not 0 < t <= 1000 for t in s.denoise_timesteps):
            raise InvalidModelConfig(f"{self.name}: denoise_timesteps={s.denoise_timesteps} must be in (0, 1000]")
        if self.default_max_sessions < 1 or self.batch_tolerance < 0:
            raise InvalidModelConfig(f"{self.name}: default_max_sessions must be >= 1 and batch_tolerance >= 0")
        if self.text_encoder.d_model != d.text_dim:
            raise InvalidModelConfig(f"{self.name}: text encoder width {self.text_encoder.d_model} != DiT text_dim "
                                     f"{d.text_dim}")

    # Token geometry of the DiT.
    @property
    def tokens_per_frame(self) -> int:
        return (self.stream.latent_height // PATCH_SIZE[1]) * (self.stream.latent_width // PATCH_SIZE[2])

    @property
    def chunk_tokens(self) -> int:
        return self.stream.frames_per_chunk * self.tokens_per_frame

    @property
    def sink_chunks(self) -> int:
        return self.stream.sink_frames // self.stream.frames_per_chunk

    @property
    def window_chunks(self) -> int:
        """Past chunks kept in the ring after the sink."""
        s = self.stream
        return (s.attention_frames - s.frames_per_chunk - s.sink_frames) // s.frames_per_chunk

    @property
    def sink_tokens(self) -> int:
        return self.sink_chunks * self.chunk_tokens

    @property
    def cache_capacity_tokens(self) -> int:
        return (self.sink_chunks + self.window_chunks) * self.chunk_tokens

    # Video geometry after the VAE.
    @property
    def height_px(self) -> int:
        return self.stream.latent_height * VAE_SPATIAL

    @property
    def width_px(self) -> int:
        return self.stream.latent_width * VAE_SPATIAL

    def video_frames(self, chunk_index: int) -> int:
        """Frames chunk ``chunk_index`` decodes to: 9 then 12 for 3 latent frames (the first latent frame gives 1)."""
        per_chunk = self.stream.frames_per_chunk * VAE_TEMPORAL
        return per_chunk - (VAE_TEMPORAL - 1) if chunk_index == 0 else per_chunk

    def first_video_frame(self, chunk_index: int) -> int:
        """Index in the stream of chunk ``chunk_index``'s first video frame."""
        return 0 if chunk_index == 0 else chunk_index * self.stream.frames_per_chunk * VAE_TEMPORAL - (VAE_TEMPORAL - 1)

    def kv_bytes(self, element_bytes: int) -> int:
        """A window-full session's self-attention KV plus its prompt's cross-attention KV."""
        rows = self.cache_capacity_tokens + self.dit.text_len
        return self.dit.num_layers * 2 * rows * self.dit.dim * element_bytes


def _build(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidModelConfig(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


_SECTIONS = {"dit": DiTConfig, "text_encoder": TextEncoderConfig, "vae": VaeConfig, "stream": StreamConfig,
             "checkpoint": CheckpointConfig}


def parse_config(data: dict[str, Any], where: str) -> ModelConfig:
    """A ``ModelConfig`` from a config file's JSON object; raises ``InvalidModelConfig`` naming the bad field."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise InvalidModelConfig(f"{where}: a model config is a JSON object with a string 'name'")
    top = dict(data)
    serving = top.pop("serving", {})
    parts = {key: _build(cls, top.pop(key, {}), f"{where}: {key}") for key, cls in _SECTIONS.items()}
    try:
        return _build(ModelConfig, {**top, **serving, **parts}, where)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise InvalidModelConfig(f"{where}: {exc}") from None


CONFIG_DIR = Path(__file__).with_name("configs")


def config_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def get_config(name: str) -> ModelConfig:
    """The config file ``configs/<name>.json``; raises ``UnknownModelConfig`` listing the known names."""
    if name not in config_names():
        raise UnknownModelConfig(f"unknown model config {name!r}; known: {config_names()}")
    path = CONFIG_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidModelConfig(f"{path}: not valid JSON ({exc})") from None
    return parse_config(data, str(path))
