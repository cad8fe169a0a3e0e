"""`turboserve client --out clip.mp4` writes a real video: the frames that came, at the stream's rate, readable by
any player (read back here with FFmpeg's own decoder); another path gets the JPEG frames as they came."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import simplejpeg

from services.clip_writer import ClipWriter


def frames(count: int) -> list[bytes]:
    """Smooth frames that move (a gradient sliding right), as JPEG, like a chunk's."""
    y, x = np.mgrid[0:32, 0:48]
    return [simplejpeg.encode_jpeg(np.stack([(x * 5 + t * 8) % 256, y * 8, np.full_like(x, 128)], -1)
                                   .astype(np.uint8), quality=95) for t in range(count)]


def test_a_clip_holds_every_frame_at_the_stream_rate(tmp_path: Path) -> None:
    jpegs = frames(24)
    out = tmp_path / "clip.mp4"
    with ClipWriter(out, fps=16.0) as clip:
        clip.add(0, jpegs[:9])
        clip.add(9, jpegs[9:])
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert (stream.codec_context.name, stream.average_rate, stream.width, stream.height) == ("h264", 16, 48, 32)
    assert len(decoded) == 24
    for jpeg, got in zip(jpegs, decoded, strict=True):
        want = simplejpeg.decode_jpeg(jpeg, colorspace="RGB").astype(np.int16)
        assert np.abs(want - got.astype(np.int16)).mean() < 6, "the video shows other pictures than the stream"


def test_any_other_path_gets_the_jpeg_frames_as_they_came(tmp_path: Path) -> None:
    jpegs = frames(3)
    with ClipWriter(tmp_path / "frames", fps=16.0) as clip:
        clip.add(9, jpegs)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_{i:06d}.jpg" for i in (9, 10, 11)]
    assert (tmp_path / "frames" / "frame_000010.jpg").read_bytes() == jpegs[1]
