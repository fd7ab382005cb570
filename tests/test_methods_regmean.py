"""RegMean and RegMean++ against FusionBench 0.2.33 (tests/fixtures/methods/regmean*.npz, made by
scripts/make_method_fixtures.py with ``RegMeanAlgorithmForCLIP`` / ``RegMeanAlgorithmForCLIPPlusPlus``) on the tiny
float64 CLIP image tower and the fixture's unlabeled images: the Gram matrices our capture gives, checked apart
from the solve, and the merged weights through the registry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_fixtures import VIEW, max_difference, merged, models, read, tower

import adamerging_jax as am
from adamerging_jax.core import regmean as core_regmean
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.models import clip, efficientnet

TINY = clip.VisionConfig(image_size=16, patch_size=8, width=24, layers=2, heads=2, mlp_dim=40)
"""The fixture script's ``tiny_clip_vision``."""
GRAMS = clip.vision_grams(TINY)
HF_MODULE = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
             "attn/out": "self_attn.out_proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
BOUND = 1e-10


def images(name: str) -> list[np.ndarray]:
    """Each task's unlabeled images as the reference saw them, NHWC."""
    arrays = read(name)
    count = sum(key.startswith("images/") for key in arrays)
    return [arrays[f"images/task{t}"].transpose(0, 2, 3, 1) for t in range(count)]


def reference_gram(arrays: dict[str, np.ndarray], task: int, layer: int, path: str) -> np.ndarray:
    """The reference's Gram matrix of our kernel leaf ``layers/attn/q/kernel`` in `layer`, for `task`."""
    module = HF_MODULE[path.removeprefix("layers/").removesuffix("/kernel")]
    return arrays[f"gram/task{task}/encoder.layers.{layer}.{module}"]


def finetuned(pretrained: dict, tau: dict, task: int) -> dict:
    return jax.tree_util.tree_map(lambda theta, t: theta + t[task], pretrained, tau)


def context(batches, gram_fn=GRAMS) -> am.AdaptContext:
    return am.AdaptContext(apply_fn=None, batches=batches, config=am.AdaMergingConfig(), gram_fn=gram_fn)


