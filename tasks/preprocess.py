"""The one image preprocessing: any image file -> the 28x28 input MNIST digits look like.

MNIST was made by fitting each digit's ink into a 20x20 box (aspect ratio kept,
anti-aliased) and pasting it into 28x28 so that its centre of mass sits at the
centre, white ink on black. Photos of digits are dark ink on light paper, anywhere
in the frame, at any size, with noise, shading and ruled lines; resizing the
whole photo to 28x28 (the seed's way) gives the network something it never saw.

Pipeline (``to_mnist``): the channel that shows the ink (gray, or for coloured
ink the colour channel that separates it from the paper best; alpha composited
onto white) -> polarity (ink made bright) -> denoise and flatten the background
-> Otsu threshold; ink only where it stands out from the image's own noise and
has edges (else the other polarity is tried) -> drop ruled lines (only those
running on past the digit on both ends), frame borders and specks -> the main
ink components -> crop to their box -> strokes dilated or eroded to MNIST's
width -> longer side to 20 px -> pad to 28x28 centred on the centre of mass.
28x28 inputs that already look like MNIST pass through untouched. ``Steps``
switches the newer steps off one at a time (benchmarks/real_digits.py --ablation).

Decoding is memory-bounded (``load_image``, ``load_gray``): the header gives the
dimensions, channels and sample size before anything is decoded, for every format this
OpenCV build reads (PNG, JPEG, BMP, GIF, WebP, TIFF and BigTIFF, PNM/PAM/PFM,
Sun raster, Radiance HDR, JPEG 2000, AVIF); an image whose decoding would take
more than ``MAX_PIXELS`` pixels or ``MAX_DECODE_BYTES`` bytes is refused, except
JPEGs, which are decoded downscaled (libjpeg DCT scaling, cv2.IMREAD_REDUCED_*).
OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, set below) backs this up for
files whose header cannot be read here. A JPEG that libjpeg reports as corrupt
("Corrupt JPEG data", "Premature end of JPEG file") is an error, not an image with
the missing part made up (``_imdecode_jpeg``).

Every function here is pure numpy/cv2 and safe to call from several threads.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import re
import stat
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Decoding limits, per image. A worker holds at most one decoded image at a time.
MAX_FILE_BYTES = 256 * 2**20  # a bigger file is not a digit photo; refuse before reading it
MAX_PIXELS = 40_000_000  # 40 MP (JPEGs: after DCT downscaling, so any JPEG up to 2560 MP)
# Peak bytes a decode may take: the decoded array (pixels x channels x bytes per sample)
# and the decoder's working copies (see decode_bytes). 40 MP of 8-bit RGBA fits; with the
# default 2 decode threads, 640 MB on top of the ~0.7 GB a predict run needs anyway.
MAX_DECODE_BYTES = 320_000_000

# OpenCV's own decode limit is read from the environment once, when cv2 is loaded (a
# static of libopencv_imgcodecs, default 2^30 pixels), so it is set here, right before
# this module imports cv2: in the processes that decode (the CLI, the flow's chunk tasks
# on local threads or Dask workers) this module is what imports cv2 first. It refuses,
# before allocating, the images whose header read_header cannot parse (the checks in
# load_gray do not depend on it). setdefault: a limit set by the user wins. Child
# processes inherit it; it only limits decoding.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (after the limit above)
import numpy as np  # noqa: E402

MNIST_SIZE = 28  # the network's input side
MNIST_BOX = 20  # MNIST fitted each digit's ink into a 20x20 box ...
MNIST_COM = 14.0  # ... and put its centre of mass here (measured: 13.99, 14.00 on the test set)

# Images are area-downscaled to this longer side before preprocessing: a digit a tenth
# of a 4:3 frame's height still spans 24 px (MNIST's box is 20), and 640x480 costs 4x less.
WORK_MAX_SIDE = 320

# Preprocessing thresholds, as fractions of the (working) image so they hold at any resolution.
# Is there ink at all? The stroke core (Otsu's bright class, median) must stand out from
# the paper (its dark class, mean) by NOISE_SIGMAS times the image's own noise (measured
# on the same blurred image, see _noise_sigma), so faint ballpoint on a clean scan is
# found while noise is not. A normal sample split by Otsu gives core - paper ~ 1.5 sigma:
# 5 sigma is far out of its reach, and a contrast-20 stroke on paper with sigma 3 (a
# phone photo after the blur) still passes. (The former fixed floor, 40 grey levels,
# lost faint ballpoint, blue pen on white and small low-contrast crops.)
NOISE_SIGMAS = 5.0
MIN_INK_CONTRAST = 10  # grey levels whatever the noise: 8-bit steps, JPEG ringing of a canvas
MAD_TO_SIGMA = 1.4826  # a normal's sigma per median absolute deviation (robust to the ink)
FAINT_SIGMAS = 4.0  # faint ink / lines (line search) stand this far above the noise: 1 px in 10^4
NOISE_STEP = 2  # px: the noise is measured on every 2nd pixel of every 2nd row (4x less work)
NOISE_MEDIAN = 5  # px: the noise is the residual from a median this wide (wider than thin strokes)
# With a floor this low, shading the flattening leaves (a vignette, a lamp's spot) could
# pass for ink; ink has edges: at the outline of the ink mask, the level must change by
# EDGE_SHARE of the ink's contrast within EDGE_WINDOW px (a blurred stroke edge still
# does; a smooth shade's rim over tens of px changes by a fraction of it).
EDGE_WINDOW = 7  # px
EDGE_SHARE = 0.5
EDGE_NOISE_SIGMAS = 4.0  # a 7x7 window's range of normal noise alone: ~4.5 sigma (~80% read)
MIN_CONTRAST = 40  # the former fixed floor (grey levels), kept for Steps(noise_floor=False)
FAINT_INK = MIN_CONTRAST // 2  # ... and its level of faint ink or lines (half the floor)
SPECK_FRACTION = 0.05  # components smaller than this share of the main one are specks
SPECK_MIN_AREA = 4  # ... and never count anything smaller than 2x2 px as ink
MIN_INK_SIDE = 0.03  # the digit's box must span >= 3% of the image's longer side
LINE_LENGTH = 0.5  # ruled lines / frame edges run over >= half the image width (height)
LINE_MAX_THICKNESS = 3  # cells (of 4x4 px) a line may be thick; thicker runs are strokes
LINE_MIN_IMAGE = 100  # no line search in small crops: a "7" bar could span half of them
LINE_TILTS = (-2, -1, 0, 1, 2)  # degrees: photographed ruled lines are rarely level
LINE_CELL_INK = 2  # ink pixels (of 16) that make a cell ink at the line-search scale
# line ink with stroke ink within LINE_BRIDGE px on both sides of the line is the stroke's:
# a line's zone is at most 4 cells (16 px) high
LINE_BRIDGE = 16
LINE_SCALE = 4  # line search runs on a 1/4 size mask: 16x fewer pixels, 4x shorter kernels
# A long straight run is only removed as a ruled line when it runs on past the digit (the
# ink without any such runs) on both ends by LINE_OVERHANG of the digit's extent along it
# plus LINE_OVERHANG_CELLS: a digit's own bar or stem (the bar of a 4, the base of a 2,
# the stem of a 1 or 7) ends where the rest of the digit does on at least one side,
# however long it is. The cells cover the search's coarseness: a run's ends are known
# to a cell, and removing the candidates eats up to 1.5 cells of the strokes they touch.
LINE_OVERHANG = 0.1
LINE_OVERHANG_CELLS = 3
# With nothing but such runs in the image, they are lines only as a family of >= 2
# parallel ones (ruled or squared paper); a lone one may be the stem of a "1".
LINE_FAMILY = 2
BACKGROUND_SIDE = 64  # shading is estimated on a 64 px thumbnail (it varies slowly) ...
MIN_PAPER_SHARE = 0.2  # ... from its paper pixels, when they are at least a fifth of it
BLUR_PER_PX = 1 / 400  # denoising sigma per pixel of the longer side (0.8 px at 320)
NEAR_MNIST_INK = 64  # a 28x28 input is MNIST-like when its ink (>= 64) box is ...
NEAR_MNIST_SIDES = (17, 21)  # ... 17-21 px on the longer side (20 in 99.9% of MNIST) ...
NEAR_MNIST_COM = 1.0  # ... and its centre of mass within 1 px of the centre
# ... on a black background: the median pixel of every MNIST test digit is 0, while a 28x28
# photo of grey paper, inverted, keeps its paper at 40-60 and must be flattened like any photo
NEAR_MNIST_PAPER = 16

# Stroke width. Measured on MNIST's test set (ink mask >= 128 of the digits upsampled 8x,
# 2 x distance to the paper at the stroke's ridge - 1): median 2.1 px at 28x28, 10-90%
# 1.6-3.1 px. A digit whose strokes would come out thinner (a 1 px canvas stroke in a
# 130 px drawing: 0.15 px, a faint hairline) or thicker (marker: loops filled) is
# dilated or eroded in the crop to STROKE_TARGET; widths within STROKE_RANGE are
# MNIST-like and left alone.
STROKE_TARGET = 2.2  # px at 28x28
STROKE_RANGE = (1.5, 7.0)  # px at 28x28
STROKE_THIN_SHARE = 10  # percentile of the ridge widths: the thin parts erosion must not remove

# Colour: where gray shows the ink poorly, the channel that separates ink from paper best
# replaces it. Candidates are B, G, R and the distance from the paper's (median) colour,
# scored by their contrast-to-noise ratio (the ink test's figures) on a thumbnail. Gray
# is kept whenever it shows ink at twice the margin the ink test asks: then the digit is
# the darkest thing there, and a channel with more contrast may show something else (on
# a canvas with yellow scribbles around a dark-blue digit, the blue channel shows the
# scribbles).
COLOUR_GRAY_ENOUGH = 2 * NOISE_SIGMAS  # gray's contrast-to-noise ratio that keeps gray
COLOUR_SIDE = 96  # px, longer side of the scoring thumbnail: strokes of a 320 px image survive
COLOURLESS = 12  # grey levels: a thumbnail whose channels differ by less (99th pct) is gray
COLOUR_GAIN = 1.25  # a channel replaces gray only when it scores 25% higher (no flip-flop)
COLOUR_MIN_NOISE = 1.0  # grey levels: a noiseless canvas scores by contrast alone


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


@dataclass(frozen=True)
class Prepared:
    """One input's network image, or why there is none."""

    image: np.ndarray | None  # (28, 28) uint8, white ink on black; None unless status "ok"
    status: str  # "ok" | "empty" | "error"
    message: str  # "" when ok


