"""The 7 image corruptions of AdaMerging's robustness experiment, after ImageNet-C.

Definitions and severity constants from Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations" (ICLR 2019), reference code ``ImageNet-C/create_c/make_imagenet_c.py``
(github.com/hendrycks/robustness).  Each corruption maps uint8 [H, W, 3] to uint8 [H, W, 3] at a severity
1..5 and draws its randomness from a ``numpy.random.Generator``; as in the reference, the float result in
[0, 255] is truncated to uint8 (``np.uint8``).  With x = image / 255:

- gaussian_noise:  clip(x + N(0, c^2)), c = .08, .12, .18, .26, .38
- impulse_noise:   salt-and-pepper on a fraction c of the values (half 0, half 1), c = .03, .06, .09, .17, .27
                   (skimage ``random_noise(mode="s&p")``, as the reference)
- contrast:        clip((x - m) c + m), m the per-channel mean over the image, c = .4, .3, .2, .1, .05
- jpeg_compression: JPEG encode/decode at quality c = 25, 18, 15, 10, 7
- pixelate:        box-downsample to (c W, c H), box-upsample back, c = .6, .5, .4, .3, .25
- motion_blur:     (radius, sigma) = (10, 3), (15, 5), (15, 8), (15, 12), (20, 15), angle ~ U(-45, 45) degrees.
                   The reference calls ImageMagick's MotionBlurImage (through Wand); this module uses the
                   ImageMagick-free re-implementation of the ``imagecorruptions`` package (Michaelis et al.
                   2019): the average of the image shifted by 0..2 radius pixels along the angle, weighted by a
                   one-sided Gaussian exp(-i^2 / 2 sigma^2) normalised to sum 1, borders replicated.  (imagecorruptions
                   stops at shifts longer than the image, which darkens images smaller than 2 radius + 1
                   pixels; we keep replicating the border so the weights always sum to one.  Same result on
                   ImageNet-C's 224 x 224 inputs.)
- spatter:         liquid layer L = gaussian_blur(N(c0, c1^2), c2), zeroed below c3.  Mud (severity 4, 5):
                   mask M = blur(L > c3, c4), zeroed below 0.8; out = x (1 - M) + mud_colour M.  Water
                   (severity 1..3): out = x + c4 (L D / max(L D)) water_colour, with D the reference's
                   edge-distance texture.  The reference builds D with OpenCV (Canny, distanceTransform,
                   equalizeHist, an emboss filter); here with skimage's Canny (no pre-smoothing), scipy's exact
                   Euclidean distance transform and a numpy histogram equalisation, so water spatter matches
                   the reference in kind, not pixel for pixel.

Determinism: :func:`corrupt` takes a seed; :class:`CorruptedSource` seeds image ``i`` with ``[seed, i]``.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.feature import canny
from skimage.filters import gaussian
from skimage.util import random_noise

from adamerging_jax.data.clip_preprocess import resize_crop

SEVERITIES = (1, 2, 3, 4, 5)

GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
SPATTER = (
    (0.65, 0.3, 4, 0.69, 0.6, 0),
    (0.65, 0.3, 3, 0.68, 0.6, 0),
    (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1),
    (0.67, 0.4, 1, 0.65, 1.5, 1),
)
WATER_RGB = np.array([175, 238, 238], np.float32) / 255.0
MUD_RGB = np.array([63, 42, 20], np.float32) / 255.0


def _unit(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"corruptions take uint8 [H, W, 3] images, got {image.dtype} {image.shape}")
    return image.astype(np.float32) / 255.0


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """clip to [0, 1], scale to [0, 255], truncate (the reference's ``np.uint8``)."""
    return (np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    return _to_uint8(x + rng.normal(scale=GAUSSIAN_NOISE[severity - 1], size=x.shape))


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(random_noise(_unit(image), mode="s&p", amount=IMPULSE_NOISE[severity - 1], rng=rng))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng  # deterministic
    x = _unit(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - mean) * CONTRAST[severity - 1] + mean)


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng  # deterministic
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng  # deterministic
    height, width = image.shape[:2]
    factor = PIXELATE[severity - 1]
    small = Image.fromarray(np.asarray(image, np.uint8)).resize((int(width * factor), int(height * factor)), Image.BOX)
    return np.asarray(small.resize((width, height), Image.BOX))


def motion_blur_kernel(width: int, sigma: float) -> np.ndarray:
    """One-sided Gaussian weights exp(-i^2 / 2 sigma^2), i = 0..width-1, normalised to sum 1."""
    weights = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    return weights / weights.sum()


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """out[y, x] = image[y - dy, x - dx], indices clamped to the border (edge replication)."""
    rows = np.clip(np.arange(image.shape[0]) - dy, 0, image.shape[0] - 1)
    cols = np.clip(np.arange(image.shape[1]) - dx, 0, image.shape[1] - 1)
    return image[rows][:, cols]


def linear_motion_blur(image: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Sum over i of kernel[i] * image shifted by -round(i (cos a, sin a)) (a in degrees); float out."""
    width = 2 * radius + 1
    kernel = motion_blur_kernel(width, sigma)
    direction = (math.sin(math.radians(angle)), math.cos(math.radians(angle)))
    blurred = np.zeros(image.shape, np.float64)
    for i, weight in enumerate(kernel):
        dy = -math.ceil(i * direction[0] - 0.5)
        dx = -math.ceil(i * direction[1] - 0.5)
        blurred += weight * _shift(image.astype(np.float64), dx, dy)
    return blurred


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = MOTION_BLUR[severity - 1]
    blurred = linear_motion_blur(np.asarray(image, np.uint8), radius, sigma, rng.uniform(-45, 45))
    return np.clip(blurred, 0, 255).astype(np.uint8)


def equalize_histogram(gray: np.ndarray) -> np.ndarray:
    """OpenCV's ``equalizeHist`` on uint8: lut = round(255 (cdf - cdf_min) / (N - cdf_min))."""
    cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256))
    cdf_min = cdf[np.flatnonzero(cdf)[0]]
    if cdf[-1] == cdf_min:  # a single grey level
        return gray.copy()
    lut = np.round(255.0 * (cdf - cdf_min) / (cdf[-1] - cdf_min)).clip(0, 255).astype(np.uint8)
    return lut[gray]


