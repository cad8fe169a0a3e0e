"""Where ``turboserve client --out`` puts a stream: a real video file (``clip.mp4``, ``.mkv``, ``.webm``) or, for
any other path, a folder of the JPEG frames as they came.

The video is H.264 in an MP4 or Matroska container (VP9 in WebM) at the stream's frame rate, written with PyAV
(FFmpeg's own libraries, shipped in its wheel: nothing else to install and no ffmpeg binary to find).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import simplejpeg

VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


class ClipWriter:
    def __init__(self, out: Path, fps: float) -> None:
        self.out = out
        self.frames = 0
        self._container: Any = None
        self._stream: Any = None
        codec = VIDEO_CODECS.get(out.suffix.lower())
        if codec is None:
            out.mkdir(parents=True, exist_ok=True)
            return
        import av  # lazily: only a video needs FFmpeg's libraries loaded

        out.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(out), mode="w")
        self._stream = self._container.add_stream(codec, rate=round(fps))
        self._stream.pix_fmt = "yuv420p"

    def add(self, first_frame: int, jpeg_frames: list[bytes]) -> None:
        for index, jpeg in enumerate(jpeg_frames):
            if self._container is None:
                (self.out / f"frame_{first_frame + index:06d}.jpg").write_bytes(jpeg)
            else:
                self._encode(simplejpeg.decode_jpeg(jpeg, colorspace="RGB"))
            self.frames += 1

    def _encode(self, rgb: np.ndarray) -> None:
        import av

        if self.frames == 0:  # yuv420p wants even sides; the first frame fixes the video's size
            self._stream.width, self._stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
        rgb = np.ascontiguousarray(rgb[: self._stream.height, : self._stream.width])
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is None:
            return
        container, self._container = self._container, None
        for packet in self._stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
        container.close()

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