LINES_BEYOND, LINES_ANY, LINES_OFF = "beyond", "any", "off"  # Steps.lines


@dataclass(frozen=True)
class Steps:
    """Which preprocessing steps ``to_mnist`` runs; the default (all on) is the pipeline.

    Switching one off gives the step it replaced, for the ablation in
    benchmarks/real_digits.py: the fixed MIN_CONTRAST ink floor, the former line
    rule (``lines="any"``: every long thin run is a line) or no line removal
    (``"off"``), no stroke-width normalization, plain grayscale.
    """

    noise_floor: bool = True  # ink floor from the image's noise (False: fixed MIN_CONTRAST)
    lines: str = LINES_BEYOND  # LINES_BEYOND | LINES_ANY | LINES_OFF
    stroke_width: bool = True  # dilate / erode strokes to MNIST's width
    colour: bool = True  # pick the channel that shows the ink best (False: gray)

    def __post_init__(self) -> None:
        if self.lines not in (LINES_BEYOND, LINES_ANY, LINES_OFF):
            raise ValueError(f"Steps.lines must be one of beyond, any, off: {self.lines!r}")


ALL_STEPS = Steps()


# --------------------------------------------------------------------------- header parsing


def _jpeg_header(data: bytes) -> ImageHeader | None:
    """From the first SOFn marker: size, components, and a progressive JPEG's buffer."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0-3, 5-7, 9-11, 13-15 (C4 DHT, C8 JPG, CC DAC are not frame headers)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                return None
            height, width, ncomp = struct.unpack(">HHB", data[i + 5 : i + 10])
            buffer = 0
            if marker in (0xC2, 0xC6, 0xCA, 0xCE):
                # progressive: libjpeg keeps every DCT coefficient (2 bytes) of the full
                # image until the last scan, whatever the output scale. Component i has
                # H_i x V_i sampling: (H_i V_i) / (H_max V_max) of the pixels' coefficients
                sampling = data[i + 11 : i + 10 + 3 * ncomp : 3]  # H << 4 | V per component
                share = float(ncomp)  # no subsampling, when the factors are cut short or 0
                if len(sampling) == ncomp and all(c >> 4 and c & 15 for c in sampling):
                    h_max = max(c >> 4 for c in sampling)
                    v_max = max(c & 15 for c in sampling)
                    share = sum((c >> 4) * (c & 15) for c in sampling) / (h_max * v_max)
                buffer = int(2 * width * height * share)
            # decoded as grayscale (1 component) or BGR (YCbCr, CMYK: converted to 3)
            return ImageHeader("jpeg", width, height, 1 if ncomp < 3 else 3, 1, buffer)
        if marker == 0xDA:  # start of scan before any frame header: broken
            return None
        i += 2 + length
    return None


def _tiff_header(data: bytes) -> ImageHeader | None:
    """Size and samples of the first image directory of a TIFF or BigTIFF.

    The directory may be anywhere in the file (libtiff writes it after the pixels).
    """
    e = "<" if data[:2] == b"II" else ">"
    (magic,) = struct.unpack(e + "H", data[2:4])
    if magic == 42:  # classic: 32-bit offsets, 12-byte entries
        (ifd,) = struct.unpack(e + "I", data[4:8])
        count_fmt, entry_size, off_fmt = "H", 12, "I"
    elif magic == 43:  # BigTIFF: 64-bit offsets, 20-byte entries
        (ifd,) = struct.unpack(e + "Q", data[8:16])
        count_fmt, entry_size, off_fmt = "Q", 20, "Q"
    else:
        return None
    off_size = struct.calcsize(off_fmt)
    count_size = struct.calcsize(count_fmt)
    if ifd + count_size > len(data):
        return None
    (count,) = struct.unpack(e + count_fmt, data[ifd : ifd + count_size])
    tags: dict[int, int] = {}
    for k in range(min(count, 4096)):
        off = ifd + count_size + entry_size * k
        if off + entry_size > len(data):
            break
        tag, typ = struct.unpack(e + "HH", data[off : off + 4])
        fmt = {1: "B", 3: "H", 4: "I", 16: "Q"}.get(typ)
        if tag not in (256, 257, 258, 262, 277) or fmt is None:
            continue
        (n,) = struct.unpack(e + off_fmt, data[off + 4 : off + 4 + off_size])
        value = off + 4 + off_size
        if n * struct.calcsize(fmt) > off_size:  # stored elsewhere: the field is an offset
            (value,) = struct.unpack(e + off_fmt, data[value : value + off_size])
        if n >= 1 and value + struct.calcsize(fmt) <= len(data):  # the first value
            (tags[tag],) = struct.unpack(e + fmt, data[value : value + struct.calcsize(fmt)])
    if 256 not in tags or 257 not in tags:
        return None
    samples, bits = tags.get(277, 1), tags.get(258, 1)
    # palette (3), RGB (2), YCbCr (6) come out as colour; gray + alpha as BGRA
    channels = max(samples, 3) if tags.get(262) in (2, 3, 6) else samples
    channels = 4 if channels == 2 else min(channels, 4)
    sample_bytes = min(8, max(1, math.ceil(bits / 8)))
    return ImageHeader("tiff", tags[256], tags[257], channels, sample_bytes)


def _pnm_tokens(data: bytes, count: int) -> list[bytes]:
    """The first ``count`` header tokens of a PNM after its magic: whitespace, '#' comments."""
    tokens: list[bytes] = []
    for line in data[2:1024].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= count:
            break
    return tokens[:count]


def _pnm_header(data: bytes) -> ImageHeader | None:
    """PBM/PGM/PPM (P1-P6), PAM (P7) and PFM (PF, Pf)."""
    kind = data[1:2]
    if kind == b"7":  # PAM: "WIDTH 640" ... "ENDHDR"
        fields: dict[bytes, int] = {}
        for line in data[2:1024].splitlines():
            words = line.split(b"#", 1)[0].split()
            if words[:1] == [b"ENDHDR"]:
                break
            if len(words) == 2 and words[1].isdigit():
                fields[words[0]] = int(words[1])
        if b"WIDTH" not in fields or b"HEIGHT" not in fields:
            return None
        channels = min(4, max(1, fields.get(b"DEPTH", 4)))
        sample = 2 if fields.get(b"MAXVAL", 65535) > 255 else 1
        return ImageHeader("pam", fields[b"WIDTH"], fields[b"HEIGHT"], channels, sample)
    if kind in (b"F", b"f"):  # PFM: float32 RGB or gray
        tokens = _pnm_tokens(data, 2)
        if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
            return None
        return ImageHeader("pfm", int(tokens[0]), int(tokens[1]), 3 if kind == b"F" else 1, 4)
    bitmap = kind in (b"1", b"4")  # no maxval: 1 bit per pixel, decoded to 8
    tokens = _pnm_tokens(data, 2 if bitmap else 3)
    if len(tokens) < (2 if bitmap else 3) or not all(t.isdigit() for t in tokens):
        return None
    channels = 3 if kind in (b"3", b"6") else 1
    sample = 1 if bitmap or int(tokens[2]) <= 255 else 2
    return ImageHeader("pnm", int(tokens[0]), int(tokens[1]), channels, sample)


_HDR_RESOLUTION = re.compile(rb"([-+])([XY]) +(\d+) +([-+])([XY]) +(\d+)")


def _hdr_header(data: bytes) -> ImageHeader | None:
    """Radiance HDR: text lines, a blank line, then the resolution ("-Y 480 +X 640")."""
    end = data.find(b"\n\n", 0, 1 << 16)
    if end < 0:
        return None
    m = _HDR_RESOLUTION.match(data, end + 2)
    if m is None or m[2] == m[5]:
        return None
    first, second = int(m[3]), int(m[6])
    width, height = (second, first) if m[2] == b"Y" else (first, second)
    return ImageHeader("hdr", width, height, 3, 4)  # decoded as float32 BGR


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO BMFF / JP2 boxes in data[start:end]."""
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        head = 8
        if size == 1:  # 64-bit size follows
            if i + 16 > end:
                return
            (size,) = struct.unpack(">Q", data[i + 8 : i + 16])
            head = 16
        elif size == 0:  # to the end
            size = end - i
        if size < head:
            return
        yield kind, i + head, min(i + size, end)
        i += size


