"""The adaptation batch sampler (shapes, shuffling, determinism, resume) and the evaluation iterator."""
import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data.clip_preprocess import CLIP_MEAN, CLIP_STD
from adamerging_jax.data.clip_preprocess import normalize as clip_normalize
from adamerging_jax.data.clip_preprocess import preprocess as clip_preprocess
from adamerging_jax.data.clip_preprocess import resize_crop as clip_resize_crop
from adamerging_jax.data.pipeline import AdaptationBatches, CachedSource, evaluation_batches


def _task(size, task_id, shape=(6, 5, 3)):
    """Images whose every pixel encodes (task, index): image i of task t is filled with 10 t + i."""
    return [(np.full(shape, 10 * task_id + i, np.uint8), i % 3) for i in range(size)]


def _identity(image):
    return image.astype(np.float32)


def _ids(images):
    """Back from pixels to the global id 10 t + i of each image in a [..., H, W, C] array."""
    return images[..., 0, 0, 0].astype(int)


@pytest.fixture
def sampler():
    sources = [_task(8, 0), _task(5, 1), _task(9, 2)]
    return AdaptationBatches(sources, batch_size=4, n_batches=2, seed=3, preprocess=_identity, num_threads=2)


def test_shapes_and_images_match_the_indices(sampler):
    steps = list(sampler.batches(0, 3))
    assert [s for s, _ in steps] == [0, 1, 2]
    for step, images in steps:
        assert images.shape == (3, 2, 4, 6, 5, 3) and images.dtype == np.float32
        expected = sampler.indices(step) + 10 * np.arange(3)[:, None, None]
        np.testing.assert_array_equal(_ids(images), expected)


def test_each_epoch_visits_every_image_once_in_shuffled_order(sampler):
    stream = np.concatenate([sampler.indices(s)[0].ravel() for s in range(4)])  # task 0: 32 = 4 epochs of 8
    epochs = stream.reshape(4, 8)
    for epoch in epochs:
        assert sorted(epoch) == list(range(8))
    assert any((epoch != np.arange(8)).any() for epoch in epochs)  # shuffled
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    small = np.concatenate([sampler.indices(s)[1].ravel() for s in range(5)]).reshape(8, 5)  # task 1: N=5
    for epoch in small:
        assert sorted(epoch) == list(range(5))  # epochs cross step boundaries without repeats


def test_deterministic_per_seed_and_seed_matters(sampler):
    again = AdaptationBatches(sampler.sources, 4, 2, seed=3, preprocess=_identity)
    other = AdaptationBatches(sampler.sources, 4, 2, seed=4, preprocess=_identity)
    for step in range(3):
        np.testing.assert_array_equal(sampler.indices(step), again.indices(step))
    assert any((sampler.indices(s) != other.indices(s)).any() for s in range(3))
    # tasks of equal size get different orders
    twins = AdaptationBatches([_task(8, 0), _task(8, 1)], 8, 1, seed=0, preprocess=_identity)
    assert (twins.indices(0)[0] != twins.indices(0)[1]).any()


def test_resume_from_a_step_gives_the_uninterrupted_batches(sampler):
    full = dict(sampler.batches(0, 6))
    resumed = dict(AdaptationBatches(sampler.sources, 4, 2, seed=3, preprocess=_identity).batches(4, 2))
    assert sorted(resumed) == [4, 5]
    for step, images in resumed.items():
        np.testing.assert_array_equal(images, full[step])


def test_one_batch_per_task_preset():
    sampler = AdaptationBatches([_task(20, 0), _task(20, 1)], batch_size=16, n_batches=1, preprocess=_identity)
    (step, images), = list(sampler.batches(5, 1))  # positions 80..95: inside epoch 4
    assert step == 5 and images.shape == (2, 1, 16, 6, 5, 3)
    assert len(set(_ids(images[0]).ravel())) == 16  # no repeats inside a batch within one epoch


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task 1"):
        AdaptationBatches([_task(3, 0), []], preprocess=_identity)
    with pytest.raises(ValueError, match="batch_size"):
        AdaptationBatches([_task(3, 0)], batch_size=0, preprocess=_identity)


