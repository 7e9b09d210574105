"""A loss-curve PNG with no plotting dependency: a line chart rasterised into an RGB image and
written with zlib (PNG is a few chunks around deflated scanlines)."""

from __future__ import annotations

import os
import struct
import zlib

from ._io import atomic_write

__all__ = ["save_line_plot"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png(path: str, pixels: list[bytearray], width: int, height: int) -> None:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 per scanline
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
    with atomic_write(path) as f:
        f.write(png)


def save_line_plot(path: str | os.PathLike, ys: list[float], width: int = 640, height: int = 360) -> None:
    """Plots ys against their index (axes box, light grid at quarter heights, the curve in blue)."""
    if not ys:
        raise ValueError("nothing to plot")
    path = os.fspath(path)
    margin = 24
    white, grey, black, blue = (255, 255, 255), (225, 225, 225), (0, 0, 0), (31, 119, 180)
    pixels = [bytearray(bytes(white) * width) for _ in range(height)]

    def put(x: int, y: int, color) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x:3 * x + 3] = bytes(color)

    x0, x1, y0, y1 = margin, width - margin, margin, height - margin
    for i in range(1, 4):  # grid
        gy = y0 + (y1 - y0) * i // 4
        for x in range(x0, x1):
            put(x, gy, grey)
    for x in range(x0, x1 + 1):  # axes box
        put(x, y0, black)
        put(x, y1, black)
    for y in range(y0, y1 + 1):
        put(x0, y, black)
        put(x1, y, black)
    lo, hi = min(ys), max(ys)
    span = hi - lo or 1.0
    n = len(ys)

    def to_px(i: int, v: float) -> tuple[int, int]:
        x = x0 + round((x1 - x0) * (i / (n - 1) if n > 1 else 0.5))
        y = y1 - round((y1 - y0) * (v - lo) / span)
        return x, y

    prev = to_px(0, ys[0])
    for i in range(1, n):
        cur = to_px(i, ys[i])
        steps = max(abs(cur[0] - prev[0]), abs(cur[1] - prev[1]), 1)
        for s in range(steps + 1):  # a 2-pixel-thick segment
            x = prev[0] + (cur[0] - prev[0]) * s // steps
            y = prev[1] + (cur[1] - prev[1]) * s // steps
            put(x, y, blue)
            put(x, y + 1, blue)
        prev = cur
    if n == 1:
        put(*prev, blue)
    _write_png(path, pixels, width, height)
