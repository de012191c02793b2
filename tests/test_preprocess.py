"""Preprocessing: photos of digits must come out as the MNIST-style 28x28 of the same digit.

The reference for each digit is made here, independently of tasks.preprocess:
a large printed glyph, cropped to its ink, longer side area-resized to 20 px and
pasted with its centre of mass at (14, 14) (MNIST's recipe). The photos are the
same glyph as dark ink on shaded, noisy paper, off-centre, scaled, slightly
rotated, with ruled lines; preprocessing must give back the reference.
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.preprocess import (
    MNIST_BOX,
    ImageError,
    is_near_mnist,
    load_gray,
    naive_28,
    prepare_file,
    read_header,
    to_mnist,
)

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


def iou(a: np.ndarray, b: np.ndarray, level: int = 100) -> float:
    """Intersection over union of the ink (>= level) of two 28x28 images."""
    ma, mb = a >= level, b >= level
    return float((ma & mb).sum() / max((ma | mb).sum(), 1))


def ink_box_side(img: np.ndarray, level: int = 1) -> int:
    rows, cols = np.flatnonzero(img.max(1) >= level), np.flatnonzero(img.max(0) >= level)
    return max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)


def center_of_mass(img: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[:28, :28]
    w = img.astype(np.float64)
    return (w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()


REFERENCES = {d: mnist_reference(big_glyph(d)) for d in range(10)}


@functools.lru_cache(maxsize=8)
def references(angle: float) -> tuple[np.ndarray, ...]:
    """The ten digits' MNIST-style references, rotated by ``angle``."""
    return tuple(mnist_reference(big_glyph(d, angle)) for d in range(10))


def nearest_digit(img: np.ndarray, angle: float = 0.0) -> int:
    """Template match against the ten references (a stand-in for a trained network)."""
    v = img.astype(np.float64).ravel()
    v = (v - v.mean()) / (v.std() + 1e-9)
    scores = []
    for ref in references(angle):
        r = ref.astype(np.float64).ravel()
        scores.append(float(v @ ((r - r.mean()) / r.std())))
    return int(np.argmax(scores))


# --------------------------------------------------------------------------- recovery


