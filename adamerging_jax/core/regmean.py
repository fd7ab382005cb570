"""RegMean and RegMean++: each linear layer merged by the closed-form regression mean over the Gram matrices of
its inputs.

RegMean (Jin, Ren, Preotiuc-Pietro and Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023). A linear layer y = W x with weight W_k ∈ R^{out × in} in fine-tuned model k, and G_k = X_kᵀX_k / n_k
the Gram matrix of the n_k rows of its inputs under model k on task k's unlabeled inputs (examples × tokens):

    W* = argmin_W Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²  =  [ (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ ]ᵀ,
    G̃_k = α G_k + (1 − α) diag(G_k)        (off-diagonal entries scaled by α = ``reduce_non_diagonal_ratio``).

Every other leaf (biases, norms, embeddings, convolutions with a spatial extent) is the simple average of the
fine-tuned models, θ0 + (1/K) Σ_k τ_k. No labels are used.

RegMean++ (Nguyen, Huu-Tien, Suzuki and Nguyen, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", arXiv:2508.03121, 2025) merges block by block: the stem (embeddings and
the LayerNorm before the blocks) is averaged first, and block l's Gram matrices G_k are those of model k's
block l on task k's inputs after the MERGED stem and the MERGED blocks < l. As FusionBench 0.2.33 does, the
leaves after the blocks (CLIP's post-LayerNorm) stay θ0's.

The binding supplies the Gram matrices (``GramFn``): ``gram_fn(params, inputs) -> {leaf path: G}`` with G of
shape ``[(L,) in, in]`` for every weight matrix of the binding's `MatrixView` that is a linear layer, in one
forward pass. RegMean++ needs its staged form (`LayerwiseGrams`: stem, one block, the stacked blocks' key).
Per task, the normal-equation terms (G̃_k, G̃_k W_kᵀ) are summed as the Gram matrices arrive, so memory does not
grow with K; the solve is vmapped over the stacked layers. Sums and solves run in at least float32
(`trees.accumulation_dtype`) at full matmul precision; the result has θ0's dtypes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.matrix_view import (Matrix, MatrixView, from_matrices, requires_view,
                                             to_matrices)
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked
from adamerging_jax.core.trees import PyTree, accumulation_dtype, map_with_path, named_leaves

GramFn = Callable[[PyTree, Any], dict[str, jax.Array]]
"""``gram_fn(params, inputs) -> {leaf path: G [(L,) in, in]}``: the input Gram matrix of every linear layer."""

Statistics = dict[str, tuple[jax.Array, jax.Array]]
"""Per leaf path: (Σ_k G̃_k ``[L', in, in]``, Σ_k G̃_k W_kᵀ ``[L', in, out]``)."""

HIGHEST = jax.lax.Precision.HIGHEST


@runtime_checkable
class LayerwiseGrams(Protocol):
    """A binding's Gram capture run stage by stage, for RegMean++.

    ``params[layers]`` holds the blocks stacked on a leading axis L; the leaves ``stem_leaf`` names feed
    ``stem(params, inputs) -> hidden``, the input of block 0; ``block(block_params, hidden) -> (hidden, grams)``
    runs one block (its parameters without the L axis) and gives its Gram matrices keyed by paths inside the
    block. Called as a `GramFn`, it gives the whole model's in one pass.
    """

    layers: str

    def __call__(self, params: PyTree, inputs: Any) -> dict[str, jax.Array]: ...

    def stem_leaf(self, path: str) -> bool: ...

    def stem(self, params: PyTree, inputs: Any) -> jax.Array: ...

    def block(self, block_params: PyTree, hidden: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...


# --- one matrix ------------------------------------------------------------------------------------------------

def reduce_off_diagonal(gram: jax.Array, ratio: float | jax.Array) -> jax.Array:
    """G̃ = α G + (1 − α) diag(G): the off-diagonal entries scaled by α, the diagonal kept."""
    return jnp.where(jnp.eye(gram.shape[-1], dtype=bool), gram, ratio * gram)


def regmean_terms(gram: jax.Array, weight: jax.Array, ratio: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """One task's terms of the normal equations of one layer: (G̃, G̃ Wᵀ) for G [in, in] and W [out, in]."""
    reduced = reduce_off_diagonal(gram, ratio)
    return reduced, jnp.matmul(reduced, weight.T, precision=HIGHEST)


