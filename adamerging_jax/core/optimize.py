"""The AdaMerging optimiser: learn λ by minimising prediction entropy on unlabeled test batches.

One step (Yang et al., ICLR 2024, Algorithm 1), jitted as one function:

    θ(λ) = θ0 + Σ_k clamp(λ_k) τ_k                         (merge)
    L(λ) = Σ_t n · mean_{x ∈ batch_t} H(softmax(f_θ(x, t)))  (entropy_objective)
    λ ← optax_update(∇_λ L, λ)

Only λ is trained; θ0, τ and the heads (inside `apply_fn`) are frozen. The step runs on a device mesh with
each task's batch sharded on its example axis; the result equals the single-device one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from adamerging_jax.core.checkpoint import RunCheckpointer, write_json_atomic, write_npz_atomic
from adamerging_jax.core.coefficients import Coefficients, Granularity, check_coefficients, init_coefficients
from adamerging_jax.core.merge import merge
from adamerging_jax.core.objective import ApplyFn, entropy_objective, task_entropy
from adamerging_jax.core.parallel import data_mesh, place_tree, replicated, shard_batches
from adamerging_jax.core.task_vectors import num_tasks
from adamerging_jax.core.trees import PyTree, check_same_structure

Batches = Sequence[Any]
BatchSource = Union[Callable[[int], Batches], Iterable[Batches]]


@dataclasses.dataclass(frozen=True)
class AdaMergingConfig:
    """Every knob of AdaMerging. `official()` and `fusionbench()` give the two reference settings.

    Attributes:
      steps: optimisation steps.
      granularity: "task" (task-wise), "layer" (layer-wise) or a function leaf path → group.
      init_value: initial λ for every task (0.3, the task-arithmetic prior).
      lr: Adam's learning rate (betas 0.9, 0.999, no weight decay) when `optimizer` is None.
      optimizer: any `optax.GradientTransformation` to use instead of Adam(lr).
      clamp: clip λ to (lo, hi) inside the merge; (0, 1) in the official code, None in FusionBench.
      entropy_eps: None for log_softmax entropy (official), 1e-8 for −Σ p log(p + eps) (FusionBench).
      batches_per_task: n, batches of `batch_size` per task per step; the data source yields n·B inputs per
        task and L_t counts n batch means (official: n = 2, B = 16).
      batch_size: B, for data sources built from this config.
      accumulate: "fused" differentiates Σ_t L_t at once; "per_task" runs the tasks one after another inside
        the jitted step, accumulating ∂L_t/∂θ, so only one task's activations are alive at a time, then takes
        one vector-Jacobian product through the merge.
      stacked: predicate on leaf path for leaves that stack layers (`lax.scan`), for per-layer λ.
      param_dtype: storage dtype of θ0 and τ on the device (e.g. "bfloat16" halves their memory).
      compute_dtype: dtype of the merged parameters the model runs in (default: `param_dtype` or θ0's).
        λ, the softmax and the loss stay in float32.
      shard_task_vectors: shard θ0 and τ along a parameter axis over the mesh instead of replicating them.
      checkpoint_dir, checkpoint_every: resumable run state (λ, optimiser state, step, history).
      seed: recorded with the run; data sources derive their shuffling from it.
      quiet: no progress bar.
    """

    steps: int = 500
    granularity: Granularity = "layer"
    init_value: float = 0.3
    lr: float = 1e-3
    optimizer: optax.GradientTransformation | None = None
    clamp: tuple[float, float] | None = (0.0, 1.0)
    entropy_eps: float | None = None
    batches_per_task: int = 2
    batch_size: int = 16
    accumulate: Literal["fused", "per_task"] = "fused"
    stacked: Callable[[str], bool] | None = None
    param_dtype: str | None = None
    compute_dtype: str | None = None
    shard_task_vectors: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    seed: int = 0
    quiet: bool = False

    @classmethod
    def official(cls, **overrides: Any) -> "AdaMergingConfig":
        """The official code (EnnengYang/AdaMerging): 500 steps, 2×16 per task, clamp [0, 1], no eps."""
        return cls(**{**dict(steps=500, batches_per_task=2, batch_size=16, clamp=(0.0, 1.0), entropy_eps=None), **overrides})

    @classmethod
    def fusionbench(cls, **overrides: Any) -> "AdaMergingConfig":
        """FusionBench 0.2.33: 1000 steps, 1×16 per task, per-task backward, no clamp, eps 1e-8."""
        defaults = dict(steps=1000, batches_per_task=1, batch_size=16, clamp=None, entropy_eps=1e-8, accumulate="per_task")
        return cls(**{**defaults, **overrides})

    def make_optimizer(self) -> optax.GradientTransformation:
        return self.optimizer if self.optimizer is not None else optax.adam(self.lr, b1=0.9, b2=0.999)

    def fingerprint(self, coefficients: Coefficients) -> str:
        """A digest of what a resumed run must share with the run that wrote the checkpoint."""
        fields = dict(
            init_value=self.init_value,
            lr=self.lr,
            custom_optimizer=self.optimizer is not None,
            clamp=self.clamp,
            entropy_eps=self.entropy_eps,
            batches_per_task=self.batches_per_task,
            accumulate=self.accumulate,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
            seed=self.seed,
            coefficient_shapes={k: list(v.shape) for k, v in coefficients.values.items()},
            leaf_groups=coefficients.leaf_groups,
        )
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class AdaMergingResult:
    """λ learned, the merged parameters θ(λ) (clamped as in training) and the per-step history.

    history["loss"] has shape [steps, K]: L_t at every step, before that step's update.
    """

    coefficients: Coefficients
    params: PyTree
    history: dict[str, np.ndarray]

    def save(self, directory: str | Path) -> None:
        """Write `coefficients.npz` (λ per group and the leaf→group map) and `history.json`, each atomically."""
        directory = Path(directory)
        arrays = {f"group:{name}": np.asarray(value) for name, value in self.coefficients.values.items()}
        arrays["leaf_groups"] = np.asarray(json.dumps(self.coefficients.leaf_groups))
        write_npz_atomic(directory / "coefficients.npz", arrays)
        write_json_atomic(directory / "history.json", {k: np.asarray(v).tolist() for k, v in self.history.items()})


def load_coefficients(path: str | Path) -> Coefficients:
    """Read λ written by `AdaMergingResult.save`."""
    with np.load(path) as data:
        leaf_groups = tuple(tuple(pair) for pair in json.loads(str(data["leaf_groups"])))
        values = {key[len("group:") :]: jnp.asarray(data[key]) for key in data.files if key.startswith("group:")}
    return Coefficients(values, leaf_groups)


def _depending_on(inputs: Any, tree: PyTree) -> Any:
    """`inputs`, unchanged in value, made data-dependent on every leaf of `tree` (+ 0 × one element of each).

    A real dependency, not `lax.optimization_barrier`: XLA:CPU drops barriers before scheduling, and then
    runs every task's forward first (all K tasks' activations alive: measured by `memory_analysis()` in
    tests/test_memory_modes.py). A non-finite value in `tree` propagates into `inputs`; the step's gradient
    is then non-finite anyway.
    """
    token = sum(jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree)) * 0.0
    return jax.tree_util.tree_map(lambda x: x + token.astype(x.dtype), inputs)


def make_step(
    apply_fn: ApplyFn, optimizer: optax.GradientTransformation, config: AdaMergingConfig
) -> Callable[..., tuple[Coefficients, Any, jax.Array]]:
    """The (unjitted) step `(λ, opt_state, θ0, τ, batches) -> (λ', opt_state', per-task loss [K])`."""
    dtype_name = config.compute_dtype or config.param_dtype
    compute_dtype = jnp.dtype(dtype_name) if dtype_name else None

    def merged(coefficients, pretrained, task_vectors):
        return merge(pretrained, task_vectors, coefficients, clamp=config.clamp, dtype=compute_dtype)

    def fused_gradients(coefficients, pretrained, task_vectors, batches):
        def loss(c):
            params = merged(c, pretrained, task_vectors)
            return entropy_objective(apply_fn, params, batches, config.entropy_eps, config.batches_per_task)

        (_, per_task), grads = jax.value_and_grad(loss, has_aux=True)(coefficients)
        return per_task, grads

    def per_task_gradients(coefficients, pretrained, task_vectors, batches):
        params, merge_vjp = jax.vjp(
            lambda c: merge(pretrained, task_vectors, c, clamp=config.clamp, dtype=jnp.float32), coefficients
        )
        run_params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype or p.dtype), params)
        grad_params = jax.tree_util.tree_map(jnp.zeros_like, params)
        losses = []
        for task, inputs in enumerate(batches):
            if task:
                # Task t starts only once task t−1's gradient is accumulated: one task's activations at a time.
                inputs = _depending_on(inputs, grad_params)
            loss_t, grad_t = jax.value_and_grad(
                lambda p, x=inputs, t=task: task_entropy(apply_fn, p, x, t, config.entropy_eps, config.batches_per_task)
            )(run_params)
            grad_params = jax.tree_util.tree_map(lambda acc, g: acc + g.astype(acc.dtype), grad_params, grad_t)
            losses.append(loss_t)
        (grads,) = merge_vjp(grad_params)
        return jnp.stack(losses), grads

    gradients = {"fused": fused_gradients, "per_task": per_task_gradients}.get(config.accumulate)
    if gradients is None:
        raise ValueError(f"accumulate must be 'fused' or 'per_task', got {config.accumulate!r}")

    def step(coefficients, opt_state, pretrained, task_vectors, batches):
        per_task, grads = gradients(coefficients, pretrained, task_vectors, batches)
        updates, opt_state = optimizer.update(grads, opt_state, coefficients)
        return optax.apply_updates(coefficients, updates), opt_state, per_task

    return step


_STEP_IRRELEVANT = dict(
    steps=0, granularity="layer", init_value=0.0, batch_size=0, stacked=None, shard_task_vectors=False,
    checkpoint_dir=None, checkpoint_every=1, seed=0, quiet=True,
)


def _compiled_step(apply_fn: ApplyFn, config: AdaMergingConfig) -> Callable[..., Any]:
    """The jitted step, shared by runs whose step computes the same thing (e.g. AdaMerging and ++)."""
    try:
        return _cached_step(apply_fn, dataclasses.replace(config, **_STEP_IRRELEVANT))
    except TypeError:  # an unhashable apply_fn or optimizer: compile for this run only
        return jax.jit(make_step(apply_fn, config.make_optimizer(), config), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _cached_step(apply_fn: ApplyFn, config: AdaMergingConfig) -> Callable[..., Any]:
    return jax.jit(make_step(apply_fn, config.make_optimizer(), config), donate_argnums=(0, 1))


def _check_batches(batches: Batches, k: int, step: int) -> None:
    if len(batches) != k:
        raise ValueError(f"step {step}: got batches for {len(batches)} tasks, the task vectors hold K = {k}")
    for task, batch in enumerate(batches):
        leaves = jax.tree_util.tree_leaves(batch)
        if batch is None or not leaves or any(np.shape(leaf)[:1] in ((), (0,)) for leaf in leaves):
            raise ValueError(f"step {step}: task {task} has no batch (got {type(batch).__name__} with no examples)")


def _batch_stream(batches: BatchSource, start: int) -> Iterator[Batches]:
    """Per-step batches from `start`: `batches(step)` for a callable, else the iterable fast-forwarded."""
    if callable(batches):
        step = start
        while True:
            yield batches(step)
            step += 1
    iterator = iter(batches)
    for _ in range(start):
        next(iterator)
    yield from iterator


def adamerging(
    apply_fn: ApplyFn,
    pretrained: PyTree,
    task_vectors: PyTree,
    batches: BatchSource,
    config: AdaMergingConfig = AdaMergingConfig(),
    *,
    coefficients: Coefficients | None = None,
    mesh: Mesh | None = None,
) -> AdaMergingResult:
    """Learn merge coefficients λ by entropy minimisation (AdaMerging; AdaMerging++ when `task_vectors` are
    TIES-preprocessed by `ties_task_vectors`).

    Args:
      apply_fn: `apply_fn(params, inputs, task_index) -> logits`; `task_index` is a Python int (the head).
      pretrained: θ0.
      task_vectors: stacked τ `[K, ...]` from `task_vectors` (or `ties_task_vectors` for ++).
      batches: per step, a sequence of K unlabeled input batches (task t's batch goes with head t); either a
        function `step -> batches` (resumable at any step) or an iterable (fast-forwarded on resume).
      config: see `AdaMergingConfig`.
      coefficients: initial λ (default: `init_coefficients` from the config).
      mesh: devices to run on (default: a 1-D "data" mesh over all devices); batches are split over it.

    Returns:
      `AdaMergingResult` with λ, θ(λ) and the loss history. With `config.checkpoint_dir` set, a run that
      finds a checkpoint there resumes from it, and its final λ is bit-identical to an uninterrupted run's.
    """
    check_same_structure(pretrained, task_vectors, "the task-vector tree")
    k = num_tasks(task_vectors)
    if coefficients is None:
        coefficients = init_coefficients(pretrained, k, config.granularity, config.init_value, config.stacked)
    check_coefficients(coefficients, task_vectors)
    if config.steps < 0:
        raise ValueError(f"steps must be non-negative, got {config.steps}")

    mesh = mesh or data_mesh()
    if config.param_dtype:
        cast = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, config.param_dtype), tree)  # noqa: E731
        pretrained, task_vectors = cast(pretrained), cast(task_vectors)
    pretrained = place_tree(pretrained, mesh, config.shard_task_vectors)
    task_vectors = place_tree(task_vectors, mesh, config.shard_task_vectors, skip_leading=1)
    coefficients = jax.device_put(coefficients, replicated(mesh))
    optimizer = config.make_optimizer()
    opt_state = jax.device_put(optimizer.init(coefficients), replicated(mesh))

    start, losses = 0, []
    checkpointer = RunCheckpointer(config.checkpoint_dir, config.checkpoint_every) if config.checkpoint_dir else None
    fingerprint = config.fingerprint(coefficients)
    if checkpointer is not None and checkpointer.latest_step() is not None:
        start = checkpointer.latest_step()
        (coefficients, opt_state), metadata = checkpointer.restore(start, (coefficients, opt_state))
        if metadata["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint in {checkpointer.directory} was written by a run with other settings; "
                "use another checkpoint_dir or the same config"
            )
        losses = [np.asarray(row, np.float32) for row in metadata["loss"]]
        if start > config.steps:
            raise ValueError(f"checkpoint in {checkpointer.directory} is at step {start}, past steps={config.steps}")

    step_fn = _compiled_step(apply_fn, config)
    pending: list[jax.Array] = []
    stream = _batch_stream(batches, start)
    progress = tqdm(range(start, config.steps), desc="AdaMerging", disable=config.quiet, initial=start, total=config.steps)
    for step in progress:
        try:
            step_batches = next(stream)
        except StopIteration:
            raise ValueError(f"the batch source ran out at step {step} of {config.steps}") from None
        _check_batches(step_batches, k, step)
        coefficients, opt_state, per_task = step_fn(
            coefficients, opt_state, pretrained, task_vectors, shard_batches(step_batches, mesh)
        )
        pending.append(per_task)
        done = step + 1
        saving = checkpointer is not None and (checkpointer.should_save(done) or done == config.steps)
        if saving or done % 10 == 0 or done == config.steps:
            losses.extend(np.asarray(jax.device_get(pending), np.float32))
            pending = []
            progress.set_postfix(entropy=f"{float(losses[-1].sum()):.4f}")
        if saving:
            metadata = dict(fingerprint=fingerprint, step=done, loss=[row.tolist() for row in losses])
            checkpointer.save(done, (coefficients, opt_state), metadata)
    progress.close()
    if checkpointer is not None:
        checkpointer.close()

    params = merge(pretrained, task_vectors, coefficients, clamp=config.clamp)
    history = {"loss": np.stack(losses) if losses else np.zeros((0, k), np.float32)}
    return AdaMergingResult(coefficients, params, history)
