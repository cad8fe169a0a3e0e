"""Frame encoding for browsers: JPEG per frame, encoded on a small thread pool (libjpeg releases the GIL)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image


class JpegEncoder:
    """Encodes [T, H, W, 3] uint8 frames; one pool per worker, shut down with it."""

    def __init__(self, quality: int, threads: int = 2) -> None:
        self._quality = quality
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jpeg")

    def _encode_one(self, frame: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=self._quality)
        return buffer.getvalue()

    def encode_chunks(self, chunks: list[torch.Tensor]) -> list[list[bytes]]:
        """Encode every frame of every chunk, all frames in flight at once; order is kept."""
        arrays = [np.ascontiguousarray(chunk.numpy()) for chunk in chunks]
        flat = [frame for array in arrays for frame in array]
        encoded = list(self._pool.map(self._encode_one, flat))
        out, start = [], 0
        for array in arrays:
            out.append(encoded[start : start + len(array)])
            start += len(array)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
