"""The matrix view: leaves ↔ batches of [out, in] matrices in the reference's (torch nn.Linear) orientation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamerging_jax.core.matrix_view import Matrix, MatrixView, from_matrices, map_matrices, to_matrices
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.models import clip, efficientnet, llama

import method_fixtures


@pytest.mark.parametrize("shape, spec, matrix_shape", [
    ((3, 5, 7), Matrix(transpose=True), (1, 3, 7, 5)),             # Dense kernel [in, out]
    ((3, 4, 5, 7), Matrix(transpose=True, layers=True), (4, 3, 7, 5)),
    ((3, 1, 1, 5, 7), Matrix(transpose=True), (1, 3, 7, 5)),       # 1×1 conv HWIO
    ((3, 5, 7), Matrix(transpose=False), (1, 3, 5, 7)),            # embedding table as stored
])
def test_round_trip_and_orientation(shape, spec, matrix_shape):
    leaf = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    matrices = to_matrices(leaf, spec)
    assert matrices.shape == matrix_shape
    np.testing.assert_array_equal(from_matrices(matrices, spec, shape), leaf)
    k, layer = 2, matrix_shape[0] - 1
    per_layer = leaf[k, layer] if spec.layers else leaf[k]
    expected = per_layer.reshape(-1, shape[-1]).T if spec.transpose else per_layer
    np.testing.assert_array_equal(matrices[layer, k], expected)
    theta = leaf[0]
    np.testing.assert_array_equal(from_matrices(to_matrices(theta, spec, task_axis=False), spec, theta.shape,
                                                task_axis=False), theta)


def test_clip_view_is_the_hf_linear_weight(x64):
    """On the tiny HF CLIP of the method fixtures: each layer's q weight as torch holds it, the position table
    as stored; the patch convolution, biases and norms are not matrices."""
    pretrained, _, _ = method_fixtures.models()
    state = method_fixtures.hf_tensors(pretrained)
    q = to_matrices(pretrained["layers"]["attn"]["q"]["kernel"], clip.matrix_view.matrix("layers/attn/q/kernel"),
                    task_axis=False)
    np.testing.assert_array_equal(q[1], state["encoder.layers.1.self_attn.q_proj.weight"])
    assert set(clip.matrix_view.matrices(pretrained)) == {
        "pos_embedding", *(f"layers/{m}/kernel" for m in ["attn/q", "attn/k", "attn/v", "attn/out", "mlp/fc1", "mlp/fc2"])}


def test_efficientnet_and_llama_views():
    params, _ = efficientnet.init(jax.random.key(0))
    pointwise = efficientnet.matrix_view.matrices(params)
    assert "head/conv/kernel" in pointwise and "block_01/expand/conv/kernel" in pointwise
    assert "stem/conv/kernel" not in pointwise and "block_01/depthwise/conv/kernel" not in pointwise
    shapes = {path: np.shape(leaf) for path, leaf in named_leaves(params)}
    assert all(shapes[path][:2] == (1, 1) for path in pointwise)
    assert {path for path, shape in shapes.items() if shape[:2] == (1, 1) and len(shape) == 4} == set(pointwise)
    assert llama.matrix_view.matrix("layers/mlp/down/kernel") == Matrix(transpose=True, layers=True)
    assert llama.matrix_view.matrix("embed") == Matrix(transpose=False)
    assert llama.matrix_view.matrix("layers/input_norm/scale") is None


def test_map_matrices_runs_per_layer_and_leaves_the_rest_to_otherwise():
    rng = np.random.default_rng(0)
    pretrained = {"w": jnp.asarray(rng.normal(size=(2, 4, 3))), "b": jnp.asarray(rng.normal(size=(3,)))}
    tau = {"w": jnp.asarray(rng.normal(size=(5, 2, 4, 3))), "b": jnp.asarray(rng.normal(size=(5, 3)))}
    view = MatrixView.stored_2d(pretrained, stacked=lambda path: path == "w")
    merged = map_matrices(lambda t, p: p + t[0] @ t[1].T @ t[2], lambda t, p: p + t.sum(0), pretrained, tau, view)
    for layer in range(2):
        w = tau["w"][:, layer].swapaxes(-1, -2)  # [K, out, in]
        expected = pretrained["w"][layer].T + w[0] @ w[1].T @ w[2]
        np.testing.assert_allclose(merged["w"][layer], expected.T, rtol=1e-6)
    np.testing.assert_allclose(merged["b"], pretrained["b"] + tau["b"].sum(0), rtol=1e-6)
