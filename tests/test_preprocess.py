"""Preprocessing: photos of digits must come out as the MNIST-style 28x28 of the same digit.

The reference for each digit is made here, independently of tasks.preprocess:
a large printed glyph, cropped to its ink, longer side area-resized to 20 px and
pasted with its centre of mass at (14, 14) (MNIST's recipe). The photos are the
same glyph as dark ink on shaded, noisy paper, off-centre, scaled, slightly
rotated, with ruled lines; preprocessing must give back the reference.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks import preprocess
from tasks.decode import ImageError, decode_bytes, load_gray, load_image, read_header
from tasks.preprocess import (
    LINES_ANY,
    MNIST_BOX,
    STROKE_RANGE,
    Steps,
    is_near_mnist,
    naive_28,
    prepare_file,
    to_mnist,
)
from tests.images import (
    BIG,
    REFERENCES,
    big_glyph,
    hdr_bytes,
    mnist_reference,
    notebook_photo,
    photo,
    png_bytes,
    png_header_only,
    thin_glyph,
)


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


@pytest.mark.parametrize("line_grey", [170.0, 150.0, 130.0, 110.0])
def test_thin_pen_digit_on_lined_notebook_paper_is_found(line_grey: float, tmp_path: Path) -> None:
    """Issue 16, item 1: a phone photo (2048x1562 JPEG) of a thin blue-pen digit between grey
    ruled lines a third of its height apart, running across the page. The 28x28 input must
    be the digit, not one ruled line (a bar) or a block of lines."""
    rng = np.random.default_rng(16)
    for digit in range(10):
        glyph = thin_glyph(digit)
        path = tmp_path / f"{digit}.jpg"
        _, buf = cv2.imencode(".jpg", notebook_photo(glyph, rng, line_grey=line_grey))
        path.write_bytes(buf.tobytes())
        out = prepare_file(path).image
        assert out is not None, f"{digit}: no ink found"
        assert iou(out, mnist_reference(glyph), level=64) > 0.4, digit
        rows = np.flatnonzero(out.max(1) >= 64)
        assert rows[-1] - rows[0] + 1 >= MNIST_BOX - 2, f"{digit}: not the digit's height"


def test_dense_dark_ruled_lines_need_the_stacked_line_rule(tmp_path: Path) -> None:
    """Lines a third of a small digit apart merge into thick runs at the line search's 1/4
    scale: without checking them at full size (Steps(stacked_lines=False)) they stay ink."""
    rng = np.random.default_rng(16)
    glyph = thin_glyph(7)
    path = tmp_path / "7.jpg"
    path.write_bytes(cv2.imencode(".jpg", notebook_photo(glyph, rng, line_grey=110.0))[1].tobytes())
    src = load_image(path)
    ref = mnist_reference(glyph)
    assert iou(to_mnist(src), ref, level=64) > 0.4
    former = to_mnist(src, steps=Steps(stacked_lines=False))
    assert former is None or iou(former, ref, level=64) < 0.4


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


def test_28px_photo_on_grey_paper_is_flattened_not_passed_through() -> None:
    """A 28x28 photo of a digit on grey paper has MNIST's geometry but not its black paper:
    passed through, the network would see a grey field it never trained on."""
    ref = REFERENCES[5]
    # grey paper, dark pen: inverted, the paper stays at 55, under the ink level (64) that
    # the MNIST-like check measures the digit's box with
    paper, ink = 200, 40
    photo_28 = np.clip(paper - ref.astype(np.float32) * (paper - ink) / 255, 0, 255)
    photo_28 = photo_28.astype(np.uint8)
    assert not is_near_mnist(255 - photo_28)
    out = to_mnist(photo_28)
    assert out is not None
    assert np.median(out) == 0  # paper mapped to black
    assert iou(out, ref) > 0.6  # and the digit is still the digit


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


# --------------------------------------------------------------------------- robustness rules
# Each rule is shown on a rendered case that comes out wrong with the rule switched off
# (Steps), and right with the default pipeline.


def four_with_long_bar(size: int = 160, ruled: bool = False) -> np.ndarray:
    """(size, size) a hand-drawn-like "4": its bar spans 110 px (69% of the width)."""
    img = np.full((size, size), 235, np.uint8)
    if ruled:  # grey lines from edge to edge, crossing the diagonal and the stem
        for y in (8, 60, 130):
            cv2.line(img, (0, y), (size - 1, y), 150, 2)
    cv2.line(img, (100, 20), (30, 100), 30, 4, cv2.LINE_AA)  # diagonal
    cv2.line(img, (30, 100), (140, 100), 30, 4, cv2.LINE_AA)  # bar
    cv2.line(img, (110, 40), (110, 150), 30, 4, cv2.LINE_AA)  # stem
    return img


def longest_row_run(img: np.ndarray, level: int = 128) -> int:
    """The longest horizontal run of ink (>= level) in any row of a 28x28 image."""
    best = 0
    for row in img >= level:
        padded = np.concatenate(([0], row.view(np.uint8), [0]))
        edges = np.flatnonzero(np.diff(padded))
        if edges.size:
            best = max(best, int((edges[1::2] - edges[::2]).max()))
    return best


def ink_aspect(img: np.ndarray, level: int = 128) -> float:
    """Height / width of the box of a 28x28 image's ink (>= level)."""
    rows, cols = np.flatnonzero(img.max(1) >= level), np.flatnonzero(img.max(0) >= level)
    return (rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1)