def two_steps(per_task: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The images as an iterable source of two steps, half of each task's images per step."""
    return [[x[: len(x) // 2] for x in per_task], [x[len(x) // 2:] for x in per_task]]


def test_the_gram_capture_is_fusionbench_s(x64):
    """G_k = XᵀX / n of every Dense input of θ_k on task k's images, one forward per task: FusionBench's hooks."""
    pretrained, tau, count = models()
    arrays, capture, worst = read("regmean"), jax.jit(GRAMS), 0.0
    for task, x in enumerate(images("regmean")):
        grams = capture(finetuned(pretrained, tau, task), x)
        assert set(grams) == {f"layers/{p}/kernel" for p in HF_MODULE}
        for path, stacked in grams.items():
            assert stacked.shape[0] == TINY.layers and stacked.dtype == jnp.float64
            for layer in range(TINY.layers):
                worst = max(worst, float(np.abs(stacked[layer] - reference_gram(arrays, task, layer, path)).max()))
    print(f"RegMean Gram matrices: max |ours − FusionBench| = {worst:.2e}")
    assert worst <= BOUND


def test_regmean_is_fusionbench_s(x64):
    """The registry's ``regmean`` (batches read in two steps, joined per task) equals RegMean's merged model."""
    pretrained, tau, _ = models()
    spec = am.method_spec("regmean", num_regmean_examples=len(images("regmean")[0]))
    ours = spec.build(pretrained, tau, context(two_steps(images("regmean"))), view=VIEW).params
    difference = max_difference(ours, merged("regmean"))
    print(f"RegMean merged weights: max |ours − FusionBench| = {difference:.2e}")
    assert difference <= BOUND


def test_the_staged_gram_capture_is_fusionbench_s(x64):
    """RegMean++'s Gram matrices: model k's block l on task k's inputs after the reference's merged stem and
    merged blocks < l."""
    pretrained, tau, _ = models()
    arrays = read("regmean_plusplus")
    reference = tower(merged("regmean_plusplus"))
    stem, block = jax.jit(GRAMS.stem), jax.jit(GRAMS.block)
    worst = 0.0
    for task, x in enumerate(images("regmean_plusplus")):
        hidden = stem(reference, x)
        own = finetuned(pretrained, tau, task)
        for layer in range(TINY.layers):
            _, grams = block(jax.tree_util.tree_map(lambda leaf: leaf[layer], own["layers"]), hidden)
            for path, gram in grams.items():
                worst = max(worst, float(np.abs(gram - reference_gram(arrays, task, layer, f"layers/{path}")).max()))
            hidden, _ = block(jax.tree_util.tree_map(lambda leaf: leaf[layer], reference["layers"]), hidden)
    print(f"RegMean++ Gram matrices: max |ours − FusionBench| = {worst:.2e}")
    assert worst <= BOUND


def test_regmean_plusplus_is_fusionbench_s(x64):
    """The registry's ``regmean_plusplus`` (one jitted scan over the blocks) equals RegMean++'s merged model,
    post-LayerNorm left at θ0 as the reference leaves it."""
    pretrained, tau, _ = models()
    spec = am.method_spec("regmean_plusplus", num_regmean_examples=len(images("regmean_plusplus")[0]))
    ours = spec.build(pretrained, tau, context(two_steps(images("regmean_plusplus"))), view=VIEW).params
    difference = max_difference(ours, merged("regmean_plusplus"))
    print(f"RegMean++ merged weights: max |ours − FusionBench| = {difference:.2e}")
    assert difference <= BOUND
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, ours["post_ln"], pretrained["post_ln"]))


def test_unlabeled_inputs_are_whole_batches_up_to_the_example_count():
    """As FusionBench's loop: whole batches until a task has ≥ num_regmean_examples, the source read no further."""
    calls = []

    def source(step: int) -> list[np.ndarray]:
        calls.append(step)
        return [np.full((6, 2), 10 * task + step) for task in range(2)]

    joined = core_regmean.unlabeled_inputs("regmean", source, 2, 16)
    assert calls == [0, 1, 2]
    assert [x.shape for x in joined] == [(18, 2), (18, 2)]
    np.testing.assert_array_equal(joined[1][:, 0], np.repeat([10, 11, 12], 6))
    with pytest.raises(ValueError, match="method 'regmean': step 0 gives batches for 1 tasks, K = 2"):
        core_regmean.unlabeled_inputs("regmean", [[np.ones((1, 2))]], 2, 16)


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
@pytest.mark.parametrize("parameter, value", [("reduce_non_diagonal_ratio", 1.5), ("reduce_non_diagonal_ratio", -0.1),
                                              ("reduce_non_diagonal_ratio", "high"), ("num_regmean_examples", 0),
                                              ("num_regmean_examples", 2.5)])
def test_bad_parameters_are_refused(method, parameter, value):
    with pytest.raises(ValueError, match=f"method '{method}': parameter '{parameter}'"):
        am.method_spec(method, **{parameter: value})


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_without_data_or_gram_capture_it_is_refused(method):
    pretrained, tau = {"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2, 2))}
    spec = am.method_spec(method)
    view = MatrixView.stored_2d(pretrained)
    with pytest.raises(ValueError, match=f"method '{method}' learns from unlabeled data"):
        spec.build(pretrained, tau, view=view)
    with pytest.raises(ValueError, match=f"method '{method}' computes Gram matrices on unlabeled inputs: no batches"):
        spec.build(pretrained, tau, context(None), view=view)
    with pytest.raises(ValueError, match=f"method '{method}' needs the binding's Gram capture: AdaptContext.gram_fn"):
        spec.build(pretrained, tau, context([[np.ones((1, 2))] * 2], gram_fn=None), view=view)
    with pytest.raises(ValueError, match=f"method '{method}' reads each weight matrix: the binding declares no matrix view"):
        spec.build(pretrained, tau, context([[np.ones((1, 2))] * 2]), view=None)


def test_regmean_plusplus_needs_the_staged_capture():
    """A plain ``gram_fn`` (e.g. EfficientNet's, whose blocks are not stacked) serves RegMean, not RegMean++."""
    plain = context([[np.ones((1, 2))] * 2], gram_fn=lambda params, x: {})
    with pytest.raises(ValueError, match="method 'regmean_plusplus' merges block by block"):
        am.method_spec("regmean_plusplus").build({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2, 2))}, plain, view=VIEW)


def test_an_input_no_example_reaches_takes_the_average_and_a_dependent_one_is_refused(x64):
    """Feature 2 of 3 is zero on every example (a dead channel): its column of W* (row of the Flax kernel) is the
    task average, the other two the RegMean solve of their own block, written out in numpy. Two identical live
    inputs with no off-diagonal reduction leave Σ_k G_k singular: refused, naming the leaf."""
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(3, 4))                   # Flax [in, out]
    tau = rng.normal(size=(2, 3, 4))
    inputs = [rng.normal(size=(6, 3)) * np.array([1.0, 1.0, 0.0]) for _ in range(2)]
    grams = [x.T @ x / len(x) for x in inputs]
    weights = [(kernel + tau[k]).T for k in range(2)]  # torch [out, in]
    live = slice(0, 2)
    expected = np.linalg.solve(sum(g[live, live] for g in grams), sum(g[live, live] @ w[:, live].T for g, w in
                                                                      zip(grams, weights))).T
    dead_inputs = context([[jnp.asarray(x) for x in inputs]], gram_fn=lambda params, x: {"w": x.T @ x / x.shape[0]})
    merged = am.method_spec("regmean", reduce_non_diagonal_ratio=1.0, num_regmean_examples=6).build(
        {"w": jnp.asarray(kernel)}, {"w": jnp.asarray(tau)}, dead_inputs, view=MatrixView.stored_2d({"w": kernel}))
    merged_torch = np.asarray(merged.params["w"]).T
    np.testing.assert_allclose(merged_torch[:, live], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged_torch[:, 2], (weights[0][:, 2] + weights[1][:, 2]) / 2, rtol=1e-12, atol=1e-12)

    pretrained, dependent = {"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2, 2))}
    same = context([[np.ones((1, 2))] * 2], gram_fn=lambda params, x: {"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"method 'regmean': the summed Gram matrices of \['w'\] are singular"):
        am.method_spec("regmean", reduce_non_diagonal_ratio=1.0).build(
            pretrained, dependent, same, view=MatrixView.stored_2d(pretrained))


def test_the_ordinary_forward_computes_no_gram_matrix():
    """The sown Gram matrices cost nothing unless asked for: the plain forward's program has six matmuls per
    block fewer than the capture's (q, k, v, out, fc1, fc2)."""
    params = clip.init_params(clip.ClipConfig(TINY), jax.random.key(0))["vision"]
    x = jnp.zeros((1, TINY.image_size, TINY.image_size, 3))

    def matmuls(function) -> int:
        return str(jax.make_jaxpr(function)(params, x)).count("dot_general")

    assert matmuls(lambda p, i: clip.vision_forward(p, i, TINY)) == matmuls(GRAMS) - len(HF_MODULE)


def test_efficientnet_gram_capture_covers_its_pointwise_convolutions():
    """EfficientNet's ``gram_fn``: one Gram matrix per 1×1 convolution of its matrix view, each the mean outer
    product of the input pixels (block 1's expand conv reads block 0's output)."""
    config = efficientnet.EfficientNetConfig(stages=(efficientnet.StageSpec(1, 3, 1, 1, 8),
                                                     efficientnet.StageSpec(1, 3, 2, 2, 8)),
                                             stem_channels=8, head_channels=16)
    params, batch_stats = efficientnet.init(jax.random.key(0), config, resolution=16)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    grams = jax.jit(efficientnet.gram_fn(batch_stats, config))(params, x)
    assert set(grams) == set(efficientnet.matrix_view.matrices(params))
    block_0_output = jax.jit(lambda p, i: efficientnet.EfficientNetLite(config).apply(
        {"params": p, "batch_stats": batch_stats}, i, capture_intermediates=lambda m, _: m.name == "block_00",
        mutable=["intermediates"])[1]["intermediates"]["block_00"]["__call__"][0])
    pixels = block_0_output(params, x).reshape(-1, 8)
    expected = pixels.T @ pixels / len(pixels)
    np.testing.assert_allclose(grams["block_01/expand/conv/kernel"], expected, rtol=1e-5, atol=1e-6)
