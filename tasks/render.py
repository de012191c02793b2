"""Synthetic photos of MNIST training digits, seen through the production preprocessing.

Each render draws one MNIST *training* digit (never the test set, never a real image)
onto procedural paper (plain, ruled or squared; tinted, unevenly lit, shadowed, noisy),
in a random ink (colour, faint to bold, fine to broad pen), with distractors (a pen
line across the digit, marks at the edges) and camera effects (perspective, rotation,
blur, downscaling, JPEG compression). The file is then read back exactly as
`digitflow predict` reads it (``prepare_file``: decoding + ``to_mnist``), and the 28x28
result is kept: what the network sees in production, leftovers of imperfect
preprocessing (line fragments, thickened strokes) included; a result in which the
preprocessing lost the digit altogether (``agreement`` with the source below
MIN_AGREEMENT) is left out and counted, as is one it found empty. The robust recipe trains on
these mixed with clean MNIST (params.yaml ``train.<recipe>.renders_share``).

Seeded: the same params and training digits give the same renders, byte for byte.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.config import RenderParams
from tasks.data import load_arrays, save_arrays
from tasks.prepare_pool import PreparedStream

CANVAS_SIDES = (160, 400)  # px: the rendered photo's longer side (decoding shrinks to 320)
ASPECTS = (0.6, 1.0)  # shorter / longer side of the photo
DIGIT_HEIGHTS = (0.3, 0.65)  # the digit's height, share of the photo's shorter side
MNIST_INK_HEIGHT = 20  # px of the 28x28 MNIST image the digit's ink spans (its 20x20 box)
INK_COLOURS = (  # BGR: black, blue and dark blue ballpoint, red, pencil grey, green
    (20, 20, 20), (150, 60, 20), (90, 30, 10), (40, 40, 180), (90, 90, 90), (40, 110, 30),
)  # fmt: skip
PAPER_TINTS = (  # BGR: white, cream, grey, yellow note, blue-grey, pink, greenish
    (245, 245, 245), (215, 235, 245), (200, 200, 200), (150, 235, 245), (235, 220, 205),
    (220, 210, 245), (215, 240, 220),
)  # fmt: skip
LINE_COLOURS = ((170, 170, 170), (220, 170, 120), (150, 150, 230), (120, 120, 120))  # BGR
WHITE_PAPER = 0.5  # share of renders on white paper; the rest on a tint drawn from PAPER_TINTS
PAPER_JITTER = 25  # grey levels each paper channel varies by
LIGHT_MIN = 0.55  # the darkest end of a lighting gradient, share of full brightness
SHADOW_DEPTH = (0.5, 0.85)  # a shadow keeps this share of the light
THIN_PEN = 0.5  # share of renders drawn with a pen thinner than MNIST's strokes
PEN_WIDTH = (0.025, 0.09)  # a re-drawn pen's width, share of the digit height
LINE_INK = (0.25, 0.7)  # ruled lines' strength relative to the ink's (fainter than the ink)
MARKS = (1, 3)  # marks at the edges when there are any
JPEG_SHARE = 0.7  # renders saved as JPEG (the rest PNG), as most phone photos are
DOWNSCALE = (0.35, 1.0)  # the photo's final size, share of the rendered size
# A render whose 28x28 result matches its source digit worse than this (best normalized
# cross-correlation within +-AGREEMENT_SHIFT px) lost the digit in preprocessing (a shadow or
# a grid block taken for ink): training on it with the digit's label would be label noise.
# Measured on 40 plain-paper renders: 0.69..0.98; lost digits (blocks, wedges): 0.2..0.46.
MIN_AGREEMENT = 0.5
AGREEMENT_SHIFT = 3
# renders on disk at a time while worker processes read them back: ~10 MB of files
RENDER_BATCH = 512
LIGHT_SCALE = 8  # lighting is computed at 1/8 of the photo's size (it varies slowly)


@dataclass(frozen=True)
class RenderResult:
    """What a render run wrote: the file, how many renders, how many were left out."""

    path: Path
    n: int
    empty: int  # the preprocessing found no ink
    lost: int  # it found something else than the digit (agreement below MIN_AGREEMENT)


def agreement(out: np.ndarray, digit: np.ndarray) -> float:
    """Best normalized cross-correlation of a 28x28 result with its source digit, +-3 px."""
    s = AGREEMENT_SHIFT
    padded = cv2.copyMakeBorder(out, s, s, s, s, cv2.BORDER_CONSTANT, value=0)
    scores = cv2.matchTemplate(
        padded.astype(np.float32), digit.astype(np.float32), cv2.TM_CCOEFF_NORMED
    )
    return float(scores.max())


def _pen_mask(digit: np.ndarray, height: int, rng: np.random.Generator) -> np.ndarray:
    """The MNIST digit scaled to ``height`` px as an ink coverage mask in [0, 1].

    Half the time the strokes are re-drawn with a thinner pen (the digit's medial
    ridge, dilated): ballpoints are finer than MNIST's scaled strokes.
    """
    scale = height / MNIST_INK_HEIGHT
    side = max(8, round(28 * scale))
    big = cv2.resize(digit, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    big = np.clip(big, 0, 1)
    if rng.random() < THIN_PEN:
        solid = (big > 0.5).astype(np.uint8)
        dist = cv2.distanceTransform(solid, cv2.DIST_L2, 3)
        ridge = (dist > 0) & (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8)) - 0.5)
        radius = max(1, round(rng.uniform(*PEN_WIDTH) * height / 2))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
        pen = cv2.dilate(ridge.astype(np.uint8), kernel).astype(np.float32)
        big = cv2.GaussianBlur(pen, (0, 0), 0.7)  # anti-aliased edges
    return big


def _paper(h: int, w: int, p: RenderParams, rng: np.random.Generator, height: int) -> np.ndarray:
    """(h, w, 3) float32 BGR paper in [0, 255]: tint, ruled or squared lines."""
    white = rng.random() < WHITE_PAPER
    tint = np.array(PAPER_TINTS[0 if white else rng.integers(len(PAPER_TINTS))], np.float32)
    tint = np.clip(tint + rng.uniform(-PAPER_JITTER, PAPER_JITTER, 3), 0, 255)
    paper = np.empty((h, w, 3), np.float32)
    paper[:] = tint
    kind = rng.random()
    if kind < p.lined + p.squared:
        spacing = max(4.0, rng.uniform(p.line_spacing_min, p.line_spacing_max) * height)
        colour = np.array(LINE_COLOURS[rng.integers(len(LINE_COLOURS))], np.float32)
        strength = rng.uniform(*LINE_INK)
        width = int(rng.integers(1, 3))
        lines = np.zeros((h, w), np.uint8)
        offset = rng.uniform(0, spacing)
        tilt = np.tan(np.radians(rng.uniform(-2, 2)))  # photographed lines are rarely level
        for y in np.arange(offset, h + abs(tilt) * w, spacing):
            cv2.line(lines, (0, round(y)), (w, round(y - tilt * w)), 255, width, cv2.LINE_AA)
        if kind >= p.lined:  # squared: vertical lines too
            for x in np.arange(rng.uniform(0, spacing), w, spacing):
                cv2.line(lines, (round(x), 0), (round(x + tilt * h), h), 255, width, cv2.LINE_AA)
        a = (lines.astype(np.float32) / 255 * strength)[..., None]
        paper = paper * (1 - a) + colour * a
    return paper


def _lighting(h: int, w: int, p: RenderParams, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 1) float32 light in (0, 1]: a linear gradient, maybe a soft shadow.

    Computed at 1/LIGHT_SCALE of the size and resized: light varies slowly.
    """
    angle = rng.uniform(0, 2 * np.pi)
    full = (w, h)
    h, w = -(-h // LIGHT_SCALE), -(-w // LIGHT_SCALE)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) + 1  # 0 .. 2 across the photo
    light = 1 - (1 - rng.uniform(LIGHT_MIN, 1)) * ramp / 2
    if rng.random() < p.shadow:  # a soft-edged half-plane: a hand or phone over the page
        a = rng.uniform(0, 2 * np.pi)
        edge = np.cos(a) * (xx - rng.uniform(0, w)) + np.sin(a) * (yy - rng.uniform(0, h))
        softness = rng.uniform(0.02, 0.15) * max(h, w)
        shade = 1 / (1 + np.exp(-edge / softness))
        light = light * (1 - (1 - rng.uniform(*SHADOW_DEPTH)) * shade)
    return cv2.resize(light, full, interpolation=cv2.INTER_LINEAR)[..., None]


def render_photo(digit: np.ndarray, p: RenderParams, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 BGR synthetic photo of a (28, 28) white-on-black MNIST digit."""
    side = int(rng.integers(*CANVAS_SIDES))
    short = round(side * rng.uniform(*ASPECTS))
    h, w = (side, short) if rng.random() < 0.5 else (short, side)
    height = max(12, round(rng.uniform(*DIGIT_HEIGHTS) * min(h, w)))
    mask = _pen_mask(digit, height, rng)
    paper = _paper(h, w, p, rng, height)
    ink = np.zeros((h, w), np.float32)
    mh, mw = mask.shape
    y0 = int(rng.integers(0, max(1, h - mh)))
    x0 = int(rng.integers(0, max(1, w - mw)))
    ink[y0 : y0 + mh, x0 : x0 + mw] = mask[: h - y0, : w - x0]
    if rng.random() < p.crossing_line:  # a pen line through the digit's box
        cy, cx = y0 + mh / 2, x0 + mw / 2
        a = rng.uniform(0, np.pi)
        dx, dy = np.cos(a) * 2 * max(h, w), np.sin(a) * 2 * max(h, w)
        off = rng.uniform(-0.3, 0.3) * mh
        p1 = (round(cx - dx), round(cy + off - dy))
        p2 = (round(cx + dx), round(cy + off + dy))
        line = np.zeros((h, w), np.uint8)
        cv2.line(line, p1, p2, 255, int(rng.integers(1, 4)), cv2.LINE_AA)
        ink = np.maximum(ink, line.astype(np.float32) / 255 * rng.uniform(0.3, 0.9))
    if rng.random() < p.edge_marks:  # blobs near the border: a finger, a hole, a stain
        for _ in range(int(rng.integers(MARKS[0], MARKS[1] + 1))):
            r = int(rng.integers(2, max(3, min(h, w) // 12)))
            cy = int(rng.choice([rng.integers(0, h // 8 + 1), rng.integers(h - h // 8 - 1, h)]))
            cx = int(rng.integers(0, w))
            if rng.random() < 0.5:
                cy, cx = int(rng.integers(0, h)), int(rng.choice([r, w - r]))
            blob = np.zeros((h, w), np.uint8)
            cv2.circle(blob, (cx, cy), r, 255, -1, cv2.LINE_AA)
            ink = np.maximum(ink, blob.astype(np.float32) / 255 * rng.uniform(0.3, 1))
    strength = rng.uniform(p.faint_min, 1)  # faint pencil .. bold marker
    colour = np.array(INK_COLOURS[rng.integers(len(INK_COLOURS))], np.float32)
    a = (ink * strength)[..., None]
    img = (paper * (1 - a) + colour * a) * _lighting(h, w, p, rng)
    if rng.random() < p.dark:  # light ink on a dark ground: canvas apps, boards
        img = 255 - img
    # sensor noise, the same in the three channels (3x fewer draws; luminance noise dominates)
    img = img + rng.standard_normal((h, w, 1), np.float32) * rng.uniform(0, p.noise_max)
    img = np.clip(img, 0, 255).astype(np.uint8)
    # camera: perspective and rotation, blur, downscale
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(-p.perspective, p.perspective, (4, 2)) * np.float32([w, h])
    persp = cv2.getPerspectiveTransform(corners, (corners + jitter).astype(np.float32))
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-p.rotate_deg, p.rotate_deg), 1)
    matrix = np.vstack([rot, [0, 0, 1]]) @ persp
    img = cv2.warpPerspective(
        img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    sigma = rng.uniform(0, p.blur_max)
    if sigma > 0.3:  # below a third of a pixel a blur changes nothing visible
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    s = rng.uniform(*DOWNSCALE)
    size = (max(16, round(w * s)), max(16, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def encode_photo(img: np.ndarray, p: RenderParams, rng: np.random.Generator) -> tuple[bytes, str]:
    """The photo as a file: JPEG at a random quality (JPEG_SHARE of them), else PNG."""
    if rng.random() < JPEG_SHARE:
        quality = int(rng.integers(p.jpeg_min_quality, 96))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        suffix = ".jpg"
    else:
        ok, buf = cv2.imencode(".png", img)
        suffix = ".png"
    if not ok:
        raise RuntimeError("OpenCV could not encode a render")
    return buf.tobytes(), suffix


def _render_files(
    images: np.ndarray,
    picks: np.ndarray,
    start: int,
    p: RenderParams,
    rng: np.random.Generator,
    work: Path,
) -> list[str]:
    """Render ``picks`` (numbered from ``start``) into files in ``work``, in order."""
    paths = []
    for i, k in enumerate(picks, start):
        data, suffix = encode_photo(render_photo(images[k], p, rng), p, rng)
        path = work / f"render{i:05d}{suffix}"  # the decoder reads files, like predict
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def render_arrays(
    images: np.ndarray, labels: np.ndarray, p: RenderParams, work: Path, workers: int = 1
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``p.count`` renders of digits drawn from ``images`` (seeded), read back as predict does.

    Returns the (N, 28, 28) network inputs, their labels, and how many renders the
    preprocessing found empty and how many it lost the digit in (both left out: N <= count).
    Rendering draws from one seeded generator, in order, in this process; meanwhile
    ``workers`` processes (predict's PreparedStream) read the previous batch back: the
    same renders whatever ``workers``.
    """
    rng = np.random.default_rng(p.seed)
    picks = rng.choice(len(images), size=p.count, replace=p.count > len(images))
    out_x, out_y, counts = [], [], {"empty": 0, "lost": 0}

    def read_back(stream: PreparedStream, batch: np.ndarray) -> None:
        for (path, prep), k in zip(stream, batch, strict=True):
            os.unlink(path)
            if prep.image is None:
                counts["empty"] += 1
            elif agreement(prep.image, images[k]) < MIN_AGREEMENT:
                counts["lost"] += 1
            else:
                out_x.append(prep.image)
                out_y.append(labels[k])

    reading = None  # the previous batch, being read back while this one renders
    for start in range(0, len(picks), RENDER_BATCH):
        batch = picks[start : start + RENDER_BATCH]
        paths = _render_files(images, batch, start, p, rng, work)
        if reading is not None:
            read_back(*reading)
        reading = (PreparedStream(paths, workers, True, None), batch)
    if reading is not None:
        read_back(*reading)
    x = np.stack(out_x) if out_x else np.zeros((0, 28, 28), np.uint8)
    return x, np.asarray(out_y, np.uint8), counts["empty"], counts["lost"]


def render_dataset(
    train_path: Path, out_path: Path, p: RenderParams, workers: int = 1
) -> RenderResult:
    """Render ``p.count`` photos of the training split's digits into ``out_path`` (.npz).

    ``workers``: processes that read the renders back (the result does not depend on it).
    """
    images, labels = load_arrays(train_path)
    with tempfile.TemporaryDirectory(prefix="digitflow-render-") as tmp:
        x, y, empty, lost = render_arrays(images, labels, p, Path(tmp), workers)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_arrays(out_path, x, y)
    return RenderResult(out_path, len(x), empty, lost)
