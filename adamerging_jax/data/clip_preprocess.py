"""CLIP image preprocessing (OpenAI CLIP's ``_transform``, transformers' ``CLIPImageProcessor``).

    RGB → resize so the shorter side is ``size`` (bicubic, PIL; the longer side int(size · long / short))
        → center crop size × size (offset (extent − size) // 2) → x / 255 → (x − mean) / std

with mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711). Output is
float32 HWC (channels last, the layout of ``adamerging_jax.models.clip``).
"""
from __future__ import annotations


import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 array [H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    return Image.fromarray(array).convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that min(H, W) = size, keeping the aspect ratio (long side rounded down)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central size × size window of an [H, W, C] array (top/left offsets rounded down)."""
    height, width = array.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {height}x{width} image")
    top, left = (height - size) // 2, (width - size) // 2
    return array[top:top + size, left:left + size]


def resize_crop(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """The geometric half: one image → uint8 [size, size, 3] (4× fewer bytes to ship than float32)."""
    return center_crop(np.asarray(resize_shorter_side(to_pil_rgb(image), size)), size)


def normalize(images):
    """The photometric half, for numpy or jax arrays [..., 3]: x / 255, then (x − mean) / std per channel."""
    return (images / 255.0 - CLIP_MEAN) / CLIP_STD


def preprocess(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """One image → float32 [size, size, 3], CLIP-normalised."""
    return normalize(resize_crop(image, size).astype(np.float32)).astype(np.float32)
