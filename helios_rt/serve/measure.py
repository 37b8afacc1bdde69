"""Bytes and encode time per chunk of the frame formats the server could send.

`python -m helios_rt.serve.measure [--height 192 --width 320 --chunks 2]` generates demo chunks and
encodes each as JPEG 4:4:4 and 4:2:0 (what the server can send) and as WebM/VP9 in realtime mode
(the Media Source Extensions alternative), and prints one row per format. Decode time is measured
with FFmpeg here, a stand-in for the browser's decoder.
"""

from __future__ import annotations

import argparse
import io
import time

import av
import numpy as np

from .frames import JpegEncoder, decode_jpeg


def jpeg_row(frames: np.ndarray, chroma: str, qscale: int) -> dict:
    encoder = JpegEncoder(frames.shape[1], frames.shape[2], qscale, chroma)
    began = time.perf_counter()
    jpegs = encoder.encode(frames)
    encode = time.perf_counter() - began
    began = time.perf_counter()
    for jpeg in jpegs:
        decode_jpeg(jpeg)
    decode = time.perf_counter() - began
    return {"format": f"JPEG {chroma} q{qscale}", "bytes": sum(map(len, jpegs)), "encode_s": encode,
            "decode_ms_per_frame": 1000 * decode / len(frames)}  # fmt: skip


def vp9_row(frames: np.ndarray, fps: int) -> dict:
    """One WebM with the chunk's frames, VP9 realtime (what an MSE player would append)."""
    out = io.BytesIO()
    began = time.perf_counter()
    with av.open(out, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    encode = time.perf_counter() - began
    return {"format": "WebM VP9 crf30 realtime", "bytes": len(out.getvalue()), "encode_s": encode,
            "decode_ms_per_frame": float("nan")}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from ..demo import DEMO_HEIGHT, DEMO_PROMPT, DEMO_WIDTH
    from ..engine import Engine, EngineConfig

    parser = argparse.ArgumentParser(prog="python -m helios_rt.serve.measure", description=__doc__)
    parser.add_argument("--height", type=int, default=DEMO_HEIGHT)
    parser.add_argument("--width", type=int, default=DEMO_WIDTH)
    parser.add_argument("--chunks", type=int, default=1)
    args = parser.parse_args(argv)
    engine = Engine.from_pretrained("demo", EngineConfig(height=args.height, width=args.width))
    stream = engine.generate_stream(DEMO_PROMPT, num_frames=33 * args.chunks, seed=0)
    print(f"demo {args.width}x{args.height}, 33 frames per chunk; per chunk:")
    for chunk in stream:
        rows = [jpeg_row(chunk.frames, "444", 3), jpeg_row(chunk.frames, "420", 3), vp9_row(chunk.frames, 24)]
        for row in rows:
            print(f"  chunk {chunk.index}  {row['format']:<24} {row['bytes']:>9} B  "
                  f"({row['bytes'] / len(chunk.frames):>7.0f} B/frame)  encode {row['encode_s'] * 1000:6.1f} ms  "
                  f"decode {row['decode_ms_per_frame']:.2f} ms/frame")  # fmt: skip


if __name__ == "__main__":
    main()