def stroke_width_28(img: np.ndarray) -> float:
    """Median stroke width (px) of a 28x28 image: ink >= 128 at 8x, 2 x ridge distance - 1."""
    up = (cv2.resize(img, (224, 224), interpolation=cv2.INTER_LINEAR) >= 128).astype(np.uint8)
    dist = cv2.distanceTransform(
        cv2.copyMakeBorder(up, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), cv2.DIST_L2, 5
    )
    ridge = (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8))) & (dist > 0)
    return float(np.median(2 * dist[ridge] - 1)) / 8 if ridge.any() else 0.0


def test_steps_default_is_the_pipeline() -> None:
    img = photo(big_glyph(4), np.random.default_rng(11), (240, 320), lines=True)
    assert np.array_equal(to_mnist(img), to_mnist(img, steps=Steps()))
    with pytest.raises(ValueError, match="lines"):
        Steps(lines="sometimes")


def test_digit_bar_spanning_half_the_image_is_kept() -> None:
    """A long straight stroke ending where the digit does is the digit's, not a ruled line."""
    img = four_with_long_bar()
    bar = MNIST_BOX * 110 // 150 - 2  # the bar's length at 28x28, less its rounded ends
    assert longest_row_run(to_mnist(img)) >= bar
    # the former rule took every long thin run for a line: the 4 lost its bar
    assert longest_row_run(to_mnist(img, steps=Steps(lines=LINES_ANY))) < bar // 2


def test_ruled_lines_across_the_image_are_removed_and_the_bar_kept() -> None:
    clean = to_mnist(four_with_long_bar())
    ruled = to_mnist(four_with_long_bar(ruled=True))
    assert iou(ruled, clean) > 0.8


def test_lone_stroke_spanning_the_image_is_a_one() -> None:
    """One straight run with no other ink is not ruled paper (lines come in families)."""
    img = np.full((200, 200), 240, np.uint8)
    cv2.line(img, (100, 5), (102, 195), 20, 3)  # the stem, 95% of the height
    cv2.line(img, (100, 5), (80, 30), 20, 3)  # a short flag

    assert ink_aspect(to_mnist(img)) > 2.5  # a tall "1"
    # the former rule took the stem for a line: the flag was all that was left
    old = to_mnist(img, steps=Steps(lines=LINES_ANY))
    assert old is None or ink_aspect(old) < 1.5


