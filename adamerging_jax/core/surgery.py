"""Representation Surgery (Yang, Shen, Guo, Wang, Tao, Li and Tao, "Representation Surgery for Multi-Task Model
Merging", ICML 2024): after merging, a small task-specific module moves the merged model's representation back
towards each fine-tuned model's.

Per task t, on the representation z ∈ R^d the task's head reads (CLIP: the normalised image embedding),

    Surgery_t(z) = z − W_up,t ReLU(W_down,t z),     W_down,t ∈ R^{r × d},  W_up,t ∈ R^{d × r}  (r = 16)
    L_t = mean |Surgery_t(f_θ(x)) − f_{θ0 + τ_t}(x)|   over the entries of task t's unlabeled batch (L1)

with f_θ the merged model's (the base method's) representation and f_{θ0+τ_t} fine-tuned model t's; only the
modules are trained (Adam, lr 1e-3, 1000 steps, batches of 16 per task), W_down,t drawn as torch's
``kaiming_uniform_(a=√5)``, i.e. U(−1/√d, 1/√d), and W_up,t = 0 (so Surgery_t starts as the identity).
Task t's model is the base model followed by Surgery_t before head t.

FusionBench 0.2.33 (``method/surgery/clip_layer_wise_adamerging_surgery.py``) steps each task's module in turn
with one Adam over all modules; the modules do not share parameters and each gets its gradient once per
iteration, so one Adam step on Σ_t L_t is the same update (the step here).

The step is one jitted function: the base model's representation of all K batches in one forward, the
fine-tuned models' one task at a time (`lax.map` over τ: one model's parameters alive at a time), then the
gradient of Σ_t L_t with respect to the modules alone. Batches are split over the mesh's "data" axis as in
AdaMerging. The loop is the one every test-time method shares (`core.optimize.train_resumable`): a run with
``checkpoint_dir`` resumes bit-identically, through AdaMerging's checkpoint machinery, and refuses a checkpoint
of another run, naming what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from adamerging_jax.core.objective import SharedBackbone
from adamerging_jax.core.checkpoint import tree_digest
from adamerging_jax.core.optimize import BatchSource, LoopNames, first_examples, peek_batches, train_resumable
from adamerging_jax.core.parallel import data_mesh, place_tree, replicated, replicated_copy
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked
from adamerging_jax.core.trees import PyTree, check_int, check_number, jsonable, stack_trees

PAPER = "Yang et al., Representation Surgery for Multi-Task Model Merging, ICML 2024"
REFERENCE = ("FusionBench 0.2.33 fusion_bench/method/surgery/clip_layer_wise_adamerging_surgery.py, "
             "fusion_bench/models/surgery/surgerymodelwrapper.py")
FORMULA = ("z'_t = z − W_up,t ReLU(W_down,t z) before head t,  z = f_base(x);  W_t = argmin Σ_t mean |z'_t − "
           "f_{θ0+τ_t}(x)|  (Adam, unlabeled test x)")
HIGHEST = jax.lax.Precision.HIGHEST
FeaturesFn = Callable[[PyTree, Any], jax.Array]
"""``features_fn(params, inputs) -> z [N, d]``: the representation a binding's head reads."""


class SurgeryModules(NamedTuple):
    """Every task's module, stacked on the task axis, in torch's ``Linear.weight`` layout: ``down`` [K, r, d]
    (W_down), ``up`` [K, d, r] (W_up)."""

    down: jax.Array
    up: jax.Array

    def task(self, t: int) -> SurgeryModules:
        """Task t's module (no task axis)."""
        return SurgeryModules(self.down[t], self.up[t])


def init_modules(key: jax.Array, num_tasks: int, dim: int, hidden_dim: int = 16, dtype: Any = jnp.float32
                 ) -> SurgeryModules:
    """W_down ~ U(−1/√d, 1/√d) (torch's ``kaiming_uniform_(a=√5)`` on fan-in d), W_up = 0."""
    bound = 1.0 / math.sqrt(dim)
    down = jax.random.uniform(key, (num_tasks, hidden_dim, dim), dtype, minval=-bound, maxval=bound)
    return SurgeryModules(down, jnp.zeros((num_tasks, dim, hidden_dim), dtype))


