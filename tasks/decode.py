"""Decoding: an image file -> a memory-bounded uint8 array, (H, W) gray or (H, W, 3) BGR.

Decoding is memory-bounded (``load_image``, ``load_gray``): before anything is
decoded, the header gives the dimensions, channels and sample size (``read_header``);
an image whose decoding would take more than ``MAX_PIXELS`` pixels or
``MAX_DECODE_BYTES`` bytes is refused, except JPEGs, which are decoded downscaled
(libjpeg DCT scaling, cv2.IMREAD_REDUCED_*). Pillow reads the headers (its lazy
``Image.open`` parses them without decoding) of every format this OpenCV build decodes
but three, which it does not know: Radiance HDR, PAM and colour PFM are read here. A
file neither reads is left to OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, set
below), which refuses it from OpenCV's header read before allocating.

OpenCV decodes the pixels, not Pillow: a JPEG that libjpeg reports as corrupt
("Corrupt JPEG data", "Premature end of JPEG file") must be an error, not an image
with the missing part made up, and Pillow's libjpeg error handler discards those
warnings, while OpenCV leaves them on C's stderr, where ``_imdecode_jpeg`` catches
them. (OpenCV's IMREAD_REDUCED_* flags are the same DCT scaling as Pillow's ``draft``.)

Every function here is safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import math
import os
import platform
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Decoding limits, per image. A worker holds at most one decoded image at a time.
MAX_FILE_BYTES = 256 * 2**20  # a bigger file is not a digit photo; refuse before reading it
READ_STEP = 2**20  # bytes per read once a file is past the size fstat gave (it grew)
MAX_PIXELS = 40_000_000  # 40 MP (JPEGs: after DCT downscaling, so any JPEG up to 2560 MP)
# Peak bytes a decode may take: the decoded array (pixels x channels x bytes per sample)
# and the decoder's working copies (see decode_bytes). 40 MP of 8-bit RGBA fits; with the
# default 2 decode workers, 640 MB on top of the ~0.7 GB a predict run needs anyway.
MAX_DECODE_BYTES = 320_000_000

# Images are area-downscaled to this longer side as they are decoded, before
# preprocessing: a digit a tenth of a 4:3 frame's height still spans 24 px (MNIST's box
# is 20), and 640x480 costs 4x less.
WORK_MAX_SIDE = 320

# OpenCV's own decode limit is read from the environment once, when cv2 is loaded (a
# static of libopencv_imgcodecs, default 2^30 pixels), so it is set here, right before
# this module imports cv2: in the processes that decode (the CLI, the flow's chunk tasks
# on local threads or Dask workers) this module is what imports cv2 first (tasks.preprocess
# imports it before cv2). It refuses, before allocating, the images whose header
# read_header cannot read (the checks in load_image do not depend on it). setdefault: a
# limit set by the user wins. Child processes inherit it; it only limits decoding.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (after the limit above)
import numpy as np  # noqa: E402
from PIL import Image, TiffImagePlugin  # noqa: E402

# decode at 1/factor scale (libjpeg DCT scaling, only JPEG supports it natively), as
# grayscale (load_gray) or as BGR (load_image: the ink channel is chosen later)
_JPEG_FLAGS = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_JPEG_COLOUR_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


class ImageError(Exception):
    """A file that cannot be turned into an image; the message goes into the output row."""


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says about the array OpenCV would decode from it."""

    format: str  # "png", "jpeg", ...
    width: int
    height: int
    channels: int = 4  # of the decoded array (IMREAD_UNCHANGED); an upper bound when unsure
    sample_bytes: int = 1  # per decoded sample: 1 (8 bits), 2 (16 bits), 4 (float), 8
    buffer_bytes: int = 0  # held whatever the output scale: a progressive JPEG's coefficients

    @property
    def pixels(self) -> int:
        return self.width * self.height


# Decoders' peak memory as multiples of the decoded array, measured with OpenCV 5.0 on
# 2000x2000 images (VmHWM): 2 for most formats (the array and one converted copy), GIF
# 3 (RGBA frame, then converted), AVIF 5 (YUV planes and RGB conversion). JPEG 2000
# adds OpenJPEG's int32 plane per component (see decode_bytes).
DECODE_COPIES = {"gif": 3, "avif": 5}
JP2_PLANE_BYTES = 4  # OpenJPEG decodes every component into int32 samples