def _on_paper(cover: np.ndarray, paper: tuple[float, ...], ink: tuple[float, ...], noise: float):
    """(h, w, 3) uint8 BGR: ink over paper by coverage (h, w) in 0..1, plus gray noise."""
    rng = np.random.default_rng(7)
    p, k = np.array(paper, np.float32), np.array(ink, np.float32)
    img = p * (1 - cover[..., None]) + k * cover[..., None]
    img += rng.normal(0, noise, cover.shape)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _glyph_cover(digit: int, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """(h, w) float32 coverage: a printed digit 120 px high in the middle."""
    cover = np.zeros(size, np.float32)
    glyph = cv2.resize(big_glyph(digit), (120, 120), interpolation=cv2.INTER_AREA)
    y, x = (size[0] - 120) // 2, (size[1] - 120) // 2
    cover[y : y + 120, x : x + 120] = glyph
    return cover


def test_faint_blue_ink_is_found() -> None:
    """Contrast 20 in gray (blue ballpoint, pale) on paper with noise: ink by the noise floor."""
    img = _on_paper(_glyph_cover(3), (235, 235, 235), (225, 215, 200), noise=2.0)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert 235 - int(np.median(gray[gray < 225])) <= 25  # the stroke is that faint in gray
    out = to_mnist(img)
    assert out is not None and nearest_digit(out) == 3
    assert to_mnist(img, steps=Steps(noise_floor=False)) is None  # the fixed floor of 40


def test_red_ink_on_green_paper_is_found() -> None:
    """Same luminance (gray 83 both): only the colour channels show the digit."""
    img = _on_paper(_glyph_cover(3), (30, 120, 30), (20, 20, 230), noise=3.0)
    lum = cv2.cvtColor(np.array([[[30, 120, 30], [20, 20, 230]]], np.uint8), cv2.COLOR_BGR2GRAY)
    assert abs(int(lum[0, 0]) - int(lum[0, 1])) <= 1
    out = to_mnist(img)
    assert out is not None and nearest_digit(out) == 3
    assert to_mnist(img, steps=Steps(colour=False)) is None


def test_dark_digit_among_bright_scribbles_stays_gray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gray shows the grey digit well: the blue channel, where yellow scribbles are
    blacker than the digit (more contrast), must not replace it."""
    cover = _glyph_cover(4)
    clean = _on_paper(cover, (255, 255, 255), (110, 110, 110), noise=1.0)
    img = clean.copy()
    for y in range(10, 240, 45):  # zigzag scribbles: no long straight runs (not lines)
        pts = np.array([(x, y + 25 * ((x // 40) % 2)) for x in range(0, 321, 40)], np.int32)
        cv2.polylines(img, [pts], False, (0, 255, 255), 9)
    img[cover > 0.5] = (110, 110, 110)
    reference = to_mnist(clean)
    assert iou(to_mnist(img), reference) > 0.7
    # without the rule, the channel with the most contrast wins: the scribbles
    monkeypatch.setattr(preprocess, "COLOUR_GRAY_ENOUGH", math.inf)
    assert iou(to_mnist(img), reference) < 0.5


def test_thin_strokes_get_mnist_width() -> None:
    """A 1 px ring in a 200 px drawing: a hairline at 28x28 unless dilated to MNIST's width."""
    img = np.full((200, 200), 250, np.uint8)
    cv2.ellipse(img, (100, 100), (45, 75), 0, 0, 360, 10, 1, cv2.LINE_8)
    lo, hi = STROKE_RANGE
    assert lo <= stroke_width_28(to_mnist(img)) <= hi
    assert stroke_width_28(to_mnist(img, steps=Steps(stroke_width=False))) < lo


def test_marker_strokes_are_thinned_and_loops_open() -> None:
    """A 0 in marker that nearly fills its hole: eroded to within MNIST's range, hole wider."""
    img = np.full((160, 160), 250, np.uint8)
    cv2.ellipse(img, (80, 80), (45, 62), 0, 0, 360, 10, 56, cv2.LINE_AA)
    out, plain = to_mnist(img), to_mnist(img, steps=Steps(stroke_width=False))
    assert stroke_width_28(plain) > STROKE_RANGE[1]
    assert stroke_width_28(out) <= STROKE_RANGE[1]

    def hole(x: np.ndarray) -> int:  # paper pixels inside the ring's box
        rows, cols = np.flatnonzero(x.max(1) >= 128), np.flatnonzero(x.max(0) >= 128)
        return int((x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] < 64).sum())

    assert hole(out) > hole(plain)