def surgery_features(module: SurgeryModules, z: jax.Array) -> jax.Array:
    """z − ReLU(z W_downᵀ) W_upᵀ for one task's module and representations z [N, d]."""
    hidden = jax.nn.relu(jnp.matmul(z, module.down.T, precision=HIGHEST))
    return z - jnp.matmul(hidden, module.up.T, precision=HIGHEST)


def surgery_losses(modules: SurgeryModules, merged: jax.Array, targets: jax.Array) -> jax.Array:
    """L_t = mean |Surgery_t(z_t) − z*_t| per task, [K], for the merged representations `merged` and the
    fine-tuned ones `targets` (both [K, B, d])."""
    moved = jax.vmap(surgery_features)(modules, merged)
    return jnp.mean(jnp.abs(moved - targets), axis=(1, 2))


def surgery_gradients(modules: SurgeryModules, merged: jax.Array, targets: jax.Array
                      ) -> tuple[jax.Array, SurgeryModules]:
    """(L_t per task [K], ∂Σ_t L_t / ∂modules): task t's slice of the gradient is ∂L_t / ∂module_t."""
    per_task, pullback = jax.vjp(lambda m: surgery_losses(m, merged, targets), modules)
    (grads,) = pullback(jnp.ones_like(per_task))
    return per_task, grads


def active_units(modules: SurgeryModules, merged: jax.Array) -> jax.Array:
    """Per task, how many of the r hidden units of ReLU(W_down,t z) are positive for at least one of task t's
    representations `merged` [K, B, d], [K]. A task with none has Surgery_t(z) = z on them: its model is the base.

    Adam moves every entry of W_down by about the learning rate per step whatever its scale (≈ 1/√d), so a
    representation with no negative entry (features after a ReLU) can turn every unit off for good: an inactive
    unit has no gradient."""
    preactivations = jnp.einsum("kbd,krd->kbr", merged, modules.down, precision=HIGHEST)
    return jnp.sum(jnp.any(preactivations > 0, axis=1), axis=-1)


HIDDEN_DIM = Parameter("hidden_dim", 16, "r, the modules' hidden size (the reference's)", minimum=1)
STEPS = Parameter("surgery_steps", None, "Adam steps on the modules; None: the run's AdaMerging steps (FusionBench's "
                  "preset: 1000, the reference's surgery_steps)", kind=int, minimum=0, optional=True)
def positive_number(value: Any) -> float:
    """`value` as a float when it is a finite number > 0 (a learning rate), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number > 0, got {value!r}")
    return float(value)


LR = Parameter("surgery_lr", 1e-3, "Adam's learning rate on the modules (the reference's)", kind=float,
               convert=positive_number)
BATCH = Parameter("surgery_batch_size", None, "unlabeled images per task and step, the first of each step's "
                  "adaptation batch; None: the run's AdaMerging batch size (the reference's: 16, as its AdaMerging's)",
                  kind=int, minimum=1, optional=True)
SEED = Parameter("seed", 0, "the seed of W_down's initial draw", minimum=0)
PARAMETERS = (HIDDEN_DIM, STEPS, LR, BATCH, SEED)
NAMES = LoopNames("Surgery", "L1 loss", "surgery_batch_size")


@dataclasses.dataclass(frozen=True)
class SurgeryConfig:
    """Surgery's settings (the reference's defaults); ``steps``, ``checkpoint_dir``, ``checkpoint_every`` and
    ``quiet`` may change on resume, every other field is part of the checkpoint's fingerprint."""

    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 16
    hidden_dim: int = 16
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    quiet: bool = False

    def __post_init__(self) -> None:
        check_int("SurgeryConfig.steps", self.steps, minimum=0)
        check_number("SurgeryConfig.lr", self.lr, positive=True)
        for name in ("batch_size", "hidden_dim", "checkpoint_every"):
            check_int(f"SurgeryConfig.{name}", getattr(self, name), minimum=1)
        check_int("SurgeryConfig.seed", self.seed, minimum=0)

    def resume_settings(self) -> dict[str, Any]:
        return dict(lr=self.lr, batch_size=self.batch_size, hidden_dim=self.hidden_dim, seed=self.seed)


