"""Rendered test images shared by the test modules: glyphs, photos of them, image bytes.

Everything is drawn with OpenCV in the test, so the real decoding and preprocessing run
on known content without the network or any real photo.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

BIG = 240  # side of the high-resolution glyph canvas


def big_glyph(digit: int, angle: float = 0.0) -> np.ndarray:
    """(240, 240) float32 ink coverage in 0..1 of a printed digit, centred, rotated by angle."""
    canvas = np.zeros((BIG, BIG), np.uint8)
    font, scale, thick = cv2.FONT_HERSHEY_DUPLEX, 6.0, 16
    (w, h), _ = cv2.getTextSize(str(digit), font, scale, thick)
    org = ((BIG - w) // 2, (BIG + h) // 2)
    cv2.putText(canvas, str(digit), org, font, scale, 255, thick, cv2.LINE_AA)
    if angle:
        m = cv2.getRotationMatrix2D((BIG / 2, BIG / 2), angle, 1.0)
        canvas = cv2.warpAffine(canvas, m, (BIG, BIG))
    return canvas.astype(np.float32) / 255


def mnist_reference(ink: np.ndarray) -> np.ndarray:
    """MNIST's recipe on a clean ink image: crop, longer side to 20, centre of mass at 14."""
    rows, cols = np.flatnonzero(ink.max(1) > 0.5), np.flatnonzero(ink.max(0) > 0.5)
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    s = 20 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    ys, xs = np.mgrid[: small.shape[0], : small.shape[1]]
    cy, cx = (small * ys).sum() / small.sum(), (small * xs).sum() / small.sum()
    out = np.zeros((28, 28), np.float32)
    oy, ox = round(14 - cy), round(14 - cx)
    out[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def photo(
    ink: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int] = (480, 640),
    height_frac: float = 0.4,
    lines: bool = False,
    noise: float = 6.0,
) -> np.ndarray:
    """The glyph as dark ink on light paper: off-centre, scaled, shaded, noisy (ruled)."""
    h, w = size
    cover = np.zeros((h, w), np.float32)
    if ink.max() > 0:
        rows, cols = np.flatnonzero(ink.max(1) > 0.05), np.flatnonzero(ink.max(0) > 0.05)
        ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        k = height_frac * h / ink.shape[0]
        ink = cv2.resize(ink, (max(1, round(ink.shape[1] * k)), max(1, round(ink.shape[0] * k))))
        ih, iw = ink.shape
        y0 = int(rng.integers(h // 20, h - ih - h // 20))
        x0 = int(rng.integers(w // 20, w - iw - w // 20))
        cover[y0 : y0 + ih, x0 : x0 + iw] = np.clip(ink, 0, 1)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    paper = 215 + 20 * (xx / w - 0.5) - 15 * (yy / h - 0.5)  # uneven lighting
    if lines:
        for y in range(int(rng.integers(15, 30)), h, 32):  # ruled paper, pencil-grey lines
            cv2.line(paper, (0, y), (w - 1, y), 130.0, 2)
    img = paper * (1 - cover) + 35 * cover + rng.normal(0, noise, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


REFERENCES = {d: mnist_reference(big_glyph(d)) for d in range(10)}


def png_bytes(img: np.ndarray) -> bytes:
    """PNG bytes of an image (grey, BGR or BGRA; 8 or 16 bit)."""
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def hdr_bytes(width: int, height: int, pixels: bool = True) -> bytes:
    """A valid Radiance HDR of flat 0.5 grey, run-length encoded: ~4 MB for 8000x8000.

    Decoded (float32 BGR) it is 12 bytes a pixel: 768 MB for 8000x8000.
    """
    header = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode()
    if not pixels:
        return header
    runs = bytearray()
    for value in (128, 128, 128, 128):  # R, G, B mantissas and the exponent: 0.5
        left = width
        while left:
            n = min(127, left)
            runs += bytes((128 + n, value))  # a run of n times value
            left -= n
    scanline = bytes((2, 2, width >> 8, width & 0xFF)) + runs  # new-style RLE scanline
    return header + scanline * height


def png_header_only(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG signature + IHDR claiming ``width`` x ``height``, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk


def thin_glyph(digit: int, thickness: int = 4) -> np.ndarray:
    """Ink coverage in 0..1 of a digit written with a thin pen, cropped to its ink."""
    canvas = np.zeros((BIG, BIG), np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 5.0
    (w, h), _ = cv2.getTextSize(str(digit), font, scale, thickness)
    cv2.putText(canvas, str(digit), ((BIG - w) // 2, (BIG + h) // 2), font, scale, 255,
                thickness, cv2.LINE_AA)  # fmt: skip
    rows, cols = np.flatnonzero(canvas.max(1) > 12), np.flatnonzero(canvas.max(0) > 12)
    return canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255


def notebook_photo(
    glyph: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int] = (1562, 2048),
    digit_height: int = 200,
    spacing: float = 1 / 3,
    line_grey: float = 170.0,
    ink: tuple[int, int, int] = (150, 70, 30),
) -> np.ndarray:
    """A phone photo (BGR) of a thin-pen digit on ruled notebook paper (issue 16, item 1).

    Grey ruled lines ``spacing`` of the digit's height apart run across the whole page,
    fainter than the ink (blue ballpoint by default), slightly tilted; uneven light.
    """
    h, w = size
    k = digit_height / glyph.shape[0]
    g = cv2.resize(glyph, (round(glyph.shape[1] * k), digit_height), interpolation=cv2.INTER_AREA)
    cover = np.zeros((h, w), np.float32)
    y0, x0 = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
    cover[y0 : y0 + g.shape[0], x0 : x0 + g.shape[1]] = g
    lines = np.zeros((h, w), np.float32)
    step = max(2, round(digit_height * spacing))
    for y in range(int(rng.integers(0, step)), h, step):
        cv2.line(lines, (0, y), (w - 1, y + int(rng.integers(-8, 9))), 1.0, 3, cv2.LINE_AA)
    xx = np.arange(w, dtype=np.float32)[None, :, None]
    paper = np.full((h, w, 3), (225, 228, 230), np.float32) * (1 - 0.12 * xx / w)
    paper = paper * (1 - lines[..., None]) + line_grey * lines[..., None]
    img = paper * (1 - cover[..., None]) + np.float32(ink) * cover[..., None]
    img += rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