def _water_texture(liquid: np.ndarray) -> np.ndarray:
    """The reference's D: distance to liquid edges, truncated at 20, blurred, equalised, embossed, blurred."""
    edges = canny((liquid * 255).astype(np.uint8).astype(np.float64), sigma=0.0, low_threshold=50, high_threshold=150)
    distance = np.minimum(ndimage.distance_transform_edt(~edges), 20.0)
    distance = ndimage.uniform_filter(distance, size=3, mode="mirror").astype(np.uint8)
    distance = equalize_histogram(distance)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float64)
    distance = np.clip(ndimage.correlate(distance.astype(np.float64), emboss, mode="mirror"), 0, 255).astype(np.uint8)
    return ndimage.uniform_filter(distance.astype(np.float32), size=3, mode="mirror")


def spatter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, sigma, threshold, strength, mud = SPATTER[severity - 1]
    x = _unit(image)
    liquid = gaussian(rng.normal(loc=loc, scale=scale, size=x.shape[:2]), sigma=sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        layer = liquid * _water_texture(liquid)
        peak = layer.max()
        layer = layer / peak * strength if peak > 0 else layer
        return _to_uint8(x + layer[..., None] * WATER_RGB)
    mask = gaussian((liquid > threshold).astype(np.float32), sigma=strength)
    mask[mask < 0.8] = 0
    return _to_uint8(x * (1 - mask[..., None]) + MUD_RGB * mask[..., None])


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "motion_blur": motion_blur,
    "impulse_noise": impulse_noise,
    "gaussian_noise": gaussian_noise,
    "pixelate": pixelate,
    "spatter": spatter,
    "contrast": contrast,
    "jpeg_compression": jpeg_compression,
}
"""The 7 corruptions of AdaMerging's Table 5, in the paper's order."""


def corrupt(image: np.ndarray, name: str, severity: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Corruption ``name`` at ``severity`` (1..5) of a uint8 [H, W, 3] image, randomness from ``seed``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; the corruptions are {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be one of {SEVERITIES}, got {severity!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return CORRUPTIONS[name](np.asarray(image), severity, rng)


class CorruptedSource:
    """A source of ``(corrupted image, label)``: image ``i`` resized (short side ``size``), centre-cropped to
    ``size`` x ``size`` as ImageNet-C's 224 x 224 inputs (``size=None`` keeps the image as is), then
    corrupted with the generator ``default_rng([seed, i])`` -- deterministic and independent of read order."""

    def __init__(self, source, name: str, severity: int, seed: int = 0, size: int | None = 224):
        corrupt(np.zeros((8, 8, 3), np.uint8), name, severity)  # validates name and severity up front
        self.source, self.name, self.severity, self.seed, self.size = source, name, severity, seed, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.source[index]
        if self.size is not None:
            image = resize_crop(np.asarray(image, np.uint8), self.size)
        return corrupt(image, self.name, self.severity, np.random.default_rng([self.seed, index])), label