@dataclasses.dataclass
class SurgeryResult:
    """The trained modules, the per-step losses ``{"loss": [steps, K]}`` (L_t before each step's update) and
    each task's `active_units` on step 0's batch once trained ([K]; 0: that task's module is the identity)."""

    modules: SurgeryModules
    history: dict[str, np.ndarray]
    active_units: np.ndarray


def merged_representations(features_fn: FeaturesFn, base: PyTree, stacked: Any) -> jax.Array:
    """The base model's representations [K, B, d] of the stacked task batches (`trees.stack_trees`), in one
    forward pass over the K · B examples."""
    flat = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), stacked)
    merged = features_fn(base, flat)
    return merged.reshape(*jax.tree_util.tree_leaves(stacked)[0].shape[:2], merged.shape[-1])


def make_surgery_step(features_fn: FeaturesFn, optimizer: optax.GradientTransformation) -> Callable[..., tuple]:
    """The (unjitted) step ``(modules, opt_state, base θ, θ0, τ, batches) -> (modules', opt_state', L [K])``."""

    def step(modules, opt_state, base, pretrained, task_vectors, batches):
        stacked = stack_trees(batches)
        merged = merged_representations(features_fn, base, stacked)
        targets = jax.lax.map(lambda pair: features_fn(add_to_pretrained(pretrained, pair[0]), pair[1]),
                              (task_vectors, stacked))
        per_task, grads = surgery_gradients(modules, jax.lax.stop_gradient(merged), jax.lax.stop_gradient(targets))
        updates, opt_state = optimizer.update(grads, opt_state, modules)
        return optax.apply_updates(modules, updates), opt_state, per_task

    return step


