"""Frame encoding for browsers: one JPEG per frame, by libjpeg-turbo through simplejpeg.

simplejpeg encodes straight from the frame's memory and lets go of the GIL for the whole compression, so the
event loop keeps sending the chunks already encoded while the next session's frames compress. Measured in the
running system at 8 sessions: a batch's frames encode in half the time Pillow took (2.4 vs 4.7 ms), most of
Pillow's being per-frame Python work under the GIL.
"""

from __future__ import annotations

import simplejpeg
import torch


class JpegEncoder:
    def __init__(self, quality: int) -> None:
        self._quality = quality

    def encode_frames(self, frames: torch.Tensor) -> list[bytes]:
        """[T, H, W, 3] uint8 on the CPU -> T JPEG images."""
        pixels = frames.contiguous().numpy()
        return [simplejpeg.encode_jpeg(frame, quality=self._quality, colorspace="RGB") for frame in pixels]
