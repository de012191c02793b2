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

Decoding (file -> bounded array: ``load_image``) is tasks.decode; ``prepare_file`` is
both steps for one file, never raising for bad input.

Every function here is pure numpy/cv2 and safe to call from several threads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

# tasks.decode first: it sets OpenCV's decoding limit, read once when cv2 loads
from tasks.decode import (
    MAX_DECODE_BYTES,
    MAX_PIXELS,
    ImageError,
    load_image,
)

# isort: split
import cv2
import numpy as np

MNIST_SIZE = 28  # the network's input side
MNIST_BOX = 20  # MNIST fitted each digit's ink into a 20x20 box ...
MNIST_COM = 14.0  # ... and put its centre of mass here (measured: 13.99, 14.00 on the test set)

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
# A thick run is a stroke when its ink runs this far across it at full size: twice a
# cell, more than a ruled line's width after the decode's downscale and blur (1-3 px)
STACK_SOLID_PX = 8
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
QUADRATIC_MIN_SIDE = 3  # rows and columns a quadratic surface needs (fewer: a singular fit)
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
    # a run thicker than a line at the search scale is a stroke only if solid at full size
    # (False: any such run is a stroke, so stacked dense ruled lines were kept as ink)
    stacked_lines: bool = True

    def __post_init__(self) -> None:
        if self.lines not in (LINES_BEYOND, LINES_ANY, LINES_OFF):
            raise ValueError(f"Steps.lines must be one of beyond, any, off: {self.lines!r}")


ALL_STEPS = Steps()


# --------------------------------------------------------------------------- preprocessing


def _scale_area(img: np.ndarray, s: float) -> np.ndarray:
    """Area-average downscale by factor ``s`` < 1 (each side at least 1 px)."""
    h, w = img.shape[:2]
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


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
    if min(th, tw) < QUADRATIC_MIN_SIDE:  # a banner: too few rows (or columns) for a quadratic
        (level,) = _percentiles(_histogram(ink), 50)
        return np.full_like(ink, level)
    ys, xs = np.mgrid[:th, :tw].astype(np.float32)
    ys, xs = ys / th - 0.5, xs / tw - 0.5
    terms = np.stack([np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], axis=-1)  # (th, tw, 6)
    a, b = terms[paper], thumb[paper].astype(np.float32)
    # normal equations: a 6x6 solve, 100x faster than lstsq's SVD here; the centred
    # coordinates keep it well conditioned
    gram = a.T @ a
    if np.linalg.matrix_rank(gram) < gram.shape[0]:  # paper on too few rows or columns
        (level,) = _percentiles(_histogram(ink), 50)
        return np.full_like(ink, level)
    coef = np.linalg.solve(gram, a.T @ b)
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
    # gray also wins ties: a uniform image scores 0 everywhere, and "gray" comes first
    if best == "gray" or scores[best] < COLOUR_GAIN * scores["gray"]:
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


def _line_runs(faint: np.ndarray, stacked: bool = True) -> list[_Runs]:
    """Candidate ruled lines / frame edges in a bool ink mask (H, W): long thin straight runs.

    Found at 1/4 scale: openings with line kernels half the image long (a few
    tilts) keep only straight runs that long; where such a run is thicker than a
    line, it is a stroke of a big digit (a "1") and is not a candidate. ``stacked``:
    only where it is solid ink that thick at full size too; dense ruled lines (a
    third of a small digit apart) merge into thick runs at 1/4 scale, yet at full
    size each is thin, with paper between them.
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
        if stacked and thick.any():
            thick &= _solid_cells(faint, vertical, (sh, sw))
        thin = runs & ~thick
        if thin.any():
            found.append(_Runs(vertical, runs, thin))
    return found


def _solid_cells(faint: np.ndarray, vertical: bool, cells: tuple[int, int]) -> np.ndarray:
    """(sh, sw) uint8 0/1: cells holding ink that runs across a line's direction further
    than STACK_SOLID_PX at full size (a stroke), not just a thin line's width."""
    across = (1, STACK_SOLID_PX) if vertical else (STACK_SOLID_PX, 1)
    solid = _open(faint.view(np.uint8), np.ones(across, np.uint8))
    sh, sw = cells
    share = cv2.resize(
        solid[: sh * LINE_SCALE, : sw * LINE_SCALE] * np.uint8(255), (sw, sh),
        interpolation=cv2.INTER_AREA,
    )  # fmt: skip
    return (share > 0).view(np.uint8)


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
    runs = _line_runs(faint, steps.stacked_lines) if steps.lines != LINES_OFF else []
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