def decode_bytes(header: ImageHeader, scale: int = 1) -> int:
    """Estimated peak bytes OpenCV takes to decode an image (at 1/scale: JPEG only).

    pixels x channels x bytes per sample of the decoded array, times the decoder's
    copies, plus what it holds whatever the scale (JPEG 2000 planes, a progressive
    JPEG's coefficients).
    """
    pixels = math.ceil(header.width / scale) * math.ceil(header.height / scale)
    array = pixels * header.channels * header.sample_bytes
    if header.format == "jp2":
        return 2 * array + header.pixels * header.channels * JP2_PLANE_BYTES
    return DECODE_COPIES.get(header.format, 2) * array + header.buffer_bytes


# --------------------------------------------------------------------------- headers

# The Pillow formats whose headers are read, named as in our messages: the ones OpenCV
# decodes. Only these: any other plugin (EPS runs Ghostscript, TGA accepts any bytes)
# would name files OpenCV cannot decode anyway. TIFF has its own path (_tiff_header).
_PILLOW_FORMATS = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",  # a camera JPEG with a second picture (the JPEG plugin opens it)
    "BMP": "bmp",
    "GIF": "gif",
    "WEBP": "webp",
    "PPM": "pnm",
    "SUN": "sunraster",
    "JPEG2000": "jp2",
    "AVIF": "avif",
}
_PILLOW_OPEN = [name for name in _PILLOW_FORMATS if name != "MPO"]  # Image.open's formats
_BGRA_FORMATS = ("gif", "webp", "avif")  # OpenCV decodes these to 4 channels whatever the mode
_PILLOW_LOCK = threading.Lock()  # see _pillow_reading
TIFF_MAX_ENTRIES = 4096  # libtiff's sanity limit on a directory's entries
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"


def _rawmode(im: Image.Image) -> str:
    """The file's sample layout ("RGB;16B", "BGRX", ...) from the first tile, "" if not given.

    Only Pillow's "raw" (BMP, Sun raster, PNM) and "zip" (PNG) decoders start their
    arguments with it.
    """
    if not im.tile or im.tile[0].codec_name not in ("raw", "zip"):
        return ""
    args = im.tile[0].args
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


def _maxval(im: Image.Image) -> int:
    """A PNM's maximum sample value where Pillow's tile keeps it (("RGB", 65535)), else 255."""
    args = im.tile[0].args if im.tile else None
    if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int):
        return args[1]
    return 255


def _deep_colour_bits(fmt: str, data: bytes) -> int:
    """Bits per sample of a colour JPEG 2000 or AVIF, which Pillow reports as 8-bit RGB(A).

    Pillow decodes them to 8 bits and does not keep the depth; OpenCV decodes deeper
    ones to 16 bits, so the one field that holds it is read here: a JP2's ihdr box
    (BPC), a codestream's SIZ marker (Ssiz) or an AVIF's av1C box (its flags byte).
    """
    if fmt == "jp2":
        if data[:4] == b"\xff\x4f\xff\x51":  # codestream: Csiz at 40, then 3 bytes a component
            n = int.from_bytes(data[40:42], "big")
            return max(((s & 0x7F) + 1 for s in data[42 : 42 + 3 * n : 3]), default=16)
        i = data.find(b"ihdr")
        if i < 0 or i + 15 > len(data):
            return 16  # not found: the deepest
        bpc = data[i + 14]  # ihdr: height, width (4 each), components (2), BPC
        return 16 if bpc == 0xFF else (bpc & 0x7F) + 1  # 0xFF: varies per component
    i = data.find(b"av1C")
    if i < 0 or i + 7 > len(data):
        return 16
    flags = data[i + 6]  # seq_tier_0, high_bitdepth, twelve_bit, ...
    return 12 if flags & 0x20 else 10 if flags & 0x40 else 8