def _jit_step(features_fn: FeaturesFn, lr: float) -> Callable[..., tuple]:
    # The modules and the optimiser state are donated: `train_surgery` passes only copies it made.
    return jax.jit(make_surgery_step(features_fn, optax.adam(lr, b1=0.9, b2=0.999)), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _cached_step(features_fn: FeaturesFn, lr: float) -> Callable[..., tuple]:
    return _jit_step(features_fn, lr)


def _compiled_step(features_fn: FeaturesFn, lr: float) -> Callable[..., tuple]:
    """The jitted step, shared by runs with the same representation and learning rate (kept across calls when
    `features_fn` is hashable)."""
    try:
        return _cached_step(features_fn, lr)
    except TypeError:
        return _jit_step(features_fn, lr)


def _fingerprint(config: SurgeryConfig, modules: SurgeryModules, base: PyTree, pretrained: PyTree,
                 task_vectors: PyTree, data: str, mesh: Mesh) -> dict[str, Any]:
    """The parts `core.optimize.fingerprint_differences` compares; the base model's digest is a setting."""
    settings = {**config.resume_settings(), "base_model": tree_digest(base, replicated(mesh))}
    layout = json.dumps([[list(x.shape), str(x.dtype)] for x in modules])
    fingerprint = dict(settings=settings, coefficients=hashlib.sha256(layout.encode()).hexdigest()[:16],
                       pretrained=tree_digest(pretrained, replicated(mesh)),
                       task_vectors=tree_digest(task_vectors, replicated(mesh)), data=data)
    return json.loads(json.dumps(jsonable(fingerprint)))


def train_surgery(
    features_fn: FeaturesFn,
    base: PyTree,
    pretrained: PyTree,
    task_vectors: PyTree,
    batches: BatchSource,
    config: SurgeryConfig = SurgeryConfig(),
    *,
    modules: SurgeryModules | None = None,
    mesh: Mesh | None = None,
) -> SurgeryResult:
    """Train every task's Surgery module on the base model `base` (module docstring).

    Args:
      features_fn: ``features_fn(params, inputs) -> z [N, d]``, the representation the heads read.
      base: the merged model's parameters (the base method's θ).
      pretrained, task_vectors: θ0 and the stacked τ [K, ...]; fine-tuned model t is θ0 + τ_t.
      batches: per step, K unlabeled batches (a function ``step -> batches`` or an iterable, as AdaMerging's);
        the first ``config.batch_size`` examples of each are used.
      config: `SurgeryConfig`.
      modules: initial modules (default: `init_modules` with ``config.seed``, in θ0's floating dtype).
      mesh: devices (default: a 1-D "data" mesh over all); batches are split over its "data" axis.
    """
    k = check_stacked(pretrained, task_vectors)
    mesh = mesh or data_mesh()
    base, pretrained = place_tree(base, mesh, False), place_tree(pretrained, mesh, False)
    task_vectors = place_tree(task_vectors, mesh, False)
    first, batches = peek_batches(batches)
    if modules is None:
        dim, dtype = _representation(features_fn, base, first)
        modules = init_modules(jax.random.PRNGKey(config.seed), k, dim, config.hidden_dim, dtype)
    initial = replicated_copy(modules, mesh)
    opt_state = replicated_copy(optax.adam(config.lr, b1=0.9, b2=0.999).init(initial), mesh)
    compiled = _compiled_step(features_fn, config.lr)

    def step(state: tuple, placed: list[Any]) -> tuple[tuple, jax.Array]:
        trained, state, per_task = compiled(*state, base, pretrained, task_vectors, placed)
        return (trained, state), per_task

    def fingerprint(data: str) -> dict[str, Any]:
        return _fingerprint(config, initial, base, pretrained, task_vectors, data, mesh)

    (trained, _), history = train_resumable(step, (initial, opt_state), batches, config, fingerprint, NAMES,
                                            mesh=mesh, tasks=k)
    step_0 = [first_examples(batch, config.batch_size, t, 0, NAMES.batch_size) for t, batch in enumerate(first)]
    units = np.asarray(active_units(trained, merged_representations(features_fn, base, stack_trees(step_0))))
    _warn_inactive(units, config)
    return SurgeryResult(trained, {"loss": history}, units)


def _warn_inactive(units: np.ndarray, config: SurgeryConfig) -> None:
    """A warning naming the tasks whose module ended with no active unit (so their model is the base's)."""
    idle = [int(t) for t in np.flatnonzero(units == 0)]
    if idle and config.steps > 0:
        warnings.warn(f"Surgery: the modules of tasks {idle} have none of their {config.hidden_dim} hidden units "
                      f"active on step 0's batch after {config.steps} steps (ReLU(W_down z) = 0), so those tasks' "
                      f"models are the base model; Adam at surgery_lr {config.lr:g} turned them off (common when "
                      "z has no negative entry, e.g. features after a ReLU): a smaller surgery_lr keeps them",
                      stacklevel=3)


def _representation(features_fn: FeaturesFn, base: PyTree, probe: Any) -> tuple[int, Any]:
    """(d, dtype) of the representation, from its abstract evaluation on one example of step 0's first batch."""
    example = jax.tree_util.tree_map(lambda x: x[:1], probe[0])
    shape = jax.eval_shape(features_fn, base, example)
    if len(shape.shape) != 2:
        raise ValueError(f"features_fn must return representations [N, d], got shape {shape.shape}")
    return int(shape.shape[-1]), shape.dtype


@dataclasses.dataclass(frozen=True)
class SurgeryModels:
    """Surgery's per-task models: ``models(t)`` is ``{"base": θ, "surgery": module_t}`` (None for a task it
    did not merge), evaluated by `surgery_apply_fn`."""

    base: PyTree
    modules: SurgeryModules

    def __call__(self, task: int) -> dict[str, Any] | None:
        if task >= self.modules.down.shape[0]:
            return None
        return {"base": self.base, "surgery": self.modules.task(task)}


def surgery_apply_fn(features_fn: FeaturesFn, head_fn: Callable[[jax.Array, int], jax.Array]) -> SharedBackbone:
    """``apply_fn(models(t), x, t) = head_t(Surgery_t(features_fn(θ, x)))`` as a `SharedBackbone` (the
    backbone compiled once for every task)."""
    return SharedBackbone(
        features=lambda params, x: surgery_features(params["surgery"], features_fn(params["base"], x)),
        head=head_fn)