def _find_box(data: bytes, path: Sequence[bytes], start: int, end: int) -> tuple[int, int] | None:
    """(payload start, end) of the first box at ``path`` (e.g. jp2h/ihdr)."""
    for kind, payload, box_end in _boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return payload, box_end
            if kind == b"meta":  # a FullBox: version and flags before its children
                payload += 4
            found = _find_box(data, path[1:], payload, box_end)
            if found is not None:
                return found
    return None


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _jp2_header(data: bytes) -> ImageHeader | None:
    """JPEG 2000: the JP2 file's ihdr box, or a raw codestream's SIZ marker."""
    if data.startswith(_JP2_SIGNATURE):
        found = _find_box(data, [b"jp2h", b"ihdr"], 0, len(data))
        if found is None or found[0] + 11 > found[1]:
            return None
        height, width, channels, bpc = struct.unpack(">IIHB", data[found[0] : found[0] + 11])
        bits = 16 if bpc == 0xFF else (bpc & 0x7F) + 1  # 0xFF: varies per component
    else:  # codestream: SOC, SIZ (Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, tiles, Csiz, Ssiz..)
        x, y, x0, y0 = struct.unpack(">IIII", data[8:24])
        (channels,) = struct.unpack(">H", data[40:42])
        width, height = x - x0, y - y0
        ssiz = data[42 : 42 + 3 * channels : 3]
        bits = max(((s & 0x7F) + 1 for s in ssiz), default=16)
    sample = 1 if bits <= 8 else 2
    return ImageHeader("jp2", width, height, min(max(channels, 1), 4), sample)


def _avif_header(data: bytes) -> ImageHeader | None:
    """AVIF (ISO BMFF): the largest ispe (image spatial extents) box; depth from pixi/av1C."""
    props = _find_box(data, [b"meta", b"iprp", b"ipco"], 0, len(data))
    if props is None:
        return None
    width = height = 0
    bits = 0
    for kind, payload, box_end in _boxes(data, *props):
        if kind == b"ispe" and payload + 12 <= box_end:
            w, h = struct.unpack(">II", data[payload + 4 : payload + 12])
            if w * h > width * height:
                width, height = w, h
        elif kind == b"pixi" and payload + 5 <= box_end:
            n = data[payload + 4]
            bits = max(bits, *data[payload + 5 : min(payload + 5 + n, box_end)], 0)
        elif kind == b"av1C" and payload + 3 <= box_end and not bits:
            flags = data[payload + 2]  # seq_tier_0, high_bitdepth, twelve_bit, ...
            bits = 12 if flags & 0x20 else 10 if flags & 0x40 else 8
    if width * height == 0:
        return None
    sample = 1 if 0 < bits <= 8 else 2  # deeper (or unknown) decodes to 16 bits
    return ImageHeader("avif", width, height, 4, sample)