def test_thin_ink_on_shaded_paper_despite_the_polarity_guess() -> None:
    """A shadow (dark tail) and glare (bright tail) fool the histogram's polarity guess."""
    h = w = 320
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    shade = 190 - 18 / (1 + np.exp((xx - 40) / 6))  # soft shadow along the left edge
    shade += 45 * np.exp(-((xx - w) ** 2 + yy**2) / (2 * 70.0**2))  # soft glare, top right
    ring = np.zeros((h, w), np.uint8)
    cv2.ellipse(ring, (180, 170), (45, 75), 0, 0, 360, 255, 1, cv2.LINE_AA)
    cover = ring.astype(np.float32) / 255
    noise = np.random.default_rng(3).normal(0, 1.5, (h, w))

    def draw(paper: np.ndarray) -> np.ndarray:
        return np.clip(paper * (1 - cover) + 60 * cover + noise, 0, 255).astype(np.uint8)

    img = draw(shade)
    lo, med, hi = np.percentile(img, [1, 50, 99])
    assert med < (lo + hi) / 2  # the guess: ink is bright (wrong)
    clean = to_mnist(draw(np.full((h, w), 190, np.float32)))
    out = to_mnist(img)
    assert out is not None and ink_box_side(out, level=128) >= MNIST_BOX - 1
    assert abs(ink_aspect(out) - ink_aspect(clean)) < 0.2  # the same ring ...
    assert out[12:17, 12:17].max() < 64  # ... with its hole (1 px shifts aside)
    assert to_mnist(img, steps=Steps(noise_floor=False)) is None


@pytest.mark.parametrize("shade", ["vignette", "lamp spot", "noisy vignette", "blotches"])
def test_smooth_shading_has_no_ink(shade: str) -> None:
    """What the flattening leaves of uneven lighting is not ink: it has no edges."""
    h, w = 240, 320
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    r2 = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)
    img = {
        "vignette": 240 - 150 * r2**1.5,
        "lamp spot": 150 + 80 * np.exp(-((xx - 80) ** 2 + (yy - 60) ** 2) / (2 * 40.0**2)),
        "noisy vignette": 220 - 60 * r2**2 + rng.normal(0, 6, (h, w)),
        "blotches": 200 + 4 * cv2.GaussianBlur(rng.normal(0, 40, (h, w)), (0, 0), 12),
    }[shade]
    assert to_mnist(np.clip(img, 0, 255).astype(np.uint8)) is None


def test_line_search_finds_nothing_on_blank_paper() -> None:
    """No phantom runs: OpenCV's erosion border (255) drew one at a corner for tilted lines."""
    from tasks.preprocess import _line_runs

    assert _line_runs(np.zeros((240, 320), bool)) == []


def test_colour_is_decoded_within_bounds(tmp_path: Path) -> None:
    """load_image keeps BGR (alpha onto white); a colour JPEG's 3 channels count in its bound."""
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., 2] = 200  # red where opaque
    rgba[20:40, 30:50, 3] = 255  # only a square is opaque
    path = tmp_path / "rgba.png"
    path.write_bytes(png_bytes(rgba))
    img = load_image(path)
    assert img.shape == (60, 80, 3)
    assert (img[0, 0] == 255).all() and tuple(img[30, 40]) == (0, 0, 200)
    assert load_gray(path).shape == (60, 80)

    bgr = _on_paper(_glyph_cover(5, (1200, 1600)), (230, 230, 230), (200, 60, 20), noise=2.0)
    ok, buf = cv2.imencode(".jpg", bgr)
    assert ok
    header = read_header(buf.tobytes())
    assert header is not None and header.channels == 3
    assert decode_bytes(header) == 2 * 1200 * 1600 * 3
    jpg = tmp_path / "colour.jpg"
    jpg.write_bytes(buf.tobytes())
    img = load_image(jpg, max_pixels=200_000, max_side=4096)  # decoded at 1/4, in colour
    assert img.shape == (300, 400, 3)
    assert nearest_digit(to_mnist(img)) == 5
    assert prepare_file(jpg).status == "ok"