@contextlib.contextmanager
def _pillow_reading() -> Iterator[None]:
    """Around Pillow's header reads: its bomb check off and its warnings dropped, one at a time.

    Both are process-wide (Image.MAX_IMAGE_PIXELS, the warnings filters), hence the
    lock. The bomb check: load_image applies its own limits right after, with the size
    in the message and JPEGs allowed past MAX_PIXELS (they are decoded downscaled),
    which Pillow's check cannot do. The warnings: a garbled TIFF tag or EXIF block is
    a warning to Pillow; the fields needed here are checked, and a file they are
    missing from goes on without a header (see read_header).
    """
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit


def _pillow_header(data: bytes) -> ImageHeader | None:
    """The header as Pillow's lazy Image.open reads it (nothing decoded); None if it cannot."""
    try:
        with _pillow_reading(), Image.open(io.BytesIO(data), formats=_PILLOW_OPEN) as im:
            return _from_pillow(im, data)
    except (OSError, ValueError, EOFError, SyntaxError):  # UnidentifiedImageError is an OSError
        return None  # not a format Pillow reads, or a garbled header: see read_header


def _from_pillow(im: Image.Image, data: bytes) -> ImageHeader:
    """What OpenCV's IMREAD_UNCHANGED decode gives, from what Pillow parsed."""
    fmt = _PILLOW_FORMATS[str(im.format)]
    if fmt == "pnm" and im.mode == "F":
        fmt = "pfm"  # Pillow reads gray PFM ("Pf") with the PNM plugin
    width, height = im.size
    if fmt == "jpeg":
        # decoded as grayscale (1 component) or BGR (YCbCr, CMYK: converted to 3)
        channels = 1 if im.layers < 3 else 3
        buffer = 0
        if im.info.get("progressive"):
            # progressive: libjpeg keeps every DCT coefficient (2 bytes) of the full image
            # until the last scan, whatever the output scale. Component i has H_i x V_i
            # sampling: (H_i V_i) / (H_max V_max) of the pixels' coefficients
            sampling = [(h, v) for _, h, v, _ in im.layer]
            share = float(im.layers)  # no subsampling, when a factor is 0
            if sampling and all(h and v for h, v in sampling):
                h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
                share = sum(h * v for h, v in sampling) / (h_max * v_max)
            buffer = int(2 * width * height * share)
        return ImageHeader("jpeg", width, height, channels, 1, buffer)
    rawmode = _rawmode(im)
    raw_bands = len(rawmode.split(";")[0])  # "BGRX": a 32-bit BMP or Sun raster keeps 4
    if fmt in _BGRA_FORMATS or im.mode in ("P", "PA"):
        channels = 4  # a palette may come out as BGRA (transparency): an upper bound
    else:
        channels = min(4, max(len(im.getbands()), raw_bands))
    if ";16" in rawmode or im.mode.startswith("I;16"):
        sample = 2
    elif im.mode in ("I", "F"):
        sample = 4
    elif fmt == "pnm" and _maxval(im) > 255:
        sample = 2
    elif fmt in ("jp2", "avif") and channels > 1:
        sample = 1 if _deep_colour_bits(fmt, data) <= 8 else 2
    else:
        sample = 1
    return ImageHeader(fmt, width, height, channels, sample)


def _first(value: object, default: int) -> int:
    """A TIFF tag's first value (Pillow gives multi-valued tags as tuples)."""
    if isinstance(value, tuple):
        value = value[0] if value else default
    return int(value) if isinstance(value, int) else default


def _tiff_header(data: bytes) -> ImageHeader | None:
    """Size and samples of a TIFF's or BigTIFF's first directory, read by Pillow.

    Pillow's directory reader, not Image.open: it reads the tags of TIFFs whose pixels
    Pillow cannot decode (float RGB, for one) and OpenCV can. The directory may be
    anywhere in the file (libtiff writes it after the pixels): pass the whole file.
    """
    big = 43 in data[2:4]  # BigTIFF: 16-byte file header, 8-byte entry count
    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:16] if big else data[:8])
        # Pillow reads as many entries as the directory claims (up to the file's end:
        # 20 million in 256 MB, a minute of Python); libtiff refuses more than 4096
        count = data[ifd.next : ifd.next + (8 if big else 2)]
        if int.from_bytes(count, "little" if data[:1] == b"I" else "big") > TIFF_MAX_ENTRIES:
            return None
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        with _pillow_reading():
            ifd.load(fp)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        return None  # a directory cut short or garbled: see read_header
    if 256 not in ifd or 257 not in ifd:
        return None
    samples, bits = _first(ifd.get(277), 1), _first(ifd.get(258), 1)
    # palette (3), RGB (2), YCbCr (6) come out as colour; gray + alpha as BGRA
    channels = max(samples, 3) if _first(ifd.get(262), 1) in (2, 3, 6) else samples
    channels = 4 if channels == 2 else min(channels, 4)
    sample_bytes = min(8, max(1, math.ceil(bits / 8)))
    return ImageHeader("tiff", _first(ifd[256], 0), _first(ifd[257], 0), channels, sample_bytes)


