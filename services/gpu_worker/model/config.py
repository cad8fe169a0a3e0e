"""Model configurations by name: the same code runs the CPU-sized ``tiny`` and the Wan2.1-1.3B-sized model."""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_worker.model.errors import InvalidModelConfig, UnknownModelConfig

PATCH_HW = 2
"""Latent patch is 1 frame x 2 rows x 2 cols, as in Wan2.1."""

SPATIAL_UPSAMPLE = 8
"""The decoder turns one latent pixel into 8 x 8 RGB pixels (three x2 stages), as Wan's VAE does."""

VIDEO_FRAMES_PER_LATENT = 4
"""Each latent frame decodes to 4 video frames, like Wan's temporal 4x compression."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Every dimension of the streaming DiT, its cache window and its sampler; derived sizes are properties."""

    name: str
    layers: int
    dim: int
    heads: int
    ffn_dim: int
    latent_channels: int
    latent_height: int
    latent_width: int
    frames_per_chunk: int
    sink_chunks: int
    """Chunks at the start of the stream whose K/V stay in the cache forever (attention sink)."""
    window_chunks: int
    """Most recent chunks kept in the ring after the sink."""
    text_vocab: int
    text_len: int
    text_dim: int
    text_layers: int
    text_heads: int
    decoder_channels: tuple[int, int, int]
    """Conv widths at latent resolution, then after the first and second x2 upsampling stages."""
    default_max_sessions: int
    batch_tolerance: float
    """Max abs difference of uint8 frame values a session may show between running alone and batched."""
    denoise_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    timestep_shift: float = 5.0
    prior_residual_scale: float = 0.35
    """How much the DiT's prediction moves the clean latent away from the analytic colour-field prior."""
    weight_seed: int = 20_260_611

    def __post_init__(self) -> None:
        positive = {
            "layers": self.layers, "dim": self.dim, "heads": self.heads, "ffn_dim": self.ffn_dim,
            "latent_channels": self.latent_channels, "frames_per_chunk": self.frames_per_chunk,
            "window_chunks": self.window_chunks, "text_vocab": self.text_vocab, "text_len": self.text_len,
            "text_dim": self.text_dim, "text_layers": self.text_layers, "text_heads": self.text_heads,
            "default_max_sessions": self.default_max_sessions,
        }
        for field_name, value in positive.items():
            if value < 1:
                raise InvalidModelConfig(f"{self.name}: {field_name}={value} must be >= 1")
        if self.sink_chunks < 0:
            raise InvalidModelConfig(f"{self.name}: sink_chunks={self.sink_chunks} must be >= 0")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise InvalidModelConfig(f"{self.name}: dim={self.dim} / heads={self.heads} must give an even head dim")
        if self.head_dim < 6:
            raise InvalidModelConfig(f"{self.name}: head_dim={self.head_dim} too small to split over 3 RoPE axes")
        if self.text_dim % self.text_heads:
            raise InvalidModelConfig(f"{self.name}: text_dim={self.text_dim} not divisible by {self.text_heads}")
        if self.latent_height % PATCH_HW or self.latent_width % PATCH_HW:
            raise InvalidModelConfig(
                f"{self.name}: latent {self.latent_height}x{self.latent_width} not divisible by patch {PATCH_HW}"
            )
        if not self.denoise_timesteps or any(not 0 < t <= 1000 for t in self.denoise_timesteps):
            raise InvalidModelConfig(f"{self.name}: denoise_timesteps={self.denoise_timesteps} must be in (0, 1000]")
        if self.batch_tolerance < 0:
            raise InvalidModelConfig(f"{self.name}: batch_tolerance={self.batch_tolerance} must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * PATCH_HW * PATCH_HW

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // PATCH_HW) * (self.latent_width // PATCH_HW)

    @property
    def chunk_tokens(self) -> int:
        return self.frames_per_chunk * self.tokens_per_frame

    @property
    def sink_tokens(self) -> int:
        return self.sink_chunks * self.chunk_tokens

    @property
    def cache_capacity_tokens(self) -> int:
        return (self.sink_chunks + self.window_chunks) * self.chunk_tokens

    def state_bytes(self, element_bytes: int) -> int:
        """Bytes of one session's full exported state at ``element_bytes`` per value (2 for bf16): the window-full
        self-attention KV plus the prompt's cross-attention KV; the small tensors are negligible."""
        rows = self.cache_capacity_tokens + self.text_len
        return self.layers * 2 * rows * self.dim * element_bytes

    @property
    def video_frames_per_chunk(self) -> int:
        return self.frames_per_chunk * VIDEO_FRAMES_PER_LATENT

    @property
    def height_px(self) -> int:
        return self.latent_height * SPATIAL_UPSAMPLE

    @property
    def width_px(self) -> int:
        return self.latent_width * SPATIAL_UPSAMPLE


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", layers=4, dim=128, heads=4, ffn_dim=512, latent_channels=16, latent_height=8, latent_width=8,
        frames_per_chunk=3, sink_chunks=1, window_chunks=2, text_vocab=4096, text_len=32, text_dim=128,
        text_layers=2, text_heads=4, decoder_channels=(32, 16, 8), default_max_sessions=32,
        batch_tolerance=1.0,
    ),
    # Wan2.1-1.3B DiT at 832x480: 104x60 latent, 1,560 tokens per latent frame; sink 1 + window 3 chunks = 12 frames.
    # The text encoder is a small stand-in for umT5-XXL (same 512-token context the cross-attention caches).
    "wan-1.3b": ModelConfig(
        name="wan-1.3b", layers=30, dim=1536, heads=12, ffn_dim=8960, latent_channels=16, latent_height=60,
        latent_width=104, frames_per_chunk=3, sink_chunks=1, window_chunks=3, text_vocab=32768, text_len=512,
        text_dim=1024, text_layers=2, text_heads=16, decoder_channels=(128, 64, 32), default_max_sessions=4,
        batch_tolerance=4.0,
    ),
}


def get_config(name: str) -> ModelConfig:
    """The registered config called ``name``; raises ``UnknownModelConfig`` listing the known names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise UnknownModelConfig(f"unknown model config {name!r}; known: {sorted(CONFIGS)}") from None