def read_header(data: bytes) -> ImageHeader | None:
    """Format, size, channels and sample size from a file's bytes, without decoding it.

    Pass the whole file: a TIFF's directory may come after its pixels. Covers PNG,
    JPEG, BMP, GIF, WebP, TIFF, BigTIFF, PNM, PAM, PFM, Sun raster, Radiance HDR,
    JPEG 2000 and AVIF; None for anything else (or a header cut short).
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
            # gray 1, RGB 3; palette, gray+alpha and RGBA may all come out as BGRA
            channels = {0: 1, 2: 3}.get(colour, 4)
            return ImageHeader("png", w, h, channels, 2 if depth == 16 else 1)
        if data[:2] == b"\xff\xd8":
            return _jpeg_header(data)
        if data[:2] == b"BM":
            (dib,) = struct.unpack("<I", data[14:18])
            if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                w, h, _, bpp = struct.unpack("<HHHH", data[18:26])
            else:
                w, h, _, bpp = struct.unpack("<iiHH", data[18:30])
            # negative height = top-down rows; 32 bits may carry alpha
            return ImageHeader("bmp", abs(w), abs(h), 4 if bpp == 32 else 3)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return ImageHeader("gif", w, h, 4)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return ImageHeader("webp", w & 0x3FFF, h & 0x3FFF, 4)
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4)
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return ImageHeader("webp", w, h, 4)
            return None
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_header(data)
        if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"F", b"f"):
            return _pnm_header(data)
        if data[:4] == b"\x59\xa6\x6a\x95":
            w, h, depth = struct.unpack(">III", data[4:16])
            return ImageHeader("sunraster", w, h, 4 if depth == 32 else 3)
        if data[:2] == b"#?":  # "#?RADIANCE" or "#?RGBE"
            return _hdr_header(data)
        if data.startswith(_JP2_SIGNATURE) or data[:4] == b"\xff\x4f\xff\x51":
            return _jp2_header(data)
        if data[4:8] == b"ftyp" and (b"avif" in data[8:64] or b"avis" in data[8:64]):
            return _avif_header(data)
    except (struct.error, ValueError, IndexError):  # header cut short or garbled
        return None
    return None


# --------------------------------------------------------------------------- decoding


def _jpeg_complete(data: bytes) -> bool:
    """A JPEG ends with an EOI marker after its scan data (0xFF is byte-stuffed inside it)."""
    sos = data.find(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos) >= 0


# libjpeg's warnings for corrupt data (it decodes on, filling what is missing with grey):
# "Corrupt JPEG data: premature end of data segment", "... bad Huffman code", "... N
# extraneous bytes before marker", "Premature end of JPEG file". Other warnings (an
# unknown JFIF revision) describe files that decode correctly.
JPEG_CORRUPT_PREFIXES = ("Corrupt JPEG data", "Premature end of JPEG file")
JPEG_SIGNATURE = b"\xff\xd8"
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


def _scale_area(img: np.ndarray, s: float) -> np.ndarray:
    """Area-average downscale by factor ``s`` < 1 (each side at least 1 px)."""
    h, w = img.shape[:2]
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """Area-downscale so the longer side is <= max_side (bounds all later work)."""
    longest = max(img.shape[:2])
    return img if longest <= max_side else _scale_area(img, max_side / longest)


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
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ImageError("no such file") from exc
    except OSError as exc:  # permission denied on a parent folder, name too long, ...
        raise ImageError(f"cannot access: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):  # a folder the walk could not enter
            raise ImageError("folder cannot be read (permission denied)")
        raise ImageError("is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):  # FIFOs and devices would block or never end
        raise ImageError("not a regular file")
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(
            f"file too large ({st.st_size / 2**20:.0f} MiB > {MAX_FILE_BYTES / 2**20:.0f} MiB)"
        )
    try:
        # bytes + imdecode rather than imread: works for any file name, one read, no seeks
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from exc

    header = read_header(data)  # the whole file: a TIFF's directory may be at its end
    flags = cv2.IMREAD_UNCHANGED  # keeps alpha (composited later) and 16 bits
    if header is not None:
        pixels = header.pixels
        size = f"{header.width}x{header.height} {header.format.upper()}"
        if pixels == 0:
            raise ImageError(f"{header.format} header says {header.width}x{header.height} pixels")
        if header.format == "jpeg":
            if not _jpeg_complete(data):
                raise ImageError("truncated JPEG (no end-of-image marker)")
            # grayscale at the smallest DCT scale that fits: decoding allocates only the
            # reduced image, so a 20000x20000 JPEG costs 6 MB, not 400; and no point in
            # decoding more than the max_side we keep
            factor = 1
            while factor < 8 and (
                pixels / factor**2 > max_pixels
                or max(header.width, header.height) / (2 * factor) >= max_side
            ):
                factor *= 2
            if pixels / factor**2 > max_pixels:
                raise ImageError(
                    f"image too large: {size} ({_mp(pixels)}, over {_mp(max_pixels)} "
                    "even at 1/8 scale)"
                )
            if decode_bytes(header, factor) > max_bytes:  # progressive: full-size buffers
                raise ImageError(
                    f"image too large: {size}, progressive (~{_mb(decode_bytes(header, factor))}"
                    f" to decode > {_mb(max_bytes)} limit); save it as a baseline JPEG"
                )
            # a colour JPEG decodes to BGR only when colour is wanted (3x the memory,
            # counted by decode_bytes from the header's components)
            jpeg_colour = colour and header.channels == 3
            flags = (_JPEG_COLOUR_FLAGS if jpeg_colour else _JPEG_FLAGS)[factor]
        elif pixels > max_pixels or decode_bytes(header) > max_bytes:
            raise ImageError(
                f"image too large: {size} ({_mp(pixels)}, ~{_mb(decode_bytes(header))} to "
                f"decode; limits {_mp(max_pixels)}, {_mb(max_bytes)}); downscale it or "
                "save it as JPEG"
            )
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


# --------------------------------------------------------------------------- preprocessing


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) bounding box of the nonzero pixels, None when there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _center_of_mass(img: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted (row, col) centre of a 2-D image (its middle when all zero)."""
    total = float(img.sum())
    if total == 0:
        return (img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2
    rows = img.sum(axis=1, dtype=np.float64)
    cols = img.sum(axis=0, dtype=np.float64)
    return (
        float(rows @ np.arange(img.shape[0])) / total,
        float(cols @ np.arange(img.shape[1])) / total,
    )


def is_near_mnist(img: np.ndarray) -> bool:
    """A 28x28 white-on-black image whose ink already fills a 20 px box at the centre, on a
    black background."""
    if img.shape != (MNIST_SIZE, MNIST_SIZE):
        return False
    box = _box(img >= NEAR_MNIST_INK)
    if box is None:
        return False
    if float(np.median(img)) > NEAR_MNIST_PAPER:
        return False
    side = max(box[1] - box[0], box[3] - box[2])
    cy, cx = _center_of_mass(img)
    lo, hi = NEAR_MNIST_SIDES
    return lo <= side <= hi and max(abs(cy - MNIST_COM), abs(cx - MNIST_COM)) <= NEAR_MNIST_COM


def _histogram(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """256-bin histogram (float64) of a uint8 image, optionally of the pixels under ``mask``."""
    m = None if mask is None else mask.view(np.uint8)
    return cv2.calcHist([img], [0], m, [256], [0, 256]).ravel().astype(np.float64)


def _percentiles(hist: np.ndarray, *qs: float) -> list[int]:
    """The grey levels below which ``q`` percent of the histogram's pixels lie, for each q."""
    cum = np.cumsum(hist)
    return [int(v) for v in np.searchsorted(cum, cum[-1] * np.asarray(qs) / 100.0)]


def _otsu(hist: np.ndarray) -> int:
    """Otsu's threshold of a histogram: pixels > t are one class, <= t the other."""
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    total, mean_total = w0[-1], m0[-1]
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):  # empty classes give 0/0: no split
        between = (mean_total * w0 - m0 * total) ** 2 / (w0 * w1)
    return int(np.argmax(np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)))