_HDR_RESOLUTION = re.compile(rb"([-+])([XY]) +(\d+) +([-+])([XY]) +(\d+)")
_NETPBM_FIELD = re.compile(rb"^(WIDTH|HEIGHT|DEPTH|MAXVAL) +(\d+)", re.MULTILINE)
_PFM_SIZE = re.compile(rb"P[Ff]\s+(\d+)\s+(\d+)\s")


def _fallback_header(data: bytes) -> ImageHeader | None:
    """The headers Pillow does not read: OpenCV-only formats and a PNG cut after its IHDR.

    Radiance HDR (a text header, then the resolution line "-Y 480 +X 640"), PAM
    ("P7", then "WIDTH 640" ... lines) and PFM ("PF"/"Pf", width, height): Pillow has
    no plugin for them (gray PFM aside). A PNG needs Pillow to find the chunks after
    IHDR; one that ends there (how a decompression-bomb probe looks) still has its
    size at a fixed place, and is refused from it.
    """
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 26:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        depth, colour = data[24], data[25]
        # gray 1, RGB 3; palette, gray+alpha and RGBA may all come out as BGRA
        return ImageHeader("png", w, h, {0: 1, 2: 3}.get(colour, 4), 2 if depth == 16 else 1)
    if data[:2] == b"#?":  # "#?RADIANCE" or "#?RGBE": lines, a blank line, the resolution
        end = data.find(b"\n\n", 0, 1 << 16)
        m = _HDR_RESOLUTION.match(data, end + 2) if end >= 0 else None
        if m is None or m[2] == m[5]:
            return None
        first, second = int(m[3]), int(m[6])
        width, height = (second, first) if m[2] == b"Y" else (first, second)
        return ImageHeader("hdr", width, height, 3, 4)  # decoded as float32 BGR
    if data[:2] == b"P7":
        end = data.find(b"ENDHDR", 0, 1024)
        head = data[: end if end >= 0 else 1024]
        fields = {k: int(v) for k, v in _NETPBM_FIELD.findall(head)}
        if b"WIDTH" not in fields or b"HEIGHT" not in fields:
            return None
        channels = min(4, max(1, fields.get(b"DEPTH", 4)))
        sample = 2 if fields.get(b"MAXVAL", 65535) > 255 else 1
        return ImageHeader("pam", fields[b"WIDTH"], fields[b"HEIGHT"], channels, sample)
    m = _PFM_SIZE.match(data[:1024])
    if m is not None:  # float32 RGB (PF) or gray (Pf)
        return ImageHeader("pfm", int(m[1]), int(m[2]), 3 if data[1:2] == b"F" else 1, 4)
    return None


def read_header(data: bytes) -> ImageHeader | None:
    """Format, size, channels and sample size from a file's bytes, without decoding it.

    Pass the whole file: a TIFF's directory may come after its pixels. Covers PNG,
    JPEG, BMP, GIF, WebP, TIFF, BigTIFF, PNM, PAM, PFM, Sun raster, Radiance HDR,
    JPEG 2000 and AVIF; None for anything else (or a header cut short).
    """
    if data[:4] in _TIFF_MAGIC:
        return _tiff_header(data)
    return _pillow_header(data) or _fallback_header(data)


# --------------------------------------------------------------------------- decoding


def _jpeg_complete(data: bytes) -> bool:
    """A JPEG ends with an EOI marker after its scan data (0xFF is byte-stuffed inside it)."""
    sos = data.find(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos) >= 0


# A progressive JPEG's decoder passes over every coefficient once a scan: the usual
# scripts have 10 (colour) or 6 (gray), optimizers (jpegtran, mozjpeg) a few dozen; 5,000
# scans in a 1.5 MB file cost minutes. Counted from the markers before decoding.
MAX_JPEG_SCANS = 100
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length field


