"""The gateway's typed settings, read once from the environment; every field has bounds and a line of doc."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from services.common.client_messages import MAX_CLIENT_MESSAGE_BYTES
from services.common.config import ConfigError, env_choice, env_float, env_int, env_str
from services.common.messages import MAX_PROMPT_CHARS
from services.gateway.auth import TokenTable, parse_tokens

FRAME_SIZE_BY_MODEL: dict[str, tuple[int, int]] = {
    "tiny": (32, 32), "self-forcing": (832, 480), "causvid": (832, 480), "longlive": (832, 480),
}
"""Rendered (width, height) of the registered model configs, kept here so the gateway never imports torch."""


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How the gateway listens, whom it admits and how much it lets each client hold."""

    tokens: TokenTable
    """Accepted bearer tokens (TURBOSERVE_TOKENS: comma-separated ``secret`` or ``name=secret``)."""
    model: str = "tiny"
    """Model config every session of this deployment runs (TURBOSERVE_MODEL)."""
    host: str = "127.0.0.1"
    """Listen address (TURBOSERVE_GATEWAY_HOST)."""
    port: int = 8080
    """Listen port, 0 picks a free one (TURBOSERVE_GATEWAY_PORT, [0, 65535])."""
    max_message_bytes: int = MAX_CLIENT_MESSAGE_BYTES
    """Largest client message; bigger ones get message_too_large (TURBOSERVE_MAX_MESSAGE_BYTES, [256, 8 KiB])."""
    max_prompt_chars: int = MAX_PROMPT_CHARS
    """Longest prompt; longer ones get invalid_field (TURBOSERVE_MAX_PROMPT_CHARS, [1, MAX_PROMPT_CHARS])."""
    max_sessions_per_token: int = 4
    """Open plus lingering sessions one token may hold (TURBOSERVE_MAX_SESSIONS_PER_TOKEN, [1, 1024])."""
    credit_chunks: int = 2
    """Chunks a worker may produce ahead of delivery to the client (TURBOSERVE_CREDIT_CHUNKS, [1, 16])."""
    queue_chunks: int = 4
    """Per-session chunks waiting for the socket; overflow closes with 1013 (TURBOSERVE_QUEUE_CHUNKS, [1, 64])."""
    linger_s: float = 60.0
    """How long a dropped connection's sessions stay resumable by their token (TURBOSERVE_LINGER_S, [0, 3600]);
    the scheduler closes a dead gateway's sessions this long after their lease ran out."""
    gateway_id: str = "gateway"
    """This gateway's name in the sessions' leases; unique per gateway process (TURBOSERVE_GATEWAY_ID, default
    gateway-<host>-<pid>)."""
    lease_s: float = 6.0
    """How long a session stays this gateway's without a renewal; renewed every third of it, so a gateway that
    died is noticed after this long (TURBOSERVE_LEASE_S, [1, 300])."""
    request_timeout_s: float = 5.0
    """Deadline of one NATS request to the scheduler or a worker (TURBOSERVE_REQUEST_TIMEOUT_S, [0.05, 60])."""
    playback_fps: float = 16.0
    """Frames per second the viewer plays at; Wan2.1 models render 16 (TURBOSERVE_PLAYBACK_FPS, [1, 120])."""
    lead_chunks: int = 2
    """How many chunks of video a session may have past its client's playhead, the one on screen included
    (TURBOSERVE_LEAD_CHUNKS, [2, 16]): 2 generates the next chunk while one plays."""
    paced: bool = True
    """Generation paced to playback (TURBOSERVE_PACING=playback, the default) or only to delivery
    (TURBOSERVE_PACING=delivery: as fast as the client takes chunks, for load tests and offline renders)."""
    frame_width_px: int = 64
    """Width the model renders; a start asking for another size is refused (TURBOSERVE_FRAME_WIDTH)."""
    frame_height_px: int = 64
    """Height the model renders (TURBOSERVE_FRAME_HEIGHT); both default from the model name."""

    def __post_init__(self) -> None:
        if not (16 <= self.frame_width_px <= 8192 and 16 <= self.frame_height_px <= 8192):
            raise ConfigError(
                f"frame size {self.frame_width_px}x{self.frame_height_px} of model {self.model!r} is unknown or out of "
                "[16, 8192]: set TURBOSERVE_FRAME_WIDTH and TURBOSERVE_FRAME_HEIGHT"
            )
        if not self.tokens:
            raise ConfigError("TURBOSERVE_TOKENS is empty: the gateway would admit nobody")
        if self.queue_chunks < self.credit_chunks:
            raise ConfigError(
                f"TURBOSERVE_QUEUE_CHUNKS={self.queue_chunks} must be >= TURBOSERVE_CREDIT_CHUNKS={self.credit_chunks}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"TURBOSERVE_GATEWAY_PORT={self.port} is out of bounds [0, 65535]")
        if not 1 <= self.max_prompt_chars <= MAX_PROMPT_CHARS:
            raise ConfigError(f"TURBOSERVE_MAX_PROMPT_CHARS={self.max_prompt_chars} is out of [1, {MAX_PROMPT_CHARS}]")
        if not 256 <= self.max_message_bytes <= MAX_CLIENT_MESSAGE_BYTES:
            raise ConfigError(
                f"TURBOSERVE_MAX_MESSAGE_BYTES={self.max_message_bytes} is out of [256, {MAX_CLIENT_MESSAGE_BYTES}]"
            )

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """Parse every TURBOSERVE_* gateway variable; raises ConfigError naming the bad variable and value."""
        raw_tokens = env_str("TURBOSERVE_TOKENS", "")
        if not raw_tokens.strip():
            raise ConfigError("TURBOSERVE_TOKENS is not set: give at least one token (`turboserve up` prints one)")
        model = env_str("TURBOSERVE_MODEL", "tiny")
        default_width_px, default_height_px = FRAME_SIZE_BY_MODEL.get(model, (0, 0))
        return cls(
            tokens=parse_tokens(raw_tokens),
            model=model,
            frame_width_px=env_int("TURBOSERVE_FRAME_WIDTH", default_width_px, low=16, high=8192),
            frame_height_px=env_int("TURBOSERVE_FRAME_HEIGHT", default_height_px, low=16, high=8192),
            host=env_str("TURBOSERVE_GATEWAY_HOST", "127.0.0.1"),
            port=env_int("TURBOSERVE_GATEWAY_PORT", 8080, low=0, high=65535),
            max_message_bytes=env_int(
                "TURBOSERVE_MAX_MESSAGE_BYTES", MAX_CLIENT_MESSAGE_BYTES, low=256, high=MAX_CLIENT_MESSAGE_BYTES
            ),
            max_prompt_chars=env_int("TURBOSERVE_MAX_PROMPT_CHARS", MAX_PROMPT_CHARS, low=1, high=MAX_PROMPT_CHARS),
            max_sessions_per_token=env_int("TURBOSERVE_MAX_SESSIONS_PER_TOKEN", 4, low=1, high=1024),
            credit_chunks=env_int("TURBOSERVE_CREDIT_CHUNKS", 2, low=1, high=16),
            queue_chunks=env_int("TURBOSERVE_QUEUE_CHUNKS", 4, low=1, high=64),
            linger_s=env_float("TURBOSERVE_LINGER_S", 60.0, low=0.0, high=3600.0),
            gateway_id=env_str("TURBOSERVE_GATEWAY_ID", f"gateway-{socket.gethostname()}-{os.getpid()}"),
            lease_s=env_float("TURBOSERVE_LEASE_S", 6.0, low=1.0, high=300.0),
            request_timeout_s=env_float("TURBOSERVE_REQUEST_TIMEOUT_S", 5.0, low=0.05, high=60.0),
            playback_fps=env_float("TURBOSERVE_PLAYBACK_FPS", 16.0, low=1.0, high=120.0),
            lead_chunks=env_int("TURBOSERVE_LEAD_CHUNKS", 2, low=2, high=16),
            paced=env_choice("TURBOSERVE_PACING", "playback", ("playback", "delivery")) == "playback",
        )
