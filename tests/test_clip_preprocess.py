"""CLIP preprocessing against transformers' CLIPImageProcessor (PIL backend) on scikit-image photos."""
import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import CLIPImageProcessorPil

from adamerging_jax.data.clip_preprocess import preprocess


def reference(image, size):
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


PHOTOS = {
    "astronaut": skimage.data.astronaut(),              # square
    "coffee": skimage.data.coffee(),                    # landscape
    "chelsea_portrait": skimage.data.chelsea().transpose(1, 0, 2)[:, :301],  # portrait, odd width
    "camera_gray": skimage.data.camera(),               # grayscale
    "small_digit": (skimage.data.coins()[100:128, 100:128]),  # 28x28, upsampled
}


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("size", [224, 48])
def test_matches_clip_image_processor(name, size):
    image = PHOTOS[name]
    ours = preprocess(image, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference(Image.fromarray(image), size), rtol=0, atol=1e-5)


def test_batch_and_pil_input():
    images = [PHOTOS["coffee"], Image.fromarray(PHOTOS["astronaut"])]
    batch = np.stack([preprocess(image, 64) for image in images])
    assert batch.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(batch[1], preprocess(PHOTOS["astronaut"], 64))


def test_rejects_float_arrays():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32))
