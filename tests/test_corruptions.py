"""The 7 ImageNet-C corruptions against their formulas, and their determinism."""
import io

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data.corruptions import (
    CONTRAST,
    CORRUPTIONS,
    GAUSSIAN_NOISE,
    IMPULSE_NOISE,
    JPEG_QUALITY,
    MUD_RGB,
    CorruptedSource,
    corrupt,
    equalize_histogram,
    linear_motion_blur,
    motion_blur_kernel,
)


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(64, 64, 3)), 0), 1)  # a smooth, image-like field
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


@pytest.mark.parametrize("severity", [1, 3])
def test_gaussian_noise_statistics(severity):
    grey = np.full((200, 200, 3), 128, np.uint8)
    out = corrupt(grey, "gaussian_noise", severity, seed=0).astype(np.float64)
    noise = out / 255.0 - 128 / 255.0
    c = GAUSSIAN_NOISE[severity - 1]
    # truncation to uint8 lowers each value by U(0, 1)/255 on average 0.5/255 and adds 1/(255 sqrt 12) spread
    assert abs(noise.mean() + 0.5 / 255) < 4 * c / np.sqrt(noise.size)
    assert abs(noise.std() - c) < 0.02 * c


def test_impulse_noise_fraction_and_balance():
    grey = np.full((100, 100, 3), 128, np.uint8)
    for severity in (1, 5):
        out = corrupt(grey, "impulse_noise", severity, seed=1)
        salt, pepper = (out == 255).mean(), (out == 0).mean()
        amount = IMPULSE_NOISE[severity - 1]
        assert abs(salt + pepper - amount) < 5 * np.sqrt(amount / out.size) + 1e-3
        assert abs(salt - pepper) < 0.25 * amount
        assert ((out == 0) | (out == 255) | (out == 128)).all()  # untouched values stay


def test_contrast_formula(photo):
    for severity in range(1, 6):
        x = photo / 255.0
        mean = x.reshape(-1, 3).mean(0)
        expected = (np.clip((x - mean) * CONTRAST[severity - 1] + mean, 0, 1) * 255).astype(np.uint8)
        got = corrupt(photo, "contrast", severity)
        assert np.abs(got.astype(int) - expected).max() <= 1  # float32 vs float64 at truncation boundaries
        assert got.std() < photo.std()


def test_jpeg_round_trip_at_the_severity_quality(photo):
    errors = []
    for severity in range(1, 6):
        got = corrupt(photo, "jpeg_compression", severity)
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
        np.testing.assert_array_equal(got, np.asarray(Image.open(buffer)))
        errors.append(np.abs(got.astype(int) - photo).mean())
    assert errors[0] < errors[-1]  # quality 25 loses less than quality 7


def test_pixelate_is_a_box_downsample_then_box_upsample():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    got = corrupt(image, "pixelate", 2)  # factor 0.5: 2 x 2 blocks
    blocks = image.reshape(4, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3))
    expected = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    assert np.abs(got - expected).max() <= 1  # PIL's fixed-point box filter rounds the block mean
    assert (got[0::2] == got[1::2]).all() and (got[:, 0::2] == got[:, 1::2]).all()  # constant 2 x 2 blocks


def test_motion_blur_kernel_and_a_point_spreading_along_the_angle():
    kernel = motion_blur_kernel(7, 2.0)
    np.testing.assert_allclose(kernel, np.exp(-np.arange(7) ** 2 / 8.0) / np.exp(-np.arange(7) ** 2 / 8.0).sum())
    point = np.zeros((21, 21, 3))
    point[10, 10] = 1.0
    horizontal = linear_motion_blur(point, radius=3, sigma=2.0, angle=0.0)
    # out[y, x] = sum_i k_i image[y, x + i]: the point appears at x = 10 - i with weight k_i
    np.testing.assert_allclose(horizontal[10, 4:11, 0], kernel[::-1])
    assert horizontal.sum() == pytest.approx(3.0)  # mass kept (3 channels), nothing outside row 10
    assert np.abs(horizontal[np.arange(21) != 10]).max() == 0
    diagonal = linear_motion_blur(point, radius=3, sigma=2.0, angle=45.0)
    assert diagonal[9, 9, 0] > 0 and diagonal[10, 9, 0] == 0  # spreads along the diagonal
    flat = np.full((16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(corrupt(flat, "motion_blur", 5, seed=0), flat)  # kernel sums to one


def test_spatter_only_adds_water_or_blends_mud(photo):
    for severity in (1, 2, 3):
        out = corrupt(photo, "spatter", severity, seed=4).astype(int)
        assert (out >= photo.astype(int) - 1).all()  # water brightens: x + m colour, m >= 0
    grey = np.full((96, 96, 3), 200, np.uint8)
    for severity in (4, 5):
        out = corrupt(grey, "spatter", severity, seed=5).astype(np.float64) / 255
        changed = (out != 200 / 255).any(-1)
        assert changed.any() and not changed.all()
        # each changed pixel lies on the segment from the grey to the mud colour: x (1 - m) + mud m
        m = (200 / 255 - out[changed, 0]) / (200 / 255 - MUD_RGB[0])
        expected = (200 / 255) * (1 - m[:, None]) + MUD_RGB * m[:, None]
        assert np.abs(out[changed] - expected).max() < 2 / 255
        assert (m >= 0.8 - 2 / 255).all()  # mask values below 0.8 were zeroed


def test_equalize_histogram_spreads_to_the_full_range():
    gray = np.array([[10, 10, 20, 30]], np.uint8)
    np.testing.assert_array_equal(equalize_histogram(gray), [[0, 0, 128, 255]])  # cdf 2, 3, 4 -> 0, 127.5, 255


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_deterministic_per_seed(name, photo):
    first = corrupt(photo, name, 3, seed=7)
    np.testing.assert_array_equal(first, corrupt(photo, name, 3, seed=7))
    assert first.shape == photo.shape and first.dtype == np.uint8
    if name in ("gaussian_noise", "impulse_noise", "spatter", "motion_blur"):
        assert (first != corrupt(photo, name, 3, seed=8)).any()
    assert (first != photo).any()


def test_bad_arguments_are_named(photo):
    with pytest.raises(ValueError, match="fog"):
        corrupt(photo, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(photo, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(photo.astype(np.float32), "contrast", 1)


def test_corrupted_source_is_order_independent(photo):
    source = [(photo, 0), (photo[::-1].copy(), 1)]
    corrupted = CorruptedSource(source, "gaussian_noise", 2, seed=3, size=32)
    second_first = corrupted[1]
    first = corrupted[0]
    assert first[0].shape == (32, 32, 3) and first[1] == 0 and second_first[1] == 1
    np.testing.assert_array_equal(second_first[0], corrupted[1][0])
    assert (first[0] != corrupted[1][0]).any()
    with pytest.raises(ValueError, match="severity"):
        CorruptedSource(source, "contrast", 0)