VARIANTS = {  # (angle in degrees, photo options)
    "off-centre small": (0.0, {"height_frac": 0.25}),
    "large": (0.0, {"height_frac": 0.75}),
    "rotated": (7.0, {"height_frac": 0.4}),
    "ruled lines": (0.0, {"height_frac": 0.35, "lines": True}),
    "ruled + rotated + noisy": (-5.0, {"height_frac": 0.5, "lines": True, "noise": 12.0}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_photo_like_digits_are_recovered(variant: str) -> None:
    rng = np.random.default_rng(sorted(VARIANTS).index(variant))
    angle, options = VARIANTS[variant]
    for digit in range(10):
        glyph = big_glyph(digit, angle)
        out = to_mnist(photo(glyph, rng, **options))
        assert out is not None, f"{digit}: no ink found"
        assert out.shape == (28, 28) and out.dtype == np.uint8
        # the digit as the photo shows it (rotated too), MNIST-normalized
        assert iou(out, mnist_reference(glyph)) > 0.7, f"{digit} ({variant})"
        read = nearest_digit(out, angle)
        assert read == digit, f"{digit} read as {read} ({variant})"
        assert MNIST_BOX - 1 <= ink_box_side(out, level=32) <= MNIST_BOX + 1
        cy, cx = center_of_mass(out)
        assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0


def test_naive_resize_loses_the_digit() -> None:
    """What the seed did (whole photo to 28x28): the digit is a faint smudge; ours is not."""
    rng = np.random.default_rng(0)
    img = photo(big_glyph(3), rng, height_frac=0.3)
    naive = 255 - naive_28(img)  # even inverted, the digit is a few pixels in a corner
    assert iou(naive, REFERENCES[3]) < 0.2
    assert iou(to_mnist(img), REFERENCES[3]) > 0.65


def test_mnist_like_input_passes_unchanged() -> None:
    ref = REFERENCES[5]
    assert is_near_mnist(ref)
    assert np.array_equal(to_mnist(ref), ref)
    # the same digit as dark-on-light 28x28: only the polarity changes
    assert np.array_equal(to_mnist(255 - ref), ref)


def test_small_mnist_sized_digit_is_renormalized() -> None:
    """A 28x28 image whose digit is small and off-centre is not MNIST-like: it is fitted."""
    small = cv2.resize(REFERENCES[2], (14, 14), interpolation=cv2.INTER_AREA)
    img = np.zeros((28, 28), np.uint8)
    img[1:15, 1:15] = small
    assert not is_near_mnist(img)
    out = to_mnist(img)
    assert ink_box_side(out, level=32) >= MNIST_BOX - 1
    assert nearest_digit(out) == 2


@pytest.mark.parametrize(
    "blank",
    ["white", "black", "grey", "noisy paper", "ruled paper", "tiny speck"],
)
def test_blank_images_have_no_ink(blank: str) -> None:
    rng = np.random.default_rng(1)
    h, w = 240, 320
    img = {
        "white": np.full((h, w), 255, np.uint8),
        "black": np.zeros((h, w), np.uint8),
        "grey": np.full((h, w), 128, np.uint8),
        "noisy paper": np.clip(rng.normal(200, 8, (h, w)), 0, 255).astype(np.uint8),
    }.get(blank)
    if blank == "ruled paper":
        img = photo(np.zeros((BIG, BIG), np.float32), rng, (h, w), lines=True)
    elif blank == "tiny speck":
        img = np.full((h, w), 230, np.uint8)
        img[100:102, 100:102] = 20  # dust, not a digit
    assert to_mnist(img) is None


# --------------------------------------------------------------------------- decoding


def _png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    """Transparent pixels are paper even when their colour bytes are black."""
    ink = big_glyph(4)
    rgba = np.zeros((BIG, BIG, 4), np.uint8)  # BGR all black everywhere
    rgba[..., 3] = (ink * 255).astype(np.uint8)  # only the digit is opaque
    path = tmp_path / "alpha.png"
    path.write_bytes(_png_bytes(rgba))
    gray = load_gray(path)
    assert gray[0, 0] == 255 and gray.min() < 10  # paper white, digit black
    assert nearest_digit(to_mnist(gray)) == 4


def test_16_bit_images_read_like_8_bit(tmp_path: Path) -> None:
    img8 = photo(big_glyph(6), np.random.default_rng(2), (240, 320))
    path = tmp_path / "deep.png"
    path.write_bytes(_png_bytes(img8.astype(np.uint16) * 257))
    gray = load_gray(path)
    assert gray.dtype == np.uint8
    assert np.abs(gray.astype(int) - img8).max() <= 1
    assert nearest_digit(to_mnist(gray)) == 6


HEADER_CASES = {  # extension: (image to encode, expected channels, bytes per sample)
    ".png": (np.full((37, 53), 200, np.uint8), 1, 1),
    ".jpg": (np.full((37, 53), 200, np.uint8), 1, 1),  # JPEGs are decoded as grayscale
    ".bmp": (np.full((37, 53, 3), 200, np.uint8), 3, 1),
    ".tiff": (np.full((37, 53), 200, np.uint16), 1, 2),
    ".webp": (np.full((37, 53, 3), 200, np.uint8), 4, 1),
    ".pgm": (np.full((37, 53), 200, np.uint8), 1, 1),
    ".ppm": (np.full((37, 53, 3), 2000, np.uint16), 3, 2),
    ".pam": (np.full((37, 53, 3), 200, np.uint8), 3, 1),
    ".pfm": (np.full((37, 53, 3), 0.5, np.float32), 3, 4),
    ".hdr": (np.full((37, 53, 3), 0.5, np.float32), 3, 4),
    ".jp2": (np.full((37, 53, 3), 200, np.uint8), 3, 1),
    ".avif": (np.full((37, 53, 3), 200, np.uint8), 4, 1),
    ".gif": (np.full((37, 53, 3), 200, np.uint8), 4, 1),
    ".ras": (np.full((37, 53, 3), 200, np.uint8), 3, 1),
}


@pytest.mark.parametrize("ext", list(HEADER_CASES))
def test_header_dimensions_without_decoding(ext: str) -> None:
    img, channels, sample_bytes = HEADER_CASES[ext]
    ok, buf = cv2.imencode(ext, img)
    assert ok
    header = read_header(buf.tobytes()[:4096])
    assert header is not None and (header.width, header.height) == (53, 37)
    assert (header.channels, header.sample_bytes) == (channels, sample_bytes)
    decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # the estimate bounds the real array
    if ext != ".jpg":
        assert decoded.nbytes <= 53 * 37 * channels * sample_bytes


def _hdr_bytes(width: int, height: int, pixels: bool = True) -> bytes:
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


def _bigtiff_bytes(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A little-endian BigTIFF: one 8-bit gray strip of ``pixels`` (may claim any size)."""
    entries = [  # (tag, type, value): ImageWidth, ImageLength, BitsPerSample, Compression,
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1),  # Photometric,
        (262, 3, 1), (273, 16, 0), (277, 3, 1), (278, 4, height),  # StripOffsets, ...
        (279, 16, len(pixels)),
    ]  # fmt: skip
    data_offset = 16 + 8 + 20 * len(entries) + 8
    out = b"II" + struct.pack("<HHHQ", 43, 8, 0, 16) + struct.pack("<Q", len(entries))
    for tag, typ, value in entries:
        out += struct.pack("<HHQQ", tag, typ, 1, data_offset if tag == 273 else value)
    return out + struct.pack("<Q", 0) + pixels


def test_hdr_and_bigtiff_helpers_are_real_images() -> None:
    """The crafted files below are what OpenCV decodes, so their sizes are real."""
    hdr = cv2.imdecode(np.frombuffer(_hdr_bytes(200, 100), np.uint8), cv2.IMREAD_UNCHANGED)
    assert hdr.shape == (100, 200, 3) and hdr.dtype == np.float32 and np.all(hdr == 0.5)
    strip = bytes(range(60))
    tiff = cv2.imdecode(np.frombuffer(_bigtiff_bytes(10, 6, strip), np.uint8), -1)
    assert tiff.shape == (6, 10) and tiff.tobytes() == strip
    header = read_header(_bigtiff_bytes(10, 6, strip))
    assert header is not None and (header.format, header.width, header.height) == ("tiff", 10, 6)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("huge.hdr", _hdr_bytes(8000, 8000, False), "too large: 8000x8000 HDR (64 MP"),
        # 16 MP: under the pixel limit, but float32 RGB and a copy: 384 MB to decode
        ("big.hdr", _hdr_bytes(4000, 4000, False), "too large: 4000x4000 HDR (16 MP, ~384 MB"),
        ("huge.tiff", _bigtiff_bytes(100_000, 100_000, bytes(64)), "100000x100000 TIFF"),
    ],
    ids=["8000x8000-hdr", "4000x4000-hdr", "100000x100000-bigtiff"],
)  # fmt: skip
def test_headers_read_for_hdr_and_bigtiff(tmp_path: Path, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    result = prepare_file(path)
    assert (result.status, result.image) == ("error", None)
    assert message in result.message, result.message


def test_decode_memory_is_bounded_by_bytes_not_pixels(tmp_path: Path) -> None:
    """25 MP is under the pixel limit; as 16-bit RGBA it is 400 MB to decode, as gray 50 MB."""
    rgba16 = tmp_path / "rgba16.png"
    rgba16.write_bytes(_png_header_only(5000, 5000, depth=16, colour=6))
    with pytest.raises(ImageError, match=r"too large: 5000x5000 PNG \(25 MP, ~400 MB"):
        load_gray(rgba16)
    gray8 = tmp_path / "gray8.png"
    gray8.write_bytes(_png_header_only(5000, 5000))
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):  # not refused by size
        load_gray(gray8)


def test_tiff_directory_after_the_pixels_is_read(tmp_path: Path) -> None:
    """libtiff writes the directory after the pixels: the whole file is searched for it."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    ok, buf = cv2.imencode(".tiff", noise)
    assert ok
    data = buf.tobytes()
    assert struct.unpack("<I", data[4:8])[0] > 65536  # the directory comes after 90 KB
    path = tmp_path / "noise.tiff"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"too large: 300x300 TIFF"):  # from the header
        load_gray(path, max_pixels=50_000)


def test_huge_progressive_jpeg_is_refused(tmp_path: Path) -> None:
    """libjpeg keeps a progressive JPEG's coefficients at full size, even when downscaling."""
    img = photo(big_glyph(4), np.random.default_rng(8), (120, 160))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    path = tmp_path / "progressive.jpg"
    path.write_bytes(buf.tobytes())
    assert prepare_file(path).status == "ok"
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc2")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 20000, 20000)  # 400 MP gray: 800 MB
    path.write_bytes(bytes(data))
    result = prepare_file(path)
    assert result.status == "error"
    assert "too large: 20000x20000 JPEG, progressive (~812 MB" in result.message


def test_opencv_limit_backs_up_unparsed_headers(tmp_path: Path) -> None:
    """OPENCV_IO_MAX_IMAGE_PIXELS is set before cv2 loads: OpenCV refuses before allocating.

    A fresh process where tasks.preprocess imports cv2 first (as in the CLI), with
    the header reader disabled (a format it cannot parse): the 8000x8000 HDR would
    take 1.5 GB to decode; OpenCV refuses it from its own header read.
    """
    path = tmp_path / "huge.hdr"
    path.write_bytes(_hdr_bytes(8000, 8000))
    code = (
        "import os, re, sys\n"
        "from pathlib import Path\n"
        "import tasks.preprocess as pp\n"
        "assert 'cv2' in sys.modules\n"
        "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])\n"
        "pp.read_header = lambda data: None\n"
        "result = pp.prepare_file(sys.argv[1])\n"
        "print(result.status, result.message)\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    limit, row, peak_kb = out.stdout.strip().splitlines()
    assert limit == "40000000"
    assert row.startswith("error image too large: over OpenCV's decoding limit"), row
    assert int(peak_kb) < 200 * 1024  # 1.5 GB if decoded


def _png_header_only(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG signature + IHDR claiming ``width`` x ``height``, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_huge_png_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20000, 20000))  # would be 400 MB decoded
    with pytest.raises(ImageError, match="too large: 20000x20000"):
        load_gray(path)


def test_big_jpeg_is_decoded_downscaled(tmp_path: Path) -> None:
    """Over the pixel limit, a JPEG is decoded at 1/2..1/8 scale instead of refused."""
    img = photo(big_glyph(7), np.random.default_rng(3), (1200, 1600), height_frac=0.5)
    path = tmp_path / "big.jpg"
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    path.write_bytes(buf.tobytes())
    gray = load_gray(path, max_pixels=200_000, max_side=4096)  # 1.9 MP: needs 1/4 scale
    assert gray.shape == (300, 400)
    assert nearest_digit(to_mnist(gray)) == 7


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("zero.png", b"", "empty file"),
        ("random.jpg", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
         "not an image"),
        ("notes.png", b"hello, not a picture\n", "not an image"),
        ("cut.png", "truncated-png", "corrupt or truncated PNG"),
        ("cut.jpg", "truncated-jpeg", "truncated JPEG"),
        ("bad-header.png", b"\x89PNG\r\n\x1a\n\x00\x00", "not an image"),
    ],
)  # fmt: skip
def test_bad_files_are_errors_with_messages(
    tmp_path: Path, name: str, content: bytes | str, message: str
) -> None:
    if content in ("truncated-png", "truncated-jpeg"):
        img = photo(big_glyph(1), np.random.default_rng(0), (120, 160))
        ok, buf = cv2.imencode(".png" if content == "truncated-png" else ".jpg", img)
        assert ok
        content = buf.tobytes()[: len(buf) // 2]
    path = tmp_path / name
    path.write_bytes(content)
    result = prepare_file(path)
    assert result.status == "error" and result.image is None
    assert message in result.message


def test_folders_missing_files_and_fifos_are_errors(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever
    assert "is a folder" in prepare_file(tmp_path / "folder.png").message
    assert prepare_file(tmp_path / "missing.png").message == "no such file"
    assert prepare_file(fifo).message == "not a regular file"


def test_unicode_file_name(tmp_path: Path) -> None:
    path = tmp_path / "цифра_数字_é.png"
    path.write_bytes(_png_bytes(255 - REFERENCES[8]))
    result = prepare_file(path)
    assert result.status == "ok" and np.array_equal(result.image, REFERENCES[8])


def test_blank_file_is_empty_not_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.png"
    path.write_bytes(_png_bytes(np.full((60, 80), 250, np.uint8)))
    result = prepare_file(path)
    assert (result.status, result.image) == ("empty", None)
    assert "no ink" in result.message


def test_no_preprocess_only_resizes(tmp_path: Path) -> None:
    img = photo(big_glyph(0), np.random.default_rng(4), (120, 160))
    path = tmp_path / "photo.png"
    path.write_bytes(_png_bytes(img))
    result = prepare_file(path, preprocess=False)
    assert result.status == "ok"
    assert np.array_equal(result.image, naive_28(img))


def test_20000_pixel_jpeg_decodes_in_bounded_memory(tmp_path: Path) -> None:
    """A real 20000x20000 JPEG (400 MP): decoded at 1/8 scale, peak RSS far below 400 MB."""
    side = 20000
    img = np.full((side, side), 235, np.uint8)
    cv2.putText(img, "7", (6000, 15000), cv2.FONT_HERSHEY_SIMPLEX, 300, 20, 1500)
    path = tmp_path / "huge.jpg"
    path.write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
    del img
    # VmHWM, not ru_maxrss: that one survives exec, so it would count this big test process
    code = (
        "import re, sys\n"
        "from pathlib import Path\n"
        "from tasks.preprocess import load_gray, to_mnist\n"
        "gray = load_gray(sys.argv[1])\n"
        "assert to_mnist(gray) is not None\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1]\n"
        "print(gray.shape[0], gray.shape[1], peak)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    h, w, peak_kb = map(int, out.stdout.split())
    assert (h, w) == (320, 320)
    assert peak_kb < 200 * 1024  # numpy + OpenCV + a 2500x2500 decode; 400 MB if decoded whole