def _ink_is_dark(gray: np.ndarray) -> bool:
    """Paper is most of the picture: ink is dark when the median is on the bright side."""
    lo, med, hi = _percentiles(_histogram(gray), 1, 50, 99)
    return med > (lo + hi) / 2


def _paper_surface(ink: np.ndarray) -> np.ndarray:
    """The slowly varying paper level (shading, vignetting) of a bright-ink image, (H, W) uint8.

    A quadratic surface fitted to the paper pixels of a small thumbnail (those on
    the dark side of its Otsu threshold), so the ink, however big the digit, does
    not leak into it; one level (the median) for small or mostly-ink images.
    """
    h, w = ink.shape
    s = BACKGROUND_SIDE / max(h, w)
    thumb = _scale_area(ink, s) if s < 1 else ink  # (th, tw), longer side <= 64
    paper = thumb <= _otsu(_histogram(thumb))
    if s >= 1 or paper.mean() < MIN_PAPER_SHARE:  # small or flat: one paper level
        (level,) = _percentiles(_histogram(ink), 50)
        return np.full_like(ink, level)
    th, tw = thumb.shape
    ys, xs = np.mgrid[:th, :tw].astype(np.float32)
    ys, xs = ys / th - 0.5, xs / tw - 0.5
    terms = np.stack([np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], axis=-1)  # (th, tw, 6)
    a, b = terms[paper], thumb[paper].astype(np.float32)
    # normal equations: a 6x6 solve, 100x faster than lstsq's SVD here; the centred
    # coordinates keep it well conditioned
    coef = np.linalg.solve(a.T @ a, a.T @ b)
    surface = np.clip(terms @ coef, 0, 255).astype(np.uint8)  # (th, tw)
    return cv2.resize(surface, (w, h), interpolation=cv2.INTER_LINEAR)


def _noise_sigma(ink: np.ndarray) -> float:
    """Robust sigma of the fine-grained noise of an (H, W) uint8 image.

    The residual from a 5x5 median holds the noise but neither shading nor thin
    strokes (the median follows the paper beside them, thick strokes inside
    them); noise makes it symmetric about 0. From its dark side only: ink is
    bright, so residuals below 0 are noise alone, however much ink there is.
    Their median distance to 0 is 0.674 sigma for normal noise (the MAD); whole
    grey levels are interpolated, the residuals of exactly 0 counted half below.
    Measured on every other pixel of every other row: the same sigma for a
    quarter of the work. On blurred normal noise it reads 75-100% of the true
    sigma (NOISE_SIGMAS allows for it).
    """
    ink = np.ascontiguousarray(ink[::NOISE_STEP, ::NOISE_STEP])  # same sigma, 1/4 the work
    med = cv2.medianBlur(ink, NOISE_MEDIAN)
    below = cv2.subtract(med, ink)  # (H, W) uint8: how far under the median, 0 if over
    hist = _histogram(below)  # hist[0]: residuals >= 0
    zeros = ink.size - cv2.countNonZero(below) - cv2.countNonZero(cv2.subtract(ink, med))
    # distances below 0: [0, 0.5) is half the zeros, then whole levels 1, 2, ...
    counts = np.concatenate(([zeros / 2], hist[1:]))  # (256,)
    edges = np.concatenate(([0.0], np.arange(256) + 0.5))  # level k: [edges[k], edges[k+1])
    cum = np.cumsum(counts)
    half = cum[-1] / 2
    if half <= 0:  # a constant image
        return 0.0
    k = int(np.searchsorted(cum, half))
    before = cum[k - 1] if k else 0.0
    mad = edges[k] + (edges[k + 1] - edges[k]) * (half - before) / counts[k]
    return MAD_TO_SIGMA * float(mad)


