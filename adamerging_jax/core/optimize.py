"""The AdaMerging optimiser: learn λ by minimising prediction entropy on unlabeled test batches.

One step (Yang et al., ICLR 2024, Algorithm 1), jitted as one function:

    θ(λ) = θ0 + Σ_k clamp(λ_k) τ_k                         (merge)
    L(λ) = Σ_t n · mean_{x ∈ batch_t} H(softmax(f_θ(x, t)))  (entropy_objective)
    λ ← optax_update(∇_λ L, λ)

Only λ is trained; θ0, τ and the heads (inside `apply_fn`) are frozen. The step runs on a device mesh with
each task's batch sharded on its example axis, θ0 and τ replicated or sharded along a parameter axis (a 1-D
"data" mesh, or the "fsdp" axis of a 2-D data × fsdp mesh, see `core.parallel`); the result equals the
single-device one.

`adamerging` reads as four parts: `_prepare` (checks, casts, placement, the initial state), `_restore` (resume
from a checkpoint), `_run_steps` (the loop) and `_result`.

Guards. The jitted step also returns a finite flag (every task's loss and the updated λ finite) and carries
it forward: once a step is not finite, later steps leave λ and the optimiser state unchanged. The host looks
at the flags only when it fetches the losses (every `CHECK_EVERY` steps, at checkpoints and at the end), so
no step waits for the device; the cost of a failure is up to `CHECK_EVERY` − 1 wasted steps, and the λ left
on the device is still exactly the λ of the last finite step. `NonFiniteError` then names the step and the
tasks at fault and carries that λ. A run without a clamp (FusionBench's setting) is also held to
|λ| ≤ `AdaMergingConfig.lambda_bound`: a step that takes λ past it (a diverging run) stops the same way, with
`LambdaBoundError`.

Resume. A checkpoint stores, beside λ and the optimiser state, the run's fingerprint in parts: the settings
that shape the run, the coefficient layout, digests of θ0 and τ, and the data source's identity. A resume
with any part changed is refused with the parts named; an unreadable newest checkpoint falls back to the
previous one (see `RunCheckpointer.restore_latest`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from adamerging_jax.core.checkpoint import RunCheckpointer, tree_digest, write_json_atomic, write_npz_atomic
from adamerging_jax.core.coefficients import Coefficients, Granularity, check_coefficients, init_coefficients
from adamerging_jax.core.low_rank import cast_task_vectors
from adamerging_jax.core.merge import DEFAULT_LAMBDA_BOUND, check_given_coefficients, checked_clamp, merge
from adamerging_jax.core.objective import ApplyFn, entropy_objective, task_entropy
from adamerging_jax.core.parallel import (
    constrain_like,
    data_mesh,
    place_tree,
    replicated,
    replicated_copy,
    shard_batches,
    shards_parameters,
)
from adamerging_jax.core.task_vectors import check_stacked, num_tasks
from adamerging_jax.core.trees import (
    PyTree,
    accumulation_dtype,
    check_array_leaves,
    check_int,
    check_number,
    is_float_dtype,
    jsonable,
    named_leaves,
)

Batches = Sequence[Any]
BatchSource = Union[Callable[[int], Batches], Iterable[Batches]]

CHECK_EVERY = 10  # steps between fetches of the losses and finite flags from the device


class RunStoppedError(ValueError):
    """A step the guard refused stopped the run (`NonFiniteError`, `LambdaBoundError`).

    Attributes:
      step: the step that was refused (0-based; its update was not applied).
      coefficients: the last accepted λ, i.e. λ after `step` updates (the initial λ when `step` is 0).
      history: {"loss": [step, K]}, the per-task losses of the accepted steps.
    """

    def __init__(self, message: str, *, step: int, coefficients: Coefficients, history: dict[str, np.ndarray]):
        super().__init__(message)
        self.step, self.coefficients, self.history = step, coefficients, history


class NonFiniteError(RunStoppedError):
    """A non-finite value stopped the run (a loss, an updated λ, an input batch, θ0 or τ)."""


class LambdaBoundError(RunStoppedError):
    """A run without a clamp whose update took some |λ| past `AdaMergingConfig.lambda_bound` stopped (a
    diverging run: every loss and λ still finite)."""


PRESETS = ("official", "fusionbench")
"""The named AdaMerging settings: the official code's (`AdaMergingConfig.official`) and FusionBench 0.2.33's
(`AdaMergingConfig.fusionbench`)."""


def _run_only(default: Any, *, resume_free: bool = False) -> Any:
    """A config field that does not shape the compiled step (and, with `resume_free`, may change on resume)."""
    return dataclasses.field(default=default, metadata={"run_only": True, "resume_free": resume_free})
@dataclasses.dataclass(frozen=True)
class AdaMergingConfig:
    """Every knob of AdaMerging. `official()` and `fusionbench()` give the two reference settings.

    Every field is checked when the config is made: a bad value raises one line naming the field and the value
    (TypeError for a wrong type, ValueError for a value out of range).

    Attributes:
      steps: optimisation steps, ≥ 0; 0 runs no update and returns θ(λ_init) (task arithmetic at `init_value`).
      granularity: "task" (task-wise), "layer" (layer-wise) or a function leaf path → group.
      init_value: initial λ for every task (0.3, the task-arithmetic prior); finite.
      lr: Adam's learning rate (betas 0.9, 0.999, no weight decay) when `optimizer` is None; finite, > 0.
      optimizer: any `optax.GradientTransformation` to use instead of Adam(lr).
      clamp: clip λ to (lo, hi) inside the merge, finite lo < hi; (0, 1) in the official code, None in
        FusionBench.
      lambda_bound: without a clamp, a step that takes any |λ| past this bound stops the run
        (`LambdaBoundError`); None: no bound. It may change between a run and its resume.
      entropy_eps: None for log_softmax entropy (official), 1e-8 for −Σ p log(p + eps) (FusionBench); > 0.
      batches_per_task: n ≥ 1, batches of `batch_size` per task per step; the data source yields n·B inputs
        per task and L_t counts n batch means (official: n = 2, B = 16).
      batch_size: B ≥ 1, for data sources built from this config.
      accumulate: "fused" differentiates Σ_t L_t at once; "per_task" runs the tasks one after another inside
        the jitted step, accumulating ∂L_t/∂θ, so only one task's activations are alive at a time, then takes
        one vector-Jacobian product through the merge.
      stacked: predicate on leaf path for leaves that stack layers (`lax.scan`), for per-layer λ.
      param_dtype: storage dtype of θ0 and τ on the device (e.g. "bfloat16" halves their memory).
      compute_dtype: dtype of the merged parameters the model runs in (default: `param_dtype` or θ0's).
        λ, the softmax and the loss stay in float32.
      shard_task_vectors: shard θ0 and τ along a parameter axis over a 1-D mesh instead of replicating them
        (on a mesh with an "fsdp" axis they are always sharded along it).
      checkpoint_dir, checkpoint_every: resumable run state (λ, optimiser state, step, history), saved every
        `checkpoint_every` ≥ 1 steps.
      seed: recorded with the run (≥ 0); data sources derive their shuffling from it.
      quiet: no progress bar.

    Fields made with `_run_only` do not shape the compiled step: configs that differ only in them share one
    jitted step (`step_settings`). Every other field, including any field added later, is part of the step's
    cache key unless declared run-only; a field metadata flag keeps the field names of the public API, where a
    nested settings object would have moved them. Fields also marked `resume_free` may change between a run
    and its resume (more steps, another checkpoint interval or placement); every other field is part of the
    checkpoint's fingerprint (`resume_settings`).
    """

    steps: int = _run_only(500, resume_free=True)
    granularity: Granularity = _run_only("layer")
    init_value: float = _run_only(0.3)
    lr: float = 1e-3
    optimizer: optax.GradientTransformation | None = None
    clamp: tuple[float, float] | None = (0.0, 1.0)
    lambda_bound: float | None = dataclasses.field(default=DEFAULT_LAMBDA_BOUND, metadata={"resume_free": True})
    entropy_eps: float | None = None
    batches_per_task: int = 2
    batch_size: int = _run_only(16)
    accumulate: Literal["fused", "per_task"] = "fused"
    stacked: Callable[[str], bool] | None = _run_only(None)
    param_dtype: str | None = None
    compute_dtype: str | None = None
    shard_task_vectors: bool = _run_only(False, resume_free=True)
    checkpoint_dir: str | None = _run_only(None, resume_free=True)
    checkpoint_every: int = _run_only(50, resume_free=True)
    seed: int = _run_only(0)
    quiet: bool = _run_only(False, resume_free=True)

    def __post_init__(self) -> None:
        check_int("AdaMergingConfig.steps", self.steps, minimum=0)
        if self.granularity not in ("task", "layer") and not callable(self.granularity):
            raise ValueError(
                f"AdaMergingConfig.granularity must be 'task', 'layer' or a callable path -> group, got {self.granularity!r}"
            )
        check_number("AdaMergingConfig.init_value", self.init_value)
        check_number("AdaMergingConfig.lr", self.lr, positive=True)
        if self.optimizer is not None and not all(callable(getattr(self.optimizer, m, None)) for m in ("init", "update")):
            raise TypeError(
                f"AdaMergingConfig.optimizer must be an optax.GradientTransformation or None, got {self.optimizer!r}"
            )
        object.__setattr__(self, "clamp", checked_clamp("AdaMergingConfig.clamp", self.clamp))
        if self.lambda_bound is not None:
            check_number("AdaMergingConfig.lambda_bound", self.lambda_bound, positive=True)
        if self.entropy_eps is not None:
            check_number("AdaMergingConfig.entropy_eps", self.entropy_eps, positive=True)
        check_int("AdaMergingConfig.batches_per_task", self.batches_per_task, minimum=1)
        check_int("AdaMergingConfig.batch_size", self.batch_size, minimum=1)
        if self.accumulate not in ("fused", "per_task"):
            raise ValueError(f"AdaMergingConfig.accumulate must be 'fused' or 'per_task', got {self.accumulate!r}")
        if self.stacked is not None and not callable(self.stacked):
            raise TypeError(f"AdaMergingConfig.stacked must be None or a callable path -> bool, got {self.stacked!r}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _checked_float_dtype(name, getattr(self, name)))
        for name in ("shard_task_vectors", "quiet"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"AdaMergingConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise TypeError(f"AdaMergingConfig.checkpoint_dir must be None or a path, got {self.checkpoint_dir!r}")
            if not os.fspath(self.checkpoint_dir):
                raise ValueError("AdaMergingConfig.checkpoint_dir must be None or a non-empty path, got ''")
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        check_int("AdaMergingConfig.checkpoint_every", self.checkpoint_every, minimum=1)
        check_int("AdaMergingConfig.seed", self.seed, minimum=0)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "AdaMergingConfig":
        """The settings of ``preset`` (one of `PRESETS`: `official` or `fusionbench`) with ``overrides``;
        ValueError naming the presets for another name."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; the presets are {list(PRESETS)}")
        return cls.official(**overrides) if preset == "official" else cls.fusionbench(**overrides)

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

    def step_settings(self) -> "AdaMergingConfig":
        """This config with every run-only field at its default: equal for configs whose compiled steps are."""
        return dataclasses.replace(
            self, **{f.name: f.default for f in dataclasses.fields(self) if f.metadata.get("run_only")}
        )

    def resume_settings(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint, as JSON values
        (callables by name; their effect on λ's layout is fingerprinted separately)."""
        return {
            f.name: jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("resume_free")
        }


def _checked_float_dtype(name: str, dtype: Any) -> str:
    """The canonical name of a floating dtype given by name or type ("bfloat16", jnp.float32, ...)."""
    try:
        canonical = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise TypeError(f"AdaMergingConfig.{name} must be a floating dtype name such as 'bfloat16', got {dtype!r}") from None
    if not is_float_dtype(canonical):
        raise ValueError(f"AdaMergingConfig.{name} must be a floating dtype, got {dtype!r}")
    return canonical.name


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
        write_npz_atomic(directory / COEFFICIENTS_FILE, arrays)
        write_json_atomic(directory / "history.json", {k: np.asarray(v).tolist() for k, v in self.history.items()})


COEFFICIENTS_FILE = "coefficients.npz"


def load_coefficients(path: str | Path) -> Coefficients:
    """Read λ written by `AdaMergingResult.save`: its directory or the `coefficients.npz` inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / COEFFICIENTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (AdaMergingResult.save writes {COEFFICIENTS_FILE} in a directory)")
    with np.load(path) as data:
        if "leaf_groups" not in data.files:
            raise ValueError(f"{path}: not written by AdaMergingResult.save (no 'leaf_groups' entry)")
        leaf_groups = tuple(tuple(pair) for pair in json.loads(str(data["leaf_groups"])))
        values = {key[len("group:") :]: jnp.asarray(data[key]) for key in data.files if key.startswith("group:")}
    return Coefficients(values, leaf_groups)


def _depending_on(inputs: Any, tree: PyTree) -> Any:
    """`inputs`, unchanged in value, made data-dependent on every leaf of `tree` (+ 0 × one element of each).

    A real dependency, not `lax.optimization_barrier`: XLA:CPU drops barriers before scheduling, and then
    runs every task's forward first (all K tasks' activations alive: measured by `memory_analysis()` in
    tests/test_memory_modes.py). A non-finite value in `tree` propagates into `inputs`; the step's gradient
    is then non-finite anyway. The element is read by indexing, not `ravel`: flattening a sharded leaf
    would make XLA gather all of it onto every device.
    """
    token = sum(leaf[(0,) * leaf.ndim].astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree)) * 0.0
    return jax.tree_util.tree_map(lambda x: x + token.astype(x.dtype), inputs)


def shards_frozen(config: AdaMergingConfig, mesh: Mesh | None) -> bool:
    """Whether θ0 and τ are sharded on `mesh`: ``shard_task_vectors``, or a mesh with an "fsdp" axis."""
    return mesh is not None and (config.shard_task_vectors or shards_parameters(mesh))


def make_step(
    apply_fn: ApplyFn, optimizer: optax.GradientTransformation, config: AdaMergingConfig, *, mesh: Mesh | None = None
) -> Callable[..., tuple[Coefficients, Any, jax.Array]]:
    """The (unjitted) step `(λ, opt_state, θ0, τ, batches) -> (λ', opt_state', per-task loss [K])`.

    With a `mesh` on which θ0 and τ are sharded (`shards_frozen`), the merged θ(λ) is constrained to θ0's
    sharding (`core.parallel.constrain_like`): never replicated, gathered per tensor where the forward uses it.
    """
    dtype_name = config.compute_dtype or config.param_dtype
    compute_dtype = jnp.dtype(dtype_name) if dtype_name else None
    shard = shards_frozen(config, mesh)

    def merge_sharded(coefficients, pretrained, task_vectors, dtype):
        params = merge(pretrained, task_vectors, coefficients, clamp=config.clamp, dtype=dtype)
        return constrain_like(params, mesh, shard)

    def merged(coefficients, pretrained, task_vectors):
        return merge_sharded(coefficients, pretrained, task_vectors, compute_dtype)

    def fused_gradients(coefficients, pretrained, task_vectors, batches):
        def loss(c):
            params = merged(c, pretrained, task_vectors)
            return entropy_objective(apply_fn, params, batches, config.entropy_eps, config.batches_per_task)

        (_, per_task), grads = jax.value_and_grad(loss, has_aux=True)(coefficients)
        return per_task, grads

    def per_task_gradients(coefficients, pretrained, task_vectors, batches):
        # ∂L/∂θ is accumulated over tasks in at least float32 (float64 for float64 θ0), whatever θ0's storage
        # dtype; each task's forward runs in the compute dtype (default: θ0's leaf dtype).
        acc = accumulation_dtype(*(leaf.dtype for leaf in jax.tree_util.tree_leaves(pretrained)))
        params, merge_vjp = jax.vjp(lambda c: merge_sharded(c, pretrained, task_vectors, acc), coefficients)
        # On a sharded mesh the run-dtype θ and the ∂L/∂θ accumulator keep θ0's layout (never replicated).
        sharded = functools.partial(constrain_like, mesh=mesh, shard=shard)
        run_params = sharded(
            jax.tree_util.tree_map(lambda p, p0: p.astype(compute_dtype or p0.dtype), params, pretrained))
        grad_params = sharded(jax.tree_util.tree_map(jnp.zeros_like, params))
        losses = []
        for task, inputs in enumerate(batches):
            if task:
                # Task t starts only once task t−1's gradient is accumulated: one task's activations at a time.
                inputs = _depending_on(inputs, grad_params)
            loss_t, grad_t = jax.value_and_grad(
                lambda p, x=inputs, t=task: task_entropy(apply_fn, p, x, t, config.entropy_eps, config.batches_per_task)
            )(run_params)
            grad_params = sharded(jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), grad_params, grad_t))
            losses.append(loss_t)
        (grads,) = merge_vjp(grad_params)
        return jnp.stack(losses), grads

    gradients = {"fused": fused_gradients, "per_task": per_task_gradients}[config.accumulate]

    def step(coefficients, opt_state, pretrained, task_vectors, batches):
        per_task, grads = gradients(coefficients, pretrained, task_vectors, batches)
        updates, opt_state = optimizer.update(grads, opt_state, coefficients)
        return optax.apply_updates(coefficients, updates), opt_state, per_task

    return step


def _all_finite(tree: PyTree) -> jax.Array:
    """True when every floating leaf of `tree` holds only finite values (integer leaves are finite)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if is_float_dtype(jnp.result_type(x))]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _largest_magnitude(coefficients: Coefficients) -> jax.Array:
    """max |λ| over every group (NaN when some λ is NaN)."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(value)) for value in coefficients.values.values()]))


def guarded_step(step: Callable[..., tuple[Coefficients, Any, jax.Array]], lambda_bound: float | None = None
                 ) -> Callable[..., tuple]:
    """`step` with a guard: `(λ, opt_state, healthy, θ0, τ, batches) -> (λ', opt_state', healthy', per-task
    loss [K], inputs finite [K], max |λ'|)`.

    healthy' = healthy ∧ (every loss finite) ∧ (λ' finite) ∧ (max |λ'| ≤ `lambda_bound`, when given). Where
    healthy' is false, λ and the optimiser state come back unchanged, so after a failure the state stays that
    of the last accepted step however many steps run before the host looks at the flag.
    """

    def guarded(coefficients, opt_state, healthy, pretrained, task_vectors, batches):
        new_coefficients, new_state, per_task = step(coefficients, opt_state, pretrained, task_vectors, batches)
        peak = _largest_magnitude(new_coefficients)
        keep = healthy & jnp.all(jnp.isfinite(per_task)) & _all_finite(new_coefficients)
        if lambda_bound is not None:
            keep &= peak <= lambda_bound
        choose = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new, old)  # noqa: E731
        inputs_finite = jnp.stack([_all_finite(batch) for batch in batches])
        return (choose(new_coefficients, coefficients), choose(new_state, opt_state), keep, per_task, inputs_finite,
                peak)

    return guarded


def _jit_step(apply_fn: ApplyFn, config: AdaMergingConfig, mesh: Mesh | None) -> Callable[..., tuple]:
    # λ and the optimiser state are donated: `adamerging` passes only arrays it made (never the caller's).
    step = make_step(apply_fn, config.make_optimizer(), config, mesh=mesh)
    return jax.jit(guarded_step(step, config.lambda_bound if config.clamp is None else None), donate_argnums=(0, 1))


def _compiled_step(apply_fn: ApplyFn, config: AdaMergingConfig, mesh: Mesh | None = None) -> Callable[..., tuple]:
    """The jitted guarded step, shared by runs whose step computes the same thing (configs equal up to their
    run-only fields, see `AdaMergingConfig.step_settings`; e.g. AdaMerging and ++) on the same mesh layout."""
    key = config.step_settings()
    sharded_on = mesh if shards_frozen(config, mesh) else None  # the step depends on the mesh only then
    try:
        hash((apply_fn, key))
    except TypeError:  # an unhashable apply_fn or optimizer: compile for this run only
        return _jit_step(apply_fn, config, mesh)
    return _cached_step(apply_fn, key, sharded_on)


@functools.lru_cache(maxsize=16)
def _cached_step(apply_fn: ApplyFn, config: AdaMergingConfig, sharded_on: Mesh | None) -> Callable[..., tuple]:
    return _jit_step(apply_fn, config, sharded_on)


def _check_batches(batches: Batches, k: int | None, step: int) -> None:
    """One non-empty batch of arrays per task (K of them; any count ≥ 1 when `k` is None)."""
    try:
        count = len(batches)
    except TypeError:
        raise ValueError(f"step {step}: the batch source gave a {type(batches).__name__}, not one batch per task") from None
    if k is not None and count != k:
        raise ValueError(f"step {step}: got batches for {count} tasks, the task vectors hold K = {k}")
    for task, batch in enumerate(batches):
        if isinstance(batch, list):
            raise TypeError(f"step {step}: task {task}'s batch is a Python list of {len(batch)} items; give one array "
                            "[N, ...] of the examples (np.stack), or a dict / tuple of arrays")
        check_array_leaves(f"step {step}: task {task}'s batch", batch)
        leaves = jax.tree_util.tree_leaves(batch)
        if batch is None or not leaves or any(np.shape(leaf)[:1] in ((), (0,)) for leaf in leaves):
            raise ValueError(f"step {step}: task {task} has no batch (got {type(batch).__name__} with no examples)")


def _check_arguments(apply_fn: Any, pretrained: PyTree, batches: Any, config: Any, mesh: Any) -> None:
    """The types of `adamerging`'s arguments, each error naming the argument (the values are checked later)."""
    if not callable(apply_fn):
        raise TypeError(f"adamerging: apply_fn must be callable (params, inputs, task) -> logits, got {apply_fn!r}")
    if not isinstance(config, AdaMergingConfig):
        raise TypeError(f"adamerging: config must be an AdaMergingConfig, got {type(config).__name__}")
    if not (callable(batches) or isinstance(batches, Iterable)):
        raise TypeError(f"adamerging: batches must be a function step -> batches or an iterable of per-step batches, "
                        f"got {type(batches).__name__}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"adamerging: mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    check_array_leaves("adamerging: pretrained", pretrained)


def _batch_stream(batches: BatchSource, start: int) -> Iterator[Batches]:
    """Per-step batches from `start`: `batches(step)` for a callable, else the iterable fast-forwarded."""
    if callable(batches):
        return map(batches, itertools.count(start))
    return itertools.islice(iter(batches), start, None)


def _data_identity(batches: BatchSource, mesh: Mesh) -> tuple[str, BatchSource]:
    """The data source's identity for the checkpoint fingerprint, and the source to run from.

    `batches.fingerprint()` when the source has one (e.g. `data.pipeline.AdaptationBatches`); otherwise a
    `tree_digest` of step 0's batches (shapes, dtypes and a strided sample of values). An iterable's first
    element is read for it and put back in front of the iterable returned.
    """
    if callable(getattr(batches, "fingerprint", None)):
        return str(batches.fingerprint()), batches
    first, batches = peek_batches(batches)
    return tree_digest(list(first), replicated(mesh)), batches


def peek_batches(batches: BatchSource) -> tuple[Batches, BatchSource]:
    """Step 0's batches, and the source to run from: a callable as it is, an iterable with its first element
    put back in front; a ValueError for an empty iterable."""
    if callable(batches):
        return batches(0), batches
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("the batch source is empty: no batches for step 0")
    return first, itertools.chain([first], iterator)


def _run_fingerprint(
    config: AdaMergingConfig, coefficients: Coefficients, opt_state: Any, pretrained: PyTree, task_vectors: PyTree,
    data: str, mesh: Mesh,
) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint, in named parts (see
    `fingerprint_differences`): the settings, λ's layout, θ0, τ (each a `tree_digest`) and the data identity.

    A custom optimizer is known by a digest of its initial state (structure, shapes and values): another
    optax chain, or other hyperparameters held in the state (`optax.inject_hyperparams`), are seen; a
    hyperparameter captured in a closure is not.
    """
    settings = config.resume_settings()
    if config.optimizer is not None:
        structure = str(jax.tree_util.tree_structure(opt_state))
        state = hashlib.sha256((structure + tree_digest(opt_state, replicated(mesh))).encode()).hexdigest()[:16]
        settings["optimizer"] = f"custom (initial state {state})"
    layout = {group: [list(value.shape), str(value.dtype)] for group, value in coefficients.values.items()}
    layout_json = json.dumps([coefficients.leaf_groups, layout], sort_keys=True)
    fingerprint = dict(
        settings=settings,
        coefficients=hashlib.sha256(layout_json.encode()).hexdigest()[:16],
        pretrained=tree_digest(pretrained, replicated(mesh)),
        task_vectors=tree_digest(task_vectors, replicated(mesh)),
        data=data,
    )
    return json.loads(json.dumps(fingerprint))  # as it reads back from the checkpoint (tuples as lists)


_PART_NAMES = {
    "coefficients": "the coefficient layout differs (granularity, stacked or the parameter tree)",
    "pretrained": "the pretrained parameters θ0 differ",
    "task_vectors": "the task vectors differ",
    "data": "the data differ",
}


def fingerprint_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, one phrase per part ([] if nothing):
    each changed setting as "name old → new", then the other parts by name."""
    if not isinstance(saved, dict) or set(saved) != set(current) or not isinstance(saved.get("settings"), dict):
        return ["its fingerprint has another format (written by another version of adamerging_jax)"]
    differences = [
        f"{name} {saved['settings'].get(name, '(absent)')!r} → {value!r}"
        for name, value in current["settings"].items()
        if saved["settings"].get(name, "(absent)") != value
    ]
    differences += [phrase for part, phrase in _PART_NAMES.items() if saved[part] != current[part]]
    return differences



@dataclasses.dataclass
class _Run:
    """A run in progress: the frozen inputs placed on the mesh, and the state the loop advances.

    `step` counts the updates applied and verified finite; `losses` holds their per-task losses.
    """

    pretrained: PyTree
    task_vectors: PyTree
    coefficients: Coefficients
    opt_state: Any
    mesh: Mesh
    step: int = 0
    losses: list[np.ndarray] = dataclasses.field(default_factory=list)

    def history(self) -> dict[str, np.ndarray]:
        k = num_tasks(self.task_vectors)
        return {"loss": np.stack(self.losses) if self.losses else np.zeros((0, k), np.float32)}

    def kept_coefficients(self) -> Coefficients:
        """λ on the host (a copy that outlives the donated device buffers)."""
        return jax.device_get(self.coefficients)


def _prepare(
    pretrained: PyTree, task_vectors: PyTree, coefficients: Coefficients | None, config: AdaMergingConfig, mesh: Mesh
) -> _Run:
    """Check the inputs, cast θ0 and τ to `param_dtype`, place everything on the mesh and make the initial
    state. λ and the optimiser state are copies (the step donates them; the caller's arrays stay usable).
    Given λ must be finite (within ±lambda_bound without a clamp), θ0 and τ finite (one reduction per leaf,
    once)."""
    k = check_stacked(pretrained, task_vectors)
    if coefficients is None:
        coefficients = init_coefficients(pretrained, k, config.granularity, config.init_value, config.stacked)
    check_coefficients(coefficients, task_vectors)
    check_given_coefficients(coefficients, config.lambda_bound if config.clamp is None else None,
                             "adamerging: coefficients")
    if config.param_dtype:
        pretrained = jax.tree_util.tree_map(lambda x: jnp.asarray(x, config.param_dtype), pretrained)
        task_vectors = cast_task_vectors(task_vectors, config.param_dtype)
    shard = shards_frozen(config, mesh)
    pretrained = place_tree(pretrained, mesh, shard)
    task_vectors = place_tree(task_vectors, mesh, shard, skip_leading=1)
    coefficients = replicated_copy(coefficients, mesh)
    opt_state = replicated_copy(config.make_optimizer().init(coefficients), mesh)
    run = _Run(pretrained, task_vectors, coefficients, opt_state, mesh)
    cast_note = f" (after the cast to param_dtype={config.param_dtype})" if config.param_dtype else ""
    for tree, what in ((pretrained, "the pretrained parameters θ0"), (task_vectors, "the task vectors τ")):
        bad = _non_finite_leaves(tree)
        if bad:
            raise NonFiniteError(
                f"{what}: leaf {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} holds NaN or inf"
                f"{cast_note}; the run cannot start",
                step=0, coefficients=run.kept_coefficients(), history=run.history(),
            )
    return run


def _non_finite_leaves(tree: PyTree) -> list[str]:
    """Paths of the leaves of `tree` that hold a NaN or an inf (one jitted reduction per leaf)."""
    named = named_leaves(tree)
    flags = jax.device_get(jax.jit(lambda leaves: [_all_finite(x) for x in leaves])([leaf for _, leaf in named]))
    return [path for (path, _), finite in zip(named, flags) if not finite]


def restore_run_state(checkpointer: RunCheckpointer, fingerprint: dict[str, Any], steps: int, template: PyTree
                      ) -> tuple[int, PyTree, list[np.ndarray]] | None:
    """The newest usable checkpoint's (step, state shaped like `template`, per-step losses), or None. One
    written by another run (any part of `fingerprint` changed, see `fingerprint_differences`) or past `steps`
    is refused, naming what differs and how to start afresh. Shared by every resumable loop (AdaMerging's, and
    `train_resumable`'s for the test-time methods)."""
    where = checkpointer.directory
    afresh = f"to start afresh, use another checkpoint_dir or delete {where}"

    def check(step: int, metadata: dict[str, Any]) -> None:
        differences = fingerprint_differences(metadata.get("fingerprint"), fingerprint)
        if differences:
            raise ValueError(
                f"checkpoint step {step} in {where} was written by another run: {'; '.join(differences)}; {afresh}"
            )
        if step > steps:
            raise ValueError(f"checkpoint in {where} is at step {step}, past steps={steps}; {afresh}")

    found = checkpointer.restore_latest(template, check)
    if found is None:
        return None
    step, state, metadata = found
    return step, state, [np.asarray(row, np.float32) for row in metadata["loss"]]


def save_run_state(checkpointer: RunCheckpointer, step: int, state: PyTree, losses: Sequence[np.ndarray],
                   fingerprint: dict[str, Any]) -> None:
    """Checkpoint `state` after `step` updates with the run's fingerprint and per-step losses."""
    metadata = dict(fingerprint=fingerprint, step=step, loss=[np.asarray(row).tolist() for row in losses])
    checkpointer.save(step, state, metadata)


def _restore(run: _Run, checkpointer: RunCheckpointer, fingerprint: dict[str, Any], config: AdaMergingConfig) -> None:
    """Continue `run` from the newest usable checkpoint, if any (`restore_run_state`)."""
    found = restore_run_state(checkpointer, fingerprint, config.steps, (run.coefficients, run.opt_state))
    if found is not None:
        run.step, (run.coefficients, run.opt_state), run.losses = found


def _save(checkpointer: RunCheckpointer, run: _Run, fingerprint: dict[str, Any]) -> None:
    save_run_state(checkpointer, run.step, (run.coefficients, run.opt_state), run.losses, fingerprint)


def _refusal(step: int, loss: np.ndarray, inputs_finite: np.ndarray, peak: float, config: AdaMergingConfig
             ) -> tuple[type[RunStoppedError], str]:
    """Why the guard refused `step`, naming the tasks at fault: their input batch, else their loss, else a
    non-finite λ (`NonFiniteError`), else λ past the bound (`LambdaBoundError`)."""
    bad_inputs = [str(t) for t, finite in enumerate(inputs_finite) if not finite]
    bad_losses = [f"{t} ({value})" for t, value in enumerate(loss) if not np.isfinite(value)]
    if bad_inputs:
        return NonFiniteError, f"step {step}: the input batch of task(s) {', '.join(bad_inputs)} holds NaN or inf"
    if bad_losses:
        return NonFiniteError, f"step {step}: the entropy loss of task(s) {', '.join(bad_losses)} is not finite"
    if not np.isfinite(peak):
        return NonFiniteError, (f"step {step}: every task's loss is finite but the update made λ non-finite (a NaN "
                                "or inf gradient or update)")
    return LambdaBoundError, (f"step {step}: the update took |λ| to {float(peak):.6g}, past lambda_bound = "
                              f"{config.lambda_bound:g} with no clamp (a diverging run: lower lr, or set a clamp)")


def _verify(run: _Run, fetched: list[tuple], config: AdaMergingConfig, checkpointer: RunCheckpointer | None,
            fingerprint: dict | None) -> None:
    """Record the fetched steps' losses; at the first step the guard refused, keep the last accepted λ (in a
    checkpoint too when checkpointing) and raise `NonFiniteError` or `LambdaBoundError`."""
    for loss, healthy, inputs_finite, peak in fetched:
        if not healthy:
            where = ""
            if checkpointer is not None and run.step > (checkpointer.latest_step() or 0):
                _save(checkpointer, run, fingerprint)
                where = f" and checkpoint step {run.step} in {checkpointer.directory}"
            error, message = _refusal(run.step, loss, inputs_finite, peak, config)
            raise error(
                f"{message}; the run stopped with λ as it was before this step (error.coefficients{where})",
                step=run.step, coefficients=run.kept_coefficients(), history=run.history(),
            )
        run.losses.append(np.asarray(loss, np.float32))
        run.step += 1


def _run_steps(
    step_fn: Callable[..., tuple], run: _Run, stream: Iterator[Batches], config: AdaMergingConfig,
    checkpointer: RunCheckpointer | None, fingerprint: dict | None,
) -> None:
    """Steps `run.step` .. `config.steps − 1`. The host fetches the losses and finite flags every
    `CHECK_EVERY` steps, at checkpoints and at the end (see the module docstring for the trade-off)."""
    k = num_tasks(run.task_vectors)
    healthy = jax.device_put(jnp.asarray(True), replicated(run.mesh))
    pending: list[tuple[jax.Array, ...]] = []
    ran_out = object()
    progress = tqdm(
        range(run.step, config.steps), desc="AdaMerging", disable=config.quiet, initial=run.step, total=config.steps
    )
    try:
        for step in progress:
            step_batches = next(stream, ran_out)
            if step_batches is ran_out:
                raise ValueError(f"the batch source ran out at step {step} of {config.steps}")
            _check_batches(step_batches, k, step)
            placed = shard_batches(step_batches, run.mesh)
            run.coefficients, run.opt_state, healthy, per_task, inputs_finite, peak = step_fn(
                run.coefficients, run.opt_state, healthy, run.pretrained, run.task_vectors, placed
            )
            pending.append((per_task, healthy, inputs_finite, peak))
            done = step + 1
            saving = checkpointer is not None and (checkpointer.should_save(done) or done == config.steps)
            if saving or done % CHECK_EVERY == 0 or done == config.steps:
                _verify(run, jax.device_get(pending), config, checkpointer, fingerprint)
                pending = []
                progress.set_postfix(entropy=f"{float(run.losses[-1].sum()):.4f}")
            if saving:
                _save(checkpointer, run, fingerprint)
    finally:
        progress.close()


def _result(run: _Run, config: AdaMergingConfig) -> AdaMergingResult:
    """λ, θ(λ) merged as in training (clamped, laid out like θ0 on the mesh) and the loss history."""
    shard = shards_frozen(config, run.mesh)
    merged = jax.jit(lambda *args: constrain_like(merge(*args, clamp=config.clamp), run.mesh, shard))
    params = merged(run.pretrained, run.task_vectors, run.coefficients)
    return AdaMergingResult(run.coefficients, params, run.history())


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
      task_vectors: stacked τ `[K, ...]` from `task_vectors` (or `ties_task_vectors` for ++); a leaf may be
        `LoraFactors` (`core.low_rank`, e.g. `models.lora.factored_task_vectors`), merged inside the step
        without forming the dense τ.
      batches: per step, a sequence of K unlabeled input batches (task t's batch goes with head t); either a
        function `step -> batches` (resumable at any step) or an iterable (fast-forwarded on resume). A
        source with a `fingerprint()` method (e.g. `data.pipeline.AdaptationBatches`) is identified by it in
        checkpoints; any other by a digest of its step-0 batches.
      config: see `AdaMergingConfig`.
      coefficients: initial λ (default: `init_coefficients` from the config); copied, never consumed.
      mesh: devices to run on (default: a 1-D "data" mesh over all devices); batches are split over its "data"
        axis; on a `make_mesh(data=, fsdp=)` mesh θ0 and τ are sharded along "fsdp" (see `core.parallel`).

    Returns:
      `AdaMergingResult` with λ, θ(λ) and the loss history. With `config.checkpoint_dir` set, a run that
      finds a checkpoint there resumes from it, and its final λ is bit-identical to an uninterrupted run's.

    Raises:
      NonFiniteError: θ0 or τ holds NaN/inf, or a step's loss or λ is not finite (the error holds the last
        finite λ, also checkpointed when checkpointing).
      LambdaBoundError: without a clamp, a step took |λ| past `config.lambda_bound` (λ kept likewise).
      ValueError: bad batches (count, empty, not divisible over the mesh, ran out) or a checkpoint that is
        unusable or was written by another run.
      TypeError: an argument of the wrong type (named), a Python list where a batch's array belongs.
    """
    _check_arguments(apply_fn, pretrained, batches, config, mesh)
    mesh = mesh or data_mesh()
    run = _prepare(pretrained, task_vectors, coefficients, config, mesh)
    checkpointer = fingerprint = None
    if config.checkpoint_dir:
        data, batches = _data_identity(batches, mesh)
        fingerprint = _run_fingerprint(
            config, run.coefficients, run.opt_state, run.pretrained, run.task_vectors, data, mesh
        )
        checkpointer = RunCheckpointer(config.checkpoint_dir, config.checkpoint_every)
    try:
        if checkpointer is not None:
            _restore(run, checkpointer, fingerprint, config)
        stream = _batch_stream(batches, run.step)
        _run_steps(_compiled_step(apply_fn, config, mesh), run, stream, config, checkpointer, fingerprint)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return _result(run, config)


# ------------------------------------------------------------------------------ the test-time methods' loop


class AdaptationSettings(Protocol):
    """What `train_resumable` reads of a test-time method's config (`core.surgery.SurgeryConfig`,
    `core.we_moe.WEMoEConfig`)."""

    steps: int
    batch_size: int
    checkpoint_dir: str | None
    checkpoint_every: int
    quiet: bool


@dataclasses.dataclass(frozen=True)
class LoopNames:
    """How a loop's errors and progress name it: ``method`` ("Surgery"), its per-task ``loss`` ("L1 loss") and
    its ``batch_size`` setting ("surgery_batch_size")."""

    method: str
    loss: str
    batch_size: str


def first_examples(batch: Any, size: int, task: int, step: int, setting: str) -> Any:
    """The first `size` examples of task t's batch; a ValueError naming the `setting` when it holds fewer."""
    count = np.shape(jax.tree_util.tree_leaves(batch)[0])[0]
    if count < size:
        raise ValueError(f"step {step}: task {task}'s adaptation batch holds {count} examples, fewer than "
                         f"{setting} = {size}")
    return jax.tree_util.tree_map(lambda x: x[:size], batch)


def _checked_losses(rows: list[Any], first: int, names: LoopNames) -> list[np.ndarray]:
    """The per-task losses of steps first, first + 1, ... on the host; a ValueError naming the first step and
    tasks whose loss is not finite."""
    fetched = [np.asarray(row) for row in jax.device_get(rows)]
    for step, row in enumerate(fetched, start=first):
        if not np.all(np.isfinite(row)):
            tasks = [t for t, value in enumerate(row) if not np.isfinite(value)]
            raise ValueError(f"{names.method} step {step}: the {names.loss} of task(s) {tasks} is not finite (NaN or "
                             "inf in the inputs or the model); the run stopped")
    return fetched


def train_resumable(
    step: Callable[[PyTree, list[Any]], tuple[PyTree, jax.Array]],
    state: PyTree,
    batches: BatchSource,
    config: AdaptationSettings,
    fingerprint: Callable[[str], dict[str, Any]],
    names: LoopNames,
    *,
    mesh: Mesh,
    tasks: int | None = None,
) -> tuple[PyTree, np.ndarray]:
    """Steps 0 … ``config.steps`` − 1 of a test-time method trained on unlabeled batches (Representation Surgery's
    modules, WEMoE's routers): per step, the first ``config.batch_size`` examples of each task's batch, split over
    the mesh's "data" axis, then ``state, L = step(state, batches)`` (L [K]: the per-task losses before the
    update; `step` may donate `state`).

    With ``config.checkpoint_dir`` the run resumes from the newest usable checkpoint there, bit-identically
    (`restore_run_state`; saved every ``checkpoint_every`` steps and at the end), and refuses one whose
    fingerprint differs from ``fingerprint(data)`` (`data`: the batch source's identity, `_data_identity`).
    The losses are fetched and checked finite every `CHECK_EVERY` steps, at checkpoints and at the end.

    Args:
      tasks: K, when known; otherwise step 0's batch count.

    Returns:
      (the final state, the losses [steps, K]).
    """
    checkpointer = run_fingerprint = None
    if config.checkpoint_dir:
        data, batches = _data_identity(batches, mesh)
        run_fingerprint = fingerprint(data)
        checkpointer = RunCheckpointer(os.fspath(config.checkpoint_dir), config.checkpoint_every)
    start, losses, pending = 0, [], []
    try:
        if checkpointer is not None and (found := restore_run_state(checkpointer, run_fingerprint, config.steps,
                                                                    state)) is not None:
            start, state, losses = found
        stream = _batch_stream(batches, start)
        with tqdm(range(start, config.steps), desc=names.method, disable=config.quiet, initial=start,
                  total=config.steps) as progress:
            for index in progress:
                step_batches = next(stream, None)
                if step_batches is None:
                    raise ValueError(f"the batch source ran out at step {index} of {config.steps}")
                _check_batches(step_batches, tasks, index)
                tasks = len(step_batches)
                chosen = [first_examples(batch, config.batch_size, task, index, names.batch_size)
                          for task, batch in enumerate(step_batches)]
                state, per_task = step(state, shard_batches(chosen, mesh))
                pending.append(per_task)
                done = index + 1
                saving = checkpointer is not None and (checkpointer.should_save(done) or done == config.steps)
                if saving or done % CHECK_EVERY == 0 or done == config.steps:
                    losses += _checked_losses(pending, len(losses), names)
                    pending = []
                    progress.set_postfix(loss=f"{float(np.sum(losses[-1])):.4f}")
                if saving:
                    save_run_state(checkpointer, done, state, losses, run_fingerprint)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    history = np.stack(losses) if losses else np.zeros((0, tasks or 0), np.float32)
    return state, history