def test_evaluation_batches_cover_the_set_in_order_with_labels():
    source = _task(7, 4)
    batches = list(evaluation_batches(source, 3, _identity, num_threads=2))
    assert [len(labels) for _, labels in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([_ids(x) for x, _ in batches]), 40 + np.arange(7))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(7) % 3)
    with pytest.raises(ValueError, match="empty"):
        next(evaluation_batches([], 3, _identity))


def test_evaluation_batches_feed_the_core_evaluate():
    import adamerging_jax as aj
    import jax

    source = _task(7, 0)  # image i is filled with i, label i % 3
    predict_mod_3 = lambda p, x, t: jax.nn.one_hot(x[:, 0, 0, 0].astype(int) % 3, 3) * p["scale"]  # noqa: E731
    accuracy = aj.evaluate(predict_mod_3, {"scale": 1.0}, [evaluation_batches(source, 4, _identity)], batch_size=4)
    assert accuracy.per_task["0"] == 1.0  # 7 of 7, the padded last batch not counted


def test_clip_preprocess_against_the_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # short side 20 -> 16, long 30 -> int(16 * 1.5) = 24
    resized = np.asarray(Image.fromarray(image).resize((24, 16), Image.BICUBIC), np.float64)
    window = resized[:, 4:20]  # left = round((24 - 16) / 2) = 4
    expected = (window / 255.0 - CLIP_MEAN) / CLIP_STD
    out = clip_preprocess(image, size=16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    tall = rng.integers(0, 256, (33, 16, 3), dtype=np.uint8)  # already short side 16: crop rows round(17/2) = 8
    np.testing.assert_allclose(clip_preprocess(tall, 16), (tall[8:24] / 255.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-5, atol=1e-5)


def test_split_preprocessing_equals_the_whole():
    image = np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    crop = clip_resize_crop(image, 16)
    assert crop.dtype == np.uint8 and crop.shape == (16, 16, 3)
    np.testing.assert_allclose(clip_normalize(crop.astype(np.float32)), clip_preprocess(image, 16), rtol=1e-6)


def test_cached_source_reads_each_image_once():
    reads = []

    class Counting:
        def __len__(self):
            return 3

        def __getitem__(self, index):
            reads.append(index)
            return np.full((20, 24, 3), index, np.uint8), index

    cached = CachedSource(Counting(), lambda image: clip_resize_crop(image, 8))
    sampler = AdaptationBatches([cached], batch_size=3, n_batches=1, preprocess=lambda x: x.astype(np.float32), num_threads=1)
    steps = dict(sampler.batches(0, 4))
    assert sorted(reads) == [0, 1, 2]  # 12 visits, 3 reads
    assert steps[3].shape == (1, 1, 3, 8, 8, 3)
    np.testing.assert_array_equal(cached[2][0], np.full((8, 8, 3), 2, np.uint8))


def test_callable_protocol_of_the_optimiser_prefetches_and_resumes(sampler):
    expected = dict(sampler.batches(0, 5))
    fresh = AdaptationBatches(sampler.sources, 4, 2, seed=3, preprocess=_identity, num_threads=2)
    for step in (0, 1, 2, 4, 3):  # sequential, then a jump (resume) and a jump back
        per_task = fresh(step)
        assert len(per_task) == 3 and per_task[0].shape == (8, 6, 5, 3)
        for task, images in enumerate(per_task):
            np.testing.assert_array_equal(images, expected[step][task].reshape(8, 6, 5, 3))


def test_the_optimiser_sees_the_sampler_batches():
    """adamerging(..., batches=sampler): the step-0 loss is the entropy, in numpy, of the sampler's step-0 batches."""
    import adamerging_jax as aj
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    sources = [[(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), 0) for _ in range(10)] for _ in range(2)]
    pretrained = {"w": rng.normal(size=(48, 3)).astype(np.float32)}
    finetuned = [{"w": pretrained["w"] + rng.normal(size=(48, 3)).astype(np.float32)} for _ in range(2)]
    scale = lambda image: image.astype(np.float32) / 255  # noqa: E731
    sampler = AdaptationBatches(sources, batch_size=4, n_batches=2, seed=5, preprocess=scale, num_threads=2)
    config = aj.AdaMergingConfig(steps=2, batches_per_task=2, batch_size=4, granularity="task", init_value=0.3)
    result = aj.adamerging(
        lambda p, x, t: x.reshape(x.shape[0], -1) @ p["w"], {"w": jnp.asarray(pretrained["w"])},
        aj.task_vectors({"w": jnp.asarray(pretrained["w"])}, [{"w": jnp.asarray(f["w"])} for f in finetuned]),
        sampler, config,
    )
    merged = pretrained["w"] + 0.3 * sum(f["w"] - pretrained["w"] for f in finetuned)
    for task in range(2):
        logits = (sampler.batches(0, 1).__next__()[1][task].reshape(8, -1)).astype(np.float64) @ merged
        log_p = logits - logits.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        entropy = -(np.exp(log_p) * log_p).sum(1).mean() * 2  # n = 2 batch means per task
        np.testing.assert_allclose(result.history["loss"][0, task], entropy, rtol=1e-4)


def test_fingerprint_changes_with_what_decides_the_batches(sampler):
    """Same settings and images → same fingerprint; another seed, batch size, length or pixel → another one;
    thread counts do not matter."""
    same = AdaptationBatches(sampler.sources, 4, 2, seed=3, preprocess=_identity, num_threads=5, prefetch=1)
    assert same.fingerprint() == sampler.fingerprint()
    edited = [list(s) for s in sampler.sources]
    image, label = edited[1][4]
    edited[1][4] = (image + 1, label)  # the last image of task 1: one of the sampled examples
    others = [
        AdaptationBatches(sampler.sources, 4, 2, seed=4, preprocess=_identity),
        AdaptationBatches(sampler.sources, 2, 2, seed=3, preprocess=_identity),
        AdaptationBatches(sampler.sources, 4, 1, seed=3, preprocess=_identity),
        AdaptationBatches(sampler.sources[:2] + [sampler.sources[2][:8]], 4, 2, seed=3, preprocess=_identity),
        AdaptationBatches(edited, 4, 2, seed=3, preprocess=_identity),
        AdaptationBatches(sampler.sources, 4, 2, seed=3, preprocess=clip_preprocess),
    ]
    fingerprints = {sampler.fingerprint()} | {other.fingerprint() for other in others}
    assert len(fingerprints) == 1 + len(others)


SLOW_READS = """
import sys, time
import numpy as np
from adamerging_jax.data.pipeline import AdaptationBatches

class SlowSource:  # every read takes 0.5 s, as a huge image's decode would take longer
    def __len__(self):
        return 6

    def __getitem__(self, index):
        time.sleep(0.5)
        return np.zeros((2, 2, 3), np.uint8), 0

batches = AdaptationBatches([SlowSource(), SlowSource()], batch_size=2, n_batches=1, preprocess=np.float32,
                            num_threads=2)
with batches:
    batches(0)
    batches(1)
print("last step served", flush=True)
"""


def test_closing_the_batches_ends_the_reading_ahead_so_the_process_exits_at_once():
    """Python joins a thread pool's threads at exit after their queued work: reads queued ahead of steps that
    will never run kept a finished process alive (minutes with huge images). Closed, each thread ends after
    the read it is in. Without the close: 4 steps' worth of reads (16 × 0.5 s over 2 threads, ≈ 4 s); with it
    at most one read per thread (0.5 s)."""
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", SLOW_READS], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "last step served"
    served = time.monotonic()
    process.wait(timeout=60)
    assert process.returncode == 0
    assert time.monotonic() - served < 2.5, "the process went on reading after its last step"