def _has_sharp_edges(ink: np.ndarray, mask: np.ndarray, contrast: float, noise: float) -> bool:
    """Whether the ink mask's outline is a stroke edge, not the rim of a smooth shade.

    ``ink`` (H, W) uint8 flattened, ``mask`` its Otsu ink. Across a stroke's edge
    the level rises by most of the contrast within a few pixels (even blurred);
    across the rim of shading the flattening left (vignetting, a lamp's spot)
    only by a small part of it. The local range (7x7 max - min) at the outline
    tells them apart, less the range noise (sigma ``noise``) has by itself.
    """
    box = _box(mask)
    if box is None:
        return False
    # only around the ink: the window's reach beyond its box
    pad = EDGE_WINDOW // 2
    y0, x0 = max(box[0] - pad, 0), max(box[2] - pad, 0)
    y1, x1 = box[1] + pad, box[3] + pad
    m = mask[y0:y1, x0:x1]
    outline = m & ~cv2.erode(m.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    window = np.ones((EDGE_WINDOW, EDGE_WINDOW), np.uint8)
    rng = cv2.morphologyEx(ink[y0:y1, x0:x1], cv2.MORPH_GRADIENT, window)
    (median,) = _percentiles(_histogram(rng, outline), 50)
    return median >= EDGE_SHARE * contrast + EDGE_NOISE_SIGMAS * noise


@dataclass(frozen=True)
class _Levels:
    """Otsu's split of a flattened ink image (paper ~0, ink bright)."""

    threshold: int  # pixels > threshold are ink
    paper: float  # mean level of the paper class
    ink: float  # median level of the ink class: the typical stroke core


def _levels(hist: np.ndarray) -> _Levels | None:
    """Otsu's split of a 256-bin histogram and its two levels; None for one flat level."""
    t = _otsu(hist)
    paper, fg = hist[: t + 1], hist[t + 1 :]
    if paper.sum() == 0 or fg.sum() == 0:
        return None
    paper_level = float(paper @ np.arange(t + 1)) / paper.sum()
    return _Levels(t, paper_level, float(t + 1 + _percentiles(fg, 50)[0]))


def _bright_ink(gray: np.ndarray) -> np.ndarray:
    """The image with its ink bright (inverted when the ink is dark)."""
    return cv2.bitwise_not(gray) if _ink_is_dark(gray) else gray


def _contrast_to_noise(channel: np.ndarray) -> float:
    """How well one channel (H, W) uint8 separates ink from paper: Otsu contrast / noise."""
    ink = _bright_ink(channel)
    surface = _paper_surface(ink)
    levels = _levels(_histogram(cv2.subtract(ink, surface)))
    if levels is None:
        return 0.0
    sigma = max(_noise_sigma(ink), COLOUR_MIN_NOISE)
    return (levels.ink - levels.paper) / sigma


def _paper_distance(bgr: np.ndarray, paper: np.ndarray) -> np.ndarray:
    """(H, W) uint8: how far each pixel's colour is from the paper's (largest channel gap)."""
    gaps = cv2.absdiff(bgr, np.full_like(bgr, paper))  # (H, W, 3)
    return np.max(gaps, axis=2)


def _ink_channel(img: np.ndarray, colour: bool = True) -> np.ndarray:
    """(H, W) gray or (H, W, 3) BGR -> the (H, W) uint8 channel that shows the ink best.

    Gray loses coloured ink whose luminance is near the paper's (red on green, a
    faint blue pen on pink). Each candidate (gray, B, G, R, distance from the
    paper's median colour) is scored on a thumbnail by the ink test's
    contrast-to-noise ratio; gray is kept when it scores COLOUR_GRAY_ENOUGH,
    else another channel wins when it beats gray by COLOUR_GAIN.
    """
    if img.ndim == 2:
        return img
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if not colour:
        return gray
    s = COLOUR_SIDE / max(img.shape[:2])
    thumb = _scale_area(img, s) if s < 1 else img  # (th, tw, 3)
    spread = cv2.subtract(thumb.max(axis=2), thumb.min(axis=2))  # (th, tw) chroma
    if _percentiles(_histogram(spread), 99)[0] < COLOURLESS:  # a gray picture saved as RGB
        return gray
    paper = np.array([_percentiles(_histogram(c), 50)[0] for c in cv2.split(thumb)], np.uint8)
    candidates = {
        "gray": cv2.cvtColor(thumb, cv2.COLOR_BGR2GRAY),
        **dict(zip("bgr", cv2.split(thumb), strict=True)),
        "paper distance": _paper_distance(thumb, paper),
    }
    scores = {"gray": _contrast_to_noise(candidates["gray"])}
    if scores["gray"] >= COLOUR_GRAY_ENOUGH:
        return gray
    scores |= {name: _contrast_to_noise(c) for name, c in candidates.items() if name != "gray"}
    best = max(scores, key=scores.__getitem__)
    if scores[best] < COLOUR_GAIN * scores["gray"]:
        return gray
    if best == "paper distance":
        return _paper_distance(img, paper)
    return np.ascontiguousarray(img[:, :, "bgr".index(best)])


@functools.lru_cache(maxsize=64)
def _line_kernels(length: int, vertical: bool) -> tuple[np.ndarray, ...]:
    """Straight-line structuring elements ``length`` cells long, one per tilt in LINE_TILTS."""
    kernels = []
    for deg in LINE_TILTS:
        rise = round((length - 1) * math.tan(math.radians(abs(deg))))
        k = np.zeros((rise + 1, length), np.uint8)
        y0, y1 = (0, rise) if deg >= 0 else (rise, 0)
        cv2.line(k, (0, y0), (length - 1, y1), 1, 1)
        kernels.append(np.ascontiguousarray(k.T) if vertical else k)
    return tuple(kernels)


def _open(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Morphological opening of a 0/1 uint8 mask, outside the image counting as paper.

    OpenCV's default border for erosion is the maximum (255): where a tilted
    kernel lies wholly outside the image (a corner), the erosion is 255 and the
    opening draws a phantom 255 run there. A constant 0 border keeps 0/1 masks 0/1.
    """
    return cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
    )


@dataclass(frozen=True)
class _Runs:
    """Long thin straight runs of one orientation, at the line-search scale (1/LINE_SCALE)."""

    vertical: bool
    runs: np.ndarray  # (sh, sw) uint8 0/1: cells on straight runs >= LINE_LENGTH long
    thin: np.ndarray  # (sh, sw) uint8 0/1: those of them no thicker than a line


def _line_runs(faint: np.ndarray) -> list[_Runs]:
    """Candidate ruled lines / frame edges in a bool ink mask (H, W): long thin straight runs.

    Found at 1/4 scale: openings with line kernels half the image long (a few
    tilts) keep only straight runs that long; where such a run is thicker than a
    line, it is a stroke of a big digit (a "1") and is not a candidate.
    """
    h, w = faint.shape
    if min(h, w) < LINE_MIN_IMAGE:
        return []
    # a cell is ink when >= 2 of its 4x4 pixels are: a 1 px line (4 px per cell) survives
    # the downscale, a lone noise pixel does not. Area averaging of 0/255 = 255 * share.
    sh, sw = h // LINE_SCALE, w // LINE_SCALE
    share = cv2.resize(
        faint.view(np.uint8)[: sh * LINE_SCALE, : sw * LINE_SCALE] * np.uint8(255), (sw, sh),
        interpolation=cv2.INTER_AREA,
    )  # fmt: skip
    small = (share >= 255 * LINE_CELL_INK // LINE_SCALE**2).view(np.uint8)
    found = []
    for vertical, across_cells in (
        (False, (LINE_MAX_THICKNESS + 1, 1)),  # horizontal lines
        (True, (1, LINE_MAX_THICKNESS + 1)),  # vertical lines
    ):
        length = max(2, int((sh if vertical else sw) * LINE_LENGTH))
        runs = np.zeros_like(small)
        for k in _line_kernels(length, vertical):
            runs |= _open(small, k)
        # runs thicker than a line (across it) are strokes of a big digit, e.g. a "1"
        thick = _open(runs, np.ones(across_cells, np.uint8))
        thin = runs & ~thick
        if thin.any():
            found.append(_Runs(vertical, runs, thin))
    return found


def _runs_beyond_digit(found: list[_Runs], rest: np.ndarray) -> list[_Runs]:
    """The candidate runs that are ruled lines, not the digit's own bar or stem.

    ``rest`` (H, W) bool is the ink without any candidate. A run (a connected
    straight run, crossing strokes included) is a line when it runs on past the
    digit's box on both ends (LINE_OVERHANG); with no digit besides the runs,
    when it has LINE_FAMILY - 1 or more parallel ones (ruled paper). Unsure: kept
    as ink.
    """
    digit = _digit_components(rest)
    kept = []
    for r in found:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(r.runs, connectivity=8)
        if digit is None:
            is_line = np.full(n, n - 1 >= LINE_FAMILY)
        else:
            y0, y1, x0, x1 = (v / LINE_SCALE for v in digit[0])  # the digit's box, in cells
            lo, hi = (y0, y1) if r.vertical else (x0, x1)
            margin = LINE_OVERHANG * (hi - lo) + LINE_OVERHANG_CELLS
            start = stats[:, cv2.CC_STAT_TOP if r.vertical else cv2.CC_STAT_LEFT]
            end = start + stats[:, cv2.CC_STAT_HEIGHT if r.vertical else cv2.CC_STAT_WIDTH]
            is_line = (start <= lo - margin) & (end >= hi + margin)
        is_line[0] = False  # label 0: no run
        if is_line.any():
            thin = r.thin & is_line[labels].view(np.uint8)
            kept.append(_Runs(r.vertical, r.runs, thin))
    return kept


def _line_pixels(faint: np.ndarray, found: list[_Runs], bridge: bool = True) -> np.ndarray | None:
    """(H, W) bool: the ink pixels of the lines ``found`` (None if none), strokes spared.

    At full size, only ink that does not run on across the line is line: where a
    stroke crosses a line, the stroke is kept whole, so the digit is not cut.
    ``bridge``: also where a slanted stroke crosses (the former rule had not).
    """
    h, w = faint.shape
    f8 = faint.view(np.uint8)
    thickest = LINE_SCALE * LINE_MAX_THICKNESS  # px at full size
    pixels = np.zeros((h, w), bool)
    for r in found:
        if not r.thin.any():
            continue
        sh, sw = r.thin.shape
        cells = cv2.dilate(r.thin, np.ones((3, 3), np.uint8))
        zone = np.zeros((h, w), np.uint8)  # cells back to pixels (the ragged edge has none)
        zone[: sh * LINE_SCALE, : sw * LINE_SCALE] = cv2.resize(
            cells, (sw * LINE_SCALE, sh * LINE_SCALE), interpolation=cv2.INTER_NEAREST
        )
        # ink running across the line further than a line is thick belongs to a stroke
        across = (1, thickest + 1) if r.vertical else (thickest + 1, 1)
        crossing = _open(f8, np.ones(across, np.uint8)).view(bool)
        line = zone.view(bool) & faint & ~crossing
        if bridge:
            # ... and so does ink in the line's zone with ink outside the zone on both
            # sides of it (a slanted stroke crossing: its run across the line is short)
            line &= ~_bridged(faint & ~zone.view(bool), r.vertical)
        pixels |= line
    return pixels if pixels.any() else None


def _bridged(rest: np.ndarray, vertical: bool) -> np.ndarray:
    """(H, W) bool: pixels with ink of ``rest`` within LINE_BRIDGE px on both sides, across a line.

    Both sides: above and below a horizontal line (left and right of a vertical
    one), up to LINE_BRIDGE px along it too, so strokes slanted up to 45 degrees
    count. One-sided dilations: the kernel's anchor on its last / first row.
    """
    b = LINE_BRIDGE
    kernel = np.ones((b + 1, 2 * b + 1) if not vertical else (2 * b + 1, b + 1), np.uint8)
    near = []
    for anchor in ((b, b), (b, 0)) if not vertical else ((b, b), (0, b)):
        near.append(cv2.dilate(rest.view(np.uint8), kernel, anchor=anchor).view(bool))
    return near[0] & near[1]


def _digit_components(mask: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """The digit's ink: the biggest component plus the sizeable ones near it.

    Returns its box (y0, y1, x0, x1) and the bool mask of its ink inside the box.

    Specks are dropped by size, frame shadows because they touch the image edge
    and span half of it (unless nothing else is there). None when nothing
    ink-like is left.
    """
    h, w = mask.shape
    # 16-bit labels are twice as fast; an image has at most ~h*w/4 8-connected components
    ltype = cv2.CV_16U if h * w // 4 < 2**16 else cv2.CV_32S
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.view(np.uint8), connectivity=8, ltype=ltype
    )
    if n <= 1:
        return None
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    area[0] = 0  # label 0 is the background
    area[area < SPECK_MIN_AREA] = 0
    big = (area >= SPECK_FRACTION * area.max()) & (np.maximum(bw, bh) >= MIN_INK_SIDE * max(h, w))
    if not big.any():
        return None
    # an edge shadow or photographed frame touches the border and spans half of it; a
    # digit may too (a tight crop), so it is only passed over for one clear of the edges
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    frame = touches & ((bw >= w * LINE_LENGTH) | (bh >= h * LINE_LENGTH))
    inner = big & ~frame
    main = int(np.argmax(np.where(inner if inner.any() else big, area, 0)))
    area[frame & (np.arange(n) != main)] = 0
    # grow the digit's box by sizeable pieces near it (a broken stroke, the bar of a 5)
    pieces = [int(i) for i in np.argsort(-area) if area[i] >= SPECK_FRACTION * area[main]]
    y0, y1, x0, x1 = y[main], y[main] + bh[main], x[main], x[main] + bw[main]
    keep = np.zeros(n, bool)
    keep[main] = True
    grown = True
    while grown:
        grown = False
        margin = max(y1 - y0, x1 - x0) // 4
        for i in pieces:
            near = (
                x[i] < x1 + margin and x[i] + bw[i] > x0 - margin
                and y[i] < y1 + margin and y[i] + bh[i] > y0 - margin
            )  # fmt: skip
            if not keep[i] and near:
                keep[i] = grown = True
                y0, y1 = min(y0, y[i]), max(y1, y[i] + bh[i])
                x0, x1 = min(x0, x[i]), max(x1, x[i] + bw[i])
    box = (int(y0), int(y1), int(x0), int(x1))
    return box, keep[labels[y0:y1, x0:x1]]


def _stroke_widths(core: np.ndarray) -> tuple[float, float]:
    """(median, thin-share percentile) stroke width in px of a bool ink mask (h, w).

    Width at a ridge pixel (a local maximum of the distance to the paper) is
    2 x distance - 1: 1 for a 1 px line, 3 for a 3 px stroke.
    """
    padded = cv2.copyMakeBorder(core.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)  # (h+2, w+2)
    ridge = (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8))) & (dist > 0)
    widths = 2.0 * dist[ridge] - 1.0
    if widths.size == 0:
        return 0.0, 0.0
    median, thin = np.percentile(widths, [50, STROKE_THIN_SHARE])
    return float(median), float(thin)


def _normalize_stroke(crop: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Dilate or erode a digit's crop so its strokes come out MNIST-wide at 28x28.

    ``crop`` (h, w) float32 ink (paper 0), ``core`` (h, w) bool its ink mask; the crop
    is returned re-cropped to the new ink box (the box grows by r per side when
    dilating by a disc of radius r, shrinks when eroding). The radius solves
    (width +- 2r) * 20 / (side +- 2r) = STROKE_TARGET. Erosion stops where the
    thin parts (STROKE_THIN_SHARE percentile) would get thinner than the target,
    so no stroke is eroded away and holes (loops) only open up.
    """
    side = max(crop.shape)
    width, thin = _stroke_widths(core)
    if width <= 0:
        return crop
    lo, hi = STROKE_RANGE
    at_28 = width * MNIST_BOX / side
    denom = 2 * (MNIST_BOX - STROKE_TARGET)
    if at_28 < lo:
        r = round((STROKE_TARGET * side - MNIST_BOX * width) / denom)
        op = cv2.dilate
    elif at_28 > hi:
        r = round((MNIST_BOX * width - STROKE_TARGET * side) / denom)
        target_px = STROKE_TARGET * side / MNIST_BOX  # the target width, in crop px
        r = min(r, math.floor((thin - target_px) / 2))
        op = cv2.erode
    else:
        return crop
    if r < 1:
        return crop
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    if op is cv2.dilate:  # room for the strokes to grow
        crop = cv2.copyMakeBorder(crop, r, r, r, r, cv2.BORDER_CONSTANT, value=0)
        core = cv2.copyMakeBorder(core.view(np.uint8), r, r, r, r, cv2.BORDER_CONSTANT, value=0)
    new_core = op(core.view(np.uint8), kernel)
    box = _box(new_core)
    if box is None:  # cannot happen with the cap above; keep the digit rather than lose it
        return crop
    y0, y1, x0, x1 = box
    return op(crop, kernel)[y0:y1, x0:x1]


def _fit_mnist(ink: np.ndarray) -> np.ndarray:
    """A cropped float ink image (h, w) in 0..255 -> (28, 28) uint8, MNIST geometry.

    Longer side to 20 px (area-averaged, so edges are anti-aliased like MNIST's),
    then pasted so the centre of mass lands on pixel (14, 14).
    """
    h, w = ink.shape
    s = MNIST_BOX / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(ink, (nw, nh), interpolation=interp)
    cy, cx = _center_of_mass(small)
    # integer shift (as MNIST did), kept inside the 28x28 field
    oy = int(np.clip(round(MNIST_COM - cy), 0, MNIST_SIZE - nh))
    ox = int(np.clip(round(MNIST_COM - cx), 0, MNIST_SIZE - nw))
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    out[oy : oy + nh, ox : ox + nw] = small
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_mnist(img: np.ndarray, *, steps: Steps = ALL_STEPS) -> np.ndarray | None:
    """(H, W) grayscale or (H, W, 3) BGR uint8, any polarity -> (28, 28) uint8 MNIST-style.

    None when there is no ink. ``steps`` switches steps off (for the ablation);
    the default runs them all.
    """
    ink = _bright_ink(_ink_channel(img, steps.colour))  # (H, W), ink bright from here on
    if is_near_mnist(ink):
        return ink  # already normalized: re-rendering would only blur it
    out = _digit_image(ink, steps)
    if out is None and steps.noise_floor:
        # the polarity is a guess from the histogram's tails: thin ink (1% of the
        # pixels) on paper with a shadow has the shadow in its dark tail. No ink
        # found one way: look the other way (blank pages stay blank either way)
        out = _digit_image(cv2.bitwise_not(ink), steps)
    return out


def _digit_image(ink: np.ndarray, steps: Steps) -> np.ndarray | None:
    """(H, W) uint8 bright ink on dark paper -> (28, 28) uint8 MNIST-style, None if no ink."""
    sigma = max(ink.shape) * BLUR_PER_PX
    if sigma >= 0.5:  # below half a pixel a blur does nothing useful
        ink = cv2.GaussianBlur(ink, (0, 0), sigma)
    noise = _noise_sigma(ink) if steps.noise_floor else 0.0
    floor = max(NOISE_SIGMAS * noise, MIN_INK_CONTRAST) if steps.noise_floor else MIN_CONTRAST
    ink = cv2.subtract(ink, _paper_surface(ink))  # paper ~0

    # faint ink or lines: half the floor (the former FAINT_INK is half of MIN_CONTRAST),
    # and clear of the noise, or the line search would find runs in it
    faint = ink >= max(1, math.ceil(floor / 2), math.ceil(FAINT_SIGMAS * noise))
    runs = _line_runs(faint) if steps.lines != LINES_OFF else []
    bridge = steps.lines == LINES_BEYOND
    lines = _line_pixels(faint, runs, bridge) if runs else None
    hist = _histogram(ink, None if lines is None else ~lines)  # lines must not sway Otsu
    levels = _levels(hist)
    if levels is None:  # one flat level: nothing to find
        return None
    if levels.ink - levels.paper < floor:  # Otsu split noise from noise: blank page
        return None
    mask = ink > levels.threshold
    # a floor below the former one lets smooth shading the flattening left pass for
    # ink: ink has edges. (Above the former floor, ink is taken as before.)
    contrast = levels.ink - levels.paper
    weak = steps.noise_floor and contrast < MIN_CONTRAST
    if weak and not _has_sharp_edges(ink, mask, contrast, noise):
        return None
    if lines is not None and steps.lines == LINES_BEYOND:
        lines = _line_pixels(faint, _runs_beyond_digit(runs, mask & ~lines))
    if lines is not None:
        mask &= ~lines
    digit = _digit_components(mask)
    if digit is None:
        return None
    (y0, y1, x0, x1), core = digit  # the box of the ink itself, as MNIST's 20 px box
    # one pixel of margin keeps the anti-aliased stroke edges that fell under the threshold
    keep = cv2.dilate(core.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    if lines is not None:
        keep &= ~lines[y0:y1, x0:x1]
    crop = ink[y0:y1, x0:x1].astype(np.float32)
    scale = 255.0 / (levels.ink - levels.paper)
    crop = np.clip((crop - levels.paper) * scale, 0, 255)  # paper 0, stroke 255
    crop[~keep] = 0
    if steps.stroke_width:
        crop = _normalize_stroke(crop, core)
    return _fit_mnist(crop)


def naive_28(gray: np.ndarray) -> np.ndarray:
    """The seed's preprocessing: the whole image area-resized to 28x28, nothing else.

    Colour (H, W, 3) is made gray first, as the seed read every file as grayscale.
    """
    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
    if gray.shape == (MNIST_SIZE, MNIST_SIZE):
        return gray
    return cv2.resize(gray, (MNIST_SIZE, MNIST_SIZE), interpolation=cv2.INTER_AREA)


def prepare_file(
    path: Path | str,
    preprocess: bool = True,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_DECODE_BYTES,
) -> Prepared:
    """Decode + preprocess one file; never raises for bad input, the row says what went wrong.

    ``preprocess=False`` is for images that are already MNIST-like: they are only
    made grayscale and resized to 28x28.
    """
    try:
        # the seed's resize reads grayscale; preprocessing picks its own channel
        src = load_image(path, max_pixels=max_pixels, max_bytes=max_bytes, colour=preprocess)
        img = to_mnist(src) if preprocess else naive_28(src)
    except ImageError as exc:
        return Prepared(None, "error", str(exc))
    except cv2.error as exc:  # an OpenCV routine refused this input: report, don't abort
        return Prepared(None, "error", f"OpenCV error: {str(exc).strip().splitlines()[-1]}")
    except MemoryError:
        return Prepared(None, "error", "out of memory while decoding")
    if img is None:
        return Prepared(None, "empty", "no ink found (blank image)")
    return Prepared(img, "ok", "")


def set_opencv_threads(n: int) -> int:
    """Set OpenCV's internal thread count (callers parallelize across images); returns the old."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    return before


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (for --debug-dir; written with Path.write_bytes)."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


__all__ = [
    "MAX_DECODE_BYTES",
    "MAX_PIXELS",
    "ImageError",
    "ImageHeader",
    "Prepared",
    "Steps",
    "decode_bytes",
    "encode_png",
    "is_near_mnist",
    "load_gray",
    "load_image",
    "naive_28",
    "prepare_file",
    "read_header",
    "set_opencv_threads",
    "to_mnist",
]