def solve_regmean(gram_sum: jax.Array, product_sum: jax.Array, mean_weight: jax.Array) -> jax.Array:
    """W* = [(Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ]ᵀ ∈ R^{out × in}.

    An input feature j that is zero on every example of every task (a dead ReLU channel: row and column j of
    Σ_k G̃_k are zero) leaves column j of W* undetermined by the data; it takes the task average's column,
    (1/K) Σ_k W_k[:, j] (`mean_weight`), and the other columns are the RegMean solution unchanged (the system
    splits: a unit diagonal and the average's row stand in for feature j's zero row)."""
    dead = jnp.diagonal(gram_sum) == 0
    gram = gram_sum + jnp.diag(dead.astype(gram_sum.dtype))
    product = jnp.where(dead[:, None], mean_weight.T.astype(product_sum.dtype), product_sum)
    return jnp.linalg.solve(gram, product).T


# --- a tree ----------------------------------------------------------------------------------------------------

def _spec(view: MatrixView, path: str) -> Matrix:
    spec = view.matrix(path)
    if spec is None:
        raise ValueError(f"the Gram capture gives a Gram matrix for {path!r}, which the matrix view does not call "
                         "a weight matrix")
    return spec


def task_statistics(pretrained: PyTree, task_vector: PyTree, grams: dict[str, jax.Array], view: MatrixView,
                    ratio: float | jax.Array) -> Statistics:
    """Task k's terms (G̃_k, G̃_k W_kᵀ) of every leaf with a Gram matrix, W_k = θ0 + τ_k (`task_vector`: τ_k
    alone, θ0's shapes), vmapped over the layers of a stacked leaf."""
    pretrained_leaves, task_leaves = dict(named_leaves(pretrained)), dict(named_leaves(task_vector))
    statistics = {}
    for path, gram in grams.items():
        if path not in pretrained_leaves:
            raise ValueError(f"the Gram capture gives a Gram matrix for {path!r}, which the parameters do not hold")
        spec, theta, tau = _spec(view, path), pretrained_leaves[path], task_leaves[path]
        dtype = accumulation_dtype(theta.dtype, tau.dtype, gram.dtype)
        weights = to_matrices(theta.astype(dtype) + tau.astype(dtype), spec, task_axis=False)  # [L', out, in]
        layers, _, width = weights.shape
        expected = (layers, width, width) if spec.layers else (width, width)
        if gram.shape != expected:
            raise ValueError(f"the Gram matrix of {path!r} has shape {gram.shape}; its layer's input needs {expected}")
        statistics[path] = jax.vmap(regmean_terms, (0, 0, None))(
            gram.astype(dtype).reshape(layers, width, width), weights, ratio)
    return statistics


def add_statistics(total: Statistics | None, more: Statistics) -> Statistics:
    """Σ over tasks, one task at a time (``total`` None: the first)."""
    return more if total is None else jax.tree_util.tree_map(jnp.add, total, more)


def merge_statistics(pretrained: PyTree, task_vectors: PyTree, statistics: Statistics, view: MatrixView) -> PyTree:
    """The merged tree: W* = `solve_regmean` for every leaf with statistics, the mean θ0 + (1/K) Σ_k τ_k for the
    rest (and for a matrix's columns that no example reaches); θ0's dtypes."""

    def merge_leaf(path: str, theta: jax.Array, tau: jax.Array) -> jax.Array:
        dtype = accumulation_dtype(theta.dtype, tau.dtype)
        mean = theta.astype(dtype) + jnp.mean(tau.astype(dtype), axis=0)
        if path in statistics:
            spec = _spec(view, path)
            solved = jax.vmap(solve_regmean)(*statistics[path], to_matrices(mean, spec, task_axis=False))
            return from_matrices(solved, spec, theta.shape, task_axis=False).astype(theta.dtype)
        return mean.astype(theta.dtype)

    return map_with_path(merge_leaf, pretrained, task_vectors)


def _task(task_vectors: PyTree, task: int | jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda tau: tau[task], task_vectors)


def _check_inputs(inputs: Sequence[Any], count: int) -> None:
    if len(inputs) != count:
        raise ValueError(f"RegMean needs one input set per task: got {len(inputs)} for K = {count} task vectors")