def _jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) a JPEG has; an upper bound where its header is odd.

    The header's segments are skipped by their lengths (an EXIF thumbnail holds a JPEG
    of its own); from the first scan on, 0xFF is byte-stuffed in entropy-coded data, so
    every 0xFFDA left is a scan's start.
    """
    pos = len(JPEG_SIGNATURE)
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:
            return 1 + data.count(b"\xff\xda", pos + 2)
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return data.count(b"\xff\xda")


PNG_MAX_CHUNK = 2**31 - 1  # the PNG spec's limit on a chunk's length field
PNG_INFLATE_STEP = 2**20  # bytes inflated at a time while checking a PNG's image data
# samples per pixel of each PNG colour type: gray, RGB, palette, gray + alpha, RGBA
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes: (x0, y0, dx, dy)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip


def png_raw_bytes(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes a PNG's image data inflates to: rows of filter byte + packed samples, per pass."""
    bits = _PNG_SAMPLES.get(colour, 4) * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            total += h * (1 + -(-w * bits // 8))
    return total


def _png_problem(data: bytes) -> str | None:
    """What makes a PNG cost more than its header says, before libpng sees it; None if nothing.

    A chunk whose length runs past the end of the file (OpenCV allocates what the field
    says, up to 2 GiB, before it finds the data missing), or image data (IDAT) that
    inflates to more than the image needs (libpng inflates all of it: a 1 MB file can
    be gigabytes of work). The image data is inflated here in steps and only up to twice
    what the header needs, then dropped; a zlib error is left to the decoder to report.
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None  # no header to check against: the decoder refuses it
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    need = png_raw_bytes(width, height, data[24], data[25], data[28] == 1)
    limit = 2 * need  # libpng tolerates some extra data; twice the image bounds its cost
    view = memoryview(data)
    inflater, inflated, zlib_ok = zlib.decompressobj(), 0, True
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length  # length, type, data, CRC
        if length > PNG_MAX_CHUNK or end > len(data):
            return "corrupt or truncated PNG (a chunk runs past the end of the file)"
        if kind == b"IDAT" and zlib_ok and not inflater.eof:
            pending = view[pos + 8 : pos + 8 + length]
            try:
                while pending and inflated <= limit and not inflater.eof:
                    step = min(PNG_INFLATE_STEP, limit + 1 - inflated)
                    inflated += len(inflater.decompress(pending, step))
                    pending = inflater.unconsumed_tail
            except zlib.error:
                zlib_ok = False  # corrupt data: the decoder says so
            if inflated > limit:
                return (
                    f"PNG image data inflates past what its {width}x{height} pixels need "
                    f"(over {_mb(limit)}): a decompression bomb"
                )
        elif kind == b"IEND":
            break
        pos = end
    return None


# libjpeg's warnings for corrupt data (it decodes on, filling what is missing with grey):
# "Corrupt JPEG data: premature end of data segment", "... bad Huffman code", "... N
# extraneous bytes before marker", "Premature end of JPEG file". Other warnings (an
# unknown JFIF revision) describe files that decode correctly.
JPEG_CORRUPT_PREFIXES = ("Corrupt JPEG data", "Premature end of JPEG file")
LIBJPEG_MESSAGE_MAX = 4096  # bytes of captured C stderr read back: libjpeg's line is < 200
_C_STDERR_LOCK = threading.Lock()  # one capture at a time: C's stderr is process-wide


@dataclass(frozen=True)
class _CStderr:
    """glibc's ``stderr`` variable and a private, never-closed FILE to point it at."""

    variable: ctypes.c_void_p  # the FILE* every fprintf(stderr, ...) in the process uses
    capture: int  # FILE* of an anonymous temp file (tmpfile()), unbuffered
    fd: int  # its file descriptor, read with os.pread


@functools.cache
def _c_stderr() -> _CStderr | None:
    """The C stderr swap for ``_imdecode_jpeg``; None where it cannot be done (not glibc)."""
    if platform.libc_ver()[0] != "glibc":  # musl's stderr is a const pointer
        return None
    libc = ctypes.CDLL(None)
    try:
        variable = ctypes.c_void_p.in_dll(libc, "stderr")
    except ValueError:
        return None
    libc.tmpfile.restype = ctypes.c_void_p
    libc.fileno.argtypes = [ctypes.c_void_p]
    libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t]
    capture = libc.tmpfile()
    if not capture:
        return None
    libc.setvbuf(capture, None, 2, 0)  # _IONBF: every write lands in the file at once
    return _CStderr(variable, capture, libc.fileno(capture))


def _imdecode_jpeg(data: bytes, flags: int) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode of a JPEG, and libjpeg's corrupt-data warning ("" when none).

    Neither OpenCV nor Pillow reports libjpeg's warnings: Pillow drops them, OpenCV
    leaves them to libjpeg's default, a line on C's stderr, and returns the image with
    the missing part grey (a JPEG cut at 40% with an end marker appended gets a
    confident label). That line is the only report there is, so C's stderr is pointed
    at a temp file during the decode and read back. Only C code's stderr: Python's
    sys.stderr (progress bars, logs) writes to fd 2 and is not affected. Any other
    text caught meanwhile (another library's warning in another thread) is passed on
    to fd 2. Where the swap cannot be done, decoding is as before, without the check.
    """
    buffer = np.frombuffer(data, np.uint8)
    with _C_STDERR_LOCK:
        c = _c_stderr()  # made once, under the lock
    if c is None:
        return cv2.imdecode(buffer, flags), ""
    with _C_STDERR_LOCK:
        os.ftruncate(c.fd, 0)  # unbuffered, and written only through this FILE: offset ...
        os.lseek(c.fd, 0, os.SEEK_SET)  # ... back to 0 with it
        previous = c.variable.value
        c.variable.value = c.capture
        try:
            img = cv2.imdecode(buffer, flags)
        finally:
            c.variable.value = previous
        text = os.pread(c.fd, LIBJPEG_MESSAGE_MAX, 0).decode("utf-8", "replace")
    corrupt, others = [], []
    for line in text.splitlines(keepends=True):
        (corrupt if line.startswith(JPEG_CORRUPT_PREFIXES) else others).append(line)
    if others:
        os.write(2, "".join(others).encode())
    return img, corrupt[0].strip() if corrupt else ""


def _to_u8(img: np.ndarray, colour: bool = False) -> np.ndarray:
    """Any decoded array (H, W) / (H, W, 2|3|4), uint8/16 or float -> uint8 (H, W) or (H, W, 3).

    (H, W, 3) BGR only when ``colour`` and the image has colour channels; else
    grayscale. Alpha is composited onto white: transparent pixels are paper, not ink.
    """
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0  # EXR/HDR/PFM/float TIFF: 0..1 is black..white, brighter is clipped
    else:
        raise ImageError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        channels = 1
    elif img.ndim == 3 and img.shape[2] in (1, 2, 3, 4):
        channels = img.shape[2]
    else:
        raise ImageError(f"unsupported image layout {img.shape}")

    if channels in (1, 3) and img.dtype == np.uint8:
        if img.ndim == 2 or (colour and channels == 3):
            return img
        return img[:, :, 0] if channels == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    f = img.astype(np.float32) * (1.0 / scale)  # (H, W[, C]) in 0..1
    if channels == 1:
        out = f if f.ndim == 2 else f[:, :, 0]
    elif channels == 2:  # gray + alpha
        out = f[:, :, 0] * f[:, :, 1] + (1.0 - f[:, :, 1])
    elif channels == 3:
        out = f if colour else cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
    else:  # BGRA
        alpha = f[:, :, 3]
        bgr = np.ascontiguousarray(f[:, :, :3])
        if colour:
            out = bgr * alpha[:, :, None] + (1.0 - alpha)[:, :, None]  # (H, W, 3)
        else:
            out = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) * alpha + (1.0 - alpha)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """Area-downscale so the longer side is <= max_side (bounds all later work)."""
    h, w = img.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e6:.2g} MB"


def _mp(n: float) -> str:
    return f"{n / 1e6:.0f} MP" if n >= 1e6 else f"{n / 1e6:.2g} MP"


def _opencv_limit_message(exc: cv2.error) -> str | None:
    """The message for OpenCV's own size check (OPENCV_IO_MAX_IMAGE_*), None for others."""
    if "CV_IO_MAX_IMAGE" not in str(exc):
        return None
    limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "2^30")
    return (
        f"image too large: over OpenCV's decoding limit (OPENCV_IO_MAX_IMAGE_PIXELS={limit} "
        "pixels, sides <= 1048576); downscale it or save it as JPEG"
    )


def _folder_error(path: Path) -> ImageError:
    if not os.access(path, os.R_OK | os.X_OK):  # a folder the walk could not enter
        return ImageError("folder cannot be read (permission denied)")
    return ImageError("is a folder, not an image file")


def _too_large(size: int) -> ImageError:
    return ImageError(f"file too large ({size / 2**20:.0f} MiB > {MAX_FILE_BYTES / 2**20:.0f} MiB)")


def _read_file(path: Path, cap: int = MAX_FILE_BYTES) -> bytes:
    """A regular, non-empty file's bytes, at most ``cap``; ImageError otherwise.

    Bounded on the open file, not on a stat() before it: opened once, non-blocking (a
    FIFO put in its place cannot block the open), checked on the descriptor (a regular
    file, its size), then read up to ``cap + 1`` bytes, so a file swapped for a device
    or growing meanwhile still stops at the cap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ImageError("no such file") from exc
    except IsADirectoryError as exc:
        raise _folder_error(path) from exc
    except PermissionError as exc:
        if path.is_dir():
            raise _folder_error(path) from exc
        raise ImageError(f"cannot access: {exc.strerror}") from exc
    except OSError as exc:  # permission denied on a parent folder, name too long, ...
        raise ImageError(f"cannot access: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _folder_error(path)
        if not stat.S_ISREG(st.st_mode):  # FIFOs and devices would block or never end
            raise ImageError("not a regular file")
        if st.st_size > cap:
            raise _too_large(st.st_size)
        # bytes + imdecode rather than imread: works for any file name, one read, no seeks
        chunks, got = [], 0
        while got <= cap:
            # the size fstat gave (+1 to see the end), then steps: a small file is one
            # read of its size, not of a 256 MiB buffer
            chunk = os.read(fd, min(cap + 1 - got, max(st.st_size + 1 - got, READ_STEP)))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if got > cap:  # it grew while read
        raise _too_large(got)
    if got == 0:
        raise ImageError("empty file (0 bytes)")
    return b"".join(chunks)


JPEG_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scaling: 1/1 .. 1/8 (cv2.IMREAD_REDUCED_*)


def jpeg_scale(
    width: int, height: int, max_side: int = WORK_MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> int:
    """The DCT scale factor (1, 2, 4, 8) to decode a ``width`` x ``height`` JPEG at.

    The largest that still leaves the longer side >= ``max_side`` (the side kept for
    preprocessing: no point decoding more), or more while the image would exceed
    ``max_pixels``: decoding allocates only the reduced image, so a 20000x20000 JPEG
    costs 6 MB, not 400. libjpeg rounds a scaled side up (ceil). Decided from the
    header alone; 640x480 -> 2, 4032x3024 (a phone photo) -> 8.
    """
    factor = JPEG_SCALES[0]
    for bigger in JPEG_SCALES[1:]:
        side = -(-max(width, height) // bigger)  # libjpeg's output side: ceil
        if side < max_side and width * height / factor**2 <= max_pixels:
            break
        factor = bigger
    return factor


def _jpeg_flags(
    data: bytes, header: ImageHeader, max_side: int, max_pixels: int, max_bytes: int, colour: bool
) -> int:
    """The cv2.imread flags to decode this JPEG with (its DCT scale); ImageError if too costly."""
    size, pixels = f"{header.width}x{header.height} JPEG", header.pixels
    if not _jpeg_complete(data):
        raise ImageError("truncated JPEG (no end-of-image marker)")
    scans = _jpeg_scans(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(f"JPEG with {scans} scans (over {MAX_JPEG_SCANS}): too costly to decode")
    factor = jpeg_scale(header.width, header.height, max_side, max_pixels)
    if pixels / factor**2 > max_pixels:
        raise ImageError(
            f"image too large: {size} ({_mp(pixels)}, over {_mp(max_pixels)} even at 1/8 scale)"
        )
    if decode_bytes(header, factor) > max_bytes:  # progressive: full-size buffers
        raise ImageError(
            f"image too large: {size}, progressive (~{_mb(decode_bytes(header, factor))}"
            f" to decode > {_mb(max_bytes)} limit); save it as a baseline JPEG"
        )
    # a colour JPEG decodes to BGR only when colour is wanted (3x the memory,
    # counted by decode_bytes from the header's components)
    jpeg_colour = colour and header.channels == 3
    return (_JPEG_COLOUR_FLAGS if jpeg_colour else _JPEG_FLAGS)[factor]


def load_image(
    path: Path | str,
    max_pixels: int = MAX_PIXELS,
    max_side: int = WORK_MAX_SIDE,
    max_bytes: int = MAX_DECODE_BYTES,
    colour: bool = True,
) -> np.ndarray:
    """Decode an image file into uint8 (H, W) grayscale or (H, W, 3) BGR, H and W <= ``max_side``.

    Colour images stay BGR when ``colour`` (to_mnist picks the channel that shows
    the ink best); grayscale files, and every file when not ``colour``, come out
    (H, W). Alpha is composited onto white.

    Memory stays bounded: the header is read first; a JPEG with more than
    ``max_pixels`` is decoded at 1/2, 1/4 or 1/8 scale; any other image over
    ``max_pixels``, or whose decoding would take more than ``max_bytes``
    (``decode_bytes``, which counts a colour JPEG's 3 channels), is refused.
    Raises ImageError with a message for the output row.
    """
    data = _read_file(Path(path))
    header = read_header(data)  # the whole file: a TIFF's directory may be at its end
    flags = cv2.IMREAD_UNCHANGED  # keeps alpha (composited later) and 16 bits
    if header is not None:
        pixels = header.pixels
        size = f"{header.width}x{header.height} {header.format.upper()}"
        if pixels == 0:
            raise ImageError(f"{header.format} header says {header.width}x{header.height} pixels")
        if header.format == "jpeg":
            flags = _jpeg_flags(data, header, max_side, max_pixels, max_bytes, colour)
        elif pixels > max_pixels or decode_bytes(header) > max_bytes:
            raise ImageError(
                f"image too large: {size} ({_mp(pixels)}, ~{_mb(decode_bytes(header))} to "
                f"decode; limits {_mp(max_pixels)}, {_mb(max_bytes)}); downscale it or "
                "save it as JPEG"
            )
    if data.startswith(_PNG_SIGNATURE):
        problem = _png_problem(data)
        if problem is not None:
            raise ImageError(problem)
    corrupt = ""
    try:
        if data.startswith(JPEG_SIGNATURE):
            img, corrupt = _imdecode_jpeg(data, flags)
        else:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        message = _opencv_limit_message(exc)
        if message is not None:
            raise ImageError(message) from exc
        raise ImageError(f"cannot decode: {str(exc).strip().splitlines()[-1]}") from exc
    del data
    if corrupt:  # decoded, with the damaged part made up: no prediction from it
        raise ImageError(corrupt)
    if img is None:
        kind = f"corrupt or truncated {header.format.upper()}" if header else "not an image"
        raise ImageError(f"{kind} (OpenCV cannot decode it)")
    if img.size == 0:
        raise ImageError("image has no pixels")
    if img.shape[0] * img.shape[1] > max_pixels:  # a header this module could not read
        raise ImageError(f"image too large: {img.shape[1]}x{img.shape[0]}")
    return _to_u8(_shrink(img, max_side), colour)


def load_gray(
    path: Path | str,
    max_pixels: int = MAX_PIXELS,
    max_side: int = WORK_MAX_SIDE,
    max_bytes: int = MAX_DECODE_BYTES,
) -> np.ndarray:
    """Decode an image file into (H, W) uint8 grayscale (``load_image`` without colour)."""
    return load_image(path, max_pixels, max_side, max_bytes, colour=False)


__all__ = [
    "MAX_DECODE_BYTES",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "WORK_MAX_SIDE",
    "ImageError",
    "ImageHeader",
    "decode_bytes",
    "jpeg_scale",
    "load_gray",
    "load_image",
    "read_header",
]