# --------------------------------------------------------------------------- decoding


def test_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    """Transparent pixels are paper even when their colour bytes are black."""
    ink = big_glyph(4)
    rgba = np.zeros((BIG, BIG, 4), np.uint8)  # BGR all black everywhere
    rgba[..., 3] = (ink * 255).astype(np.uint8)  # only the digit is opaque
    path = tmp_path / "alpha.png"
    path.write_bytes(png_bytes(rgba))
    gray = load_gray(path)
    assert gray[0, 0] == 255 and gray.min() < 10  # paper white, digit black
    assert nearest_digit(to_mnist(gray)) == 4


def test_16_bit_images_read_like_8_bit(tmp_path: Path) -> None:
    img8 = photo(big_glyph(6), np.random.default_rng(2), (240, 320))
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(img8.astype(np.uint16) * 257))
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
    hdr = cv2.imdecode(np.frombuffer(hdr_bytes(200, 100), np.uint8), cv2.IMREAD_UNCHANGED)
    assert hdr.shape == (100, 200, 3) and hdr.dtype == np.float32 and np.all(hdr == 0.5)
    strip = bytes(range(60))
    tiff = cv2.imdecode(np.frombuffer(_bigtiff_bytes(10, 6, strip), np.uint8), -1)
    assert tiff.shape == (6, 10) and tiff.tobytes() == strip
    header = read_header(_bigtiff_bytes(10, 6, strip))
    assert header is not None and (header.format, header.width, header.height) == ("tiff", 10, 6)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("huge.hdr", hdr_bytes(8000, 8000, False), "too large: 8000x8000 HDR (64 MP"),
        # 16 MP: under the pixel limit, but float32 RGB and a copy: 384 MB to decode
        ("big.hdr", hdr_bytes(4000, 4000, False), "too large: 4000x4000 HDR (16 MP, ~384 MB"),
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
    rgba16.write_bytes(png_header_only(5000, 5000, depth=16, colour=6))
    with pytest.raises(ImageError, match=r"too large: 5000x5000 PNG \(25 MP, ~400 MB"):
        load_gray(rgba16)
    gray8 = tmp_path / "gray8.png"
    gray8.write_bytes(png_header_only(5000, 5000))
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
    path.write_bytes(hdr_bytes(8000, 8000))
    code = (
        "import os, re, sys\n"
        "from pathlib import Path\n"
        "import tasks.preprocess as pp\n"
        "import tasks.decode\n"
        "assert 'cv2' in sys.modules\n"
        "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])\n"
        "tasks.decode.read_header = lambda data: None\n"
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


def test_huge_png_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(20000, 20000))  # would be 400 MB decoded
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
    path.write_bytes(png_bytes(255 - REFERENCES[8]))
    result = prepare_file(path)
    assert result.status == "ok" and np.array_equal(result.image, REFERENCES[8])


def test_blank_file_is_empty_not_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.png"
    path.write_bytes(png_bytes(np.full((60, 80), 250, np.uint8)))
    result = prepare_file(path)
    assert (result.status, result.image) == ("empty", None)
    assert "no ink" in result.message


def test_no_preprocess_only_resizes(tmp_path: Path) -> None:
    img = photo(big_glyph(0), np.random.default_rng(4), (120, 160))
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(img))
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
        "from tasks.decode import load_gray\n"
        "from tasks.preprocess import to_mnist\n"
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