# --- RegMean ---------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("gram_fn", "view"))
def _statistics_of_task(pretrained: PyTree, task_vectors: PyTree, task: jax.Array, inputs: Any, ratio: jax.Array,
                        *, gram_fn: GramFn, view: MatrixView) -> Statistics:
    task_vector = _task(task_vectors, task)
    grams = gram_fn(add_to_pretrained(pretrained, task_vector), inputs)
    return task_statistics(pretrained, task_vector, grams, view, ratio)


_merge_statistics = jax.jit(merge_statistics, static_argnames="view")


def regmean(pretrained: PyTree, task_vectors: PyTree, inputs: Sequence[Any], gram_fn: GramFn, view: MatrixView,
            reduce_non_diagonal_ratio: float = 0.95) -> PyTree:
    """RegMean (module docstring): G_k = ``gram_fn(θ0 + τ_k, inputs[k])``, one jitted pass per task, its terms
    summed, then every matrix solved. `inputs`: task k's unlabeled inputs, all in one batch."""
    _check_inputs(inputs, check_stacked(pretrained, task_vectors))
    total = None
    for task, task_inputs in enumerate(inputs):
        total = add_statistics(total, _statistics_of_task(pretrained, task_vectors, task, task_inputs,
                                                          reduce_non_diagonal_ratio, gram_fn=gram_fn, view=view))
    return _merge_statistics(pretrained, task_vectors, total, view=view)


# --- RegMean++ -------------------------------------------------------------------------------------------------

def _block_view(view: MatrixView, layers: str) -> MatrixView:
    """The view of one block's parameters (paths inside the block, no layer axis)."""

    def matrix(path: str) -> Matrix | None:
        spec = view.matrix(f"{layers}/{path}")
        return None if spec is None else dataclasses.replace(spec, layers=False)

    return MatrixView(matrix)


@functools.partial(jax.jit, static_argnames=("capture", "view"))
def regmean_plusplus(pretrained: PyTree, task_vectors: PyTree, inputs: Sequence[Any], capture: LayerwiseGrams,
                     view: MatrixView, reduce_non_diagonal_ratio: float | jax.Array = 0.95) -> PyTree:
    """RegMean++ (module docstring), jitted as a whole: a ``lax.scan`` over the stacked blocks carries every
    task's hidden states; at block l each task's Gram matrices come from its own fine-tuned block l, the block
    is merged, and the hidden states go on through the merged block. The stem is averaged; the leaves after
    the blocks stay θ0's."""
    _check_inputs(inputs, check_stacked(pretrained, task_vectors))
    layers, block_view = capture.layers, _block_view(view, capture.layers)
    average = merge_statistics(pretrained, task_vectors, {}, view)
    with_stem = map_with_path(lambda path, theta, mean: mean if capture.stem_leaf(path) else theta, pretrained, average)

    def merge_block(hidden: tuple[jax.Array, ...], block: tuple[PyTree, PyTree]):
        theta, taus = block
        total = None
        for task, task_hidden in enumerate(hidden):
            tau = _task(taus, task)
            _, grams = capture.block(add_to_pretrained(theta, tau), task_hidden)
            total = add_statistics(total, task_statistics(theta, tau, grams, block_view, reduce_non_diagonal_ratio))
        merged = merge_statistics(theta, taus, total, block_view)
        return tuple(capture.block(merged, task_hidden)[0] for task_hidden in hidden), merged

    hidden = tuple(capture.stem(with_stem, task_inputs) for task_inputs in inputs)
    per_layer_taus = jax.tree_util.tree_map(lambda tau: jnp.moveaxis(tau, 1, 0), task_vectors[layers])
    _, merged_blocks = jax.lax.scan(merge_block, hidden, (pretrained[layers], per_layer_taus))
    return {**with_stem, layers: merged_blocks}


# --- from a method's context -----------------------------------------------------------------------------------

def _batch_size(batch: Any) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def _steps(batches: Callable[[int], Sequence[Any]] | Iterable[Sequence[Any]]) -> Iterator[Sequence[Any]]:
    return map(batches, itertools.count()) if callable(batches) else iter(batches)


def unlabeled_inputs(method: str, batches: Any, count: int, examples: int) -> list[Any]:
    """Per task, its unlabeled batches joined into one: whole batches read step by step (``step -> [batch per
    task]`` or an iterable of such lists) until the task has at least `examples` examples (FusionBench likewise
    stops at the first batch that reaches ``num_regmean_examples``) or the source ends."""
    if batches is None:
        raise ValueError(f"method {method!r} computes Gram matrices on unlabeled inputs: no batches were given")
    taken: list[list[Any]] = [[] for _ in range(count)]
    seen = [0] * count
    for step, per_task in enumerate(_steps(batches)):
        if len(per_task) != count:
            raise ValueError(f"method {method!r}: step {step} gives batches for {len(per_task)} tasks, K = {count}")
        for task, batch in enumerate(per_task):
            if seen[task] < examples:
                size = _batch_size(batch)
                if not size:
                    raise ValueError(f"method {method!r}: step {step} gives task {task} an empty batch")
                taken[task].append(batch)
                seen[task] += size
        if min(seen) >= examples:
            break
    if not min(seen):
        raise ValueError(f"method {method!r}: the batch source ended before giving every task an example")
    return [jax.tree_util.tree_map(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *task_batches)
            for task_batches in taken]


def requires_gram(context: Any, view: MatrixView | None) -> str | None:
    """Why a binding cannot run RegMean (`MergeMethod.requires`): no Gram capture, or no matrix view."""
    if context is None or context.gram_fn is None:
        return ("needs the binding's Gram capture: AdaptContext.gram_fn is None (e.g. clip.vision_grams(variant) or "
                "efficientnet.gram_fn(batch_stats))")
    return requires_view(context, view)


def requires_layerwise(context: Any, view: MatrixView | None) -> str | None:
    """Why a binding cannot run RegMean++ (`MergeMethod.requires`): it needs the block-by-block Gram capture of
    a model whose blocks are stacked (`LayerwiseGrams`, e.g. CLIP's image tower)."""
    if (reason := requires_gram(context, view)) is not None:
        return reason
    if not isinstance(context.gram_fn, LayerwiseGrams):
        return ("merges block by block: AdaptContext.gram_fn must also give the staged capture (layers, stem_leaf, "
                "stem, block) of a model whose blocks are stacked, e.g. clip.vision_grams(variant)")
    return None


# --- as a registry method --------------------------------------------------------------------------------------

REGMEAN_PAPER = ("Jin, Ren, Preotiuc-Pietro and Cheng, Dataless Knowledge Fusion by Merging Weights of Language "
                 "Models, ICLR 2023")
REGMEAN_PLUSPLUS_PAPER = ("Nguyen, Huu-Tien, Suzuki and Nguyen, RegMean++: Enhancing Effectiveness and Generalization "
                          "of Regression Mean for Model Merging, arXiv:2508.03121, 2025")
PARAMETERS = (
    Parameter("reduce_non_diagonal_ratio", 0.95, "α: the Gram matrices' off-diagonal entries scaled by α "
              "(FusionBench's CLIP setting; 1: plain RegMean)", minimum=0.0, maximum=1.0),
    Parameter("num_regmean_examples", 256, "unlabeled examples per task for the Gram matrices (whole batches)",
              minimum=1),
)


def from_context(method: str, layerwise: bool, pretrained: PyTree, task_vectors: PyTree, context: Any, *,
                 view: MatrixView | None, reduce_non_diagonal_ratio: float, num_regmean_examples: int) -> PyTree:
    """RegMean (`layerwise` False) or RegMean++ from a method's `AdaptContext`: the batches of
    ``context.batches`` that make up `num_regmean_examples` examples per task and the binding's
    ``context.gram_fn``; a non-finite solve (a summed Gram matrix singular beyond dead inputs) is refused."""
    inputs = unlabeled_inputs(method, context.batches, check_stacked(pretrained, task_vectors), num_regmean_examples)
    merge = regmean_plusplus if layerwise else regmean
    merged = merge(pretrained, task_vectors, inputs, context.gram_fn, view, reduce_non_diagonal_ratio)
    singular = [path for path, leaf in named_leaves(merged) if not bool(jnp.isfinite(leaf).all())]
    if singular:
        raise ValueError(f"method {method!r}: the summed Gram matrices of {singular} are singular (linearly dependent "
                         "layer inputs on these examples): their solve is not finite; give more unlabeled examples "
                         "(num_regmean_examples) or a reduce_non_diagonal_ratio below 1")
    return merged
