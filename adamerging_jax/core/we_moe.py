"""Weight-ensembling MoE (Tang, Shen, Du, Zhou, Liu, Zhang and Tao, "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts", ICML 2024), as FusionBench 0.2.33 builds and trains it
(``method/we_moe/we_moe.py``, ``clip_we_moe.py``, ``models/we_moe.py``).

Every module outside a declared module group (CLIP: the MLPs of the top blocks) is task arithmetic
θ0 + λ Σ_k τ_k (λ = ``init_lambda``); every linear layer of the group becomes, per example x,

    W(h) = W_0 + Σ_k r_k(h) τ_k,     r(h) = mean_i fc2(ReLU(fc1(h_i)))          (`models.routing`)

with W_0 the pretrained layer (not the merged one: the router's last bias starts at λ, so r ≈ λ and the
group starts at task arithmetic's W_0 + λ Σ_k τ_k), τ_k task k's task vector of it and h the group's input
(CLIP: the MLP's input ln2(z), every token i). Only the routers are trained, by entropy minimisation on the
unlabeled test batches:

    min_r Σ_t mean_{x ∈ batch_t} H(softmax(head_t(f(x)))),   H(p) = −Σ_c p_c log(p_c + 1e-8)

with Adam (lr 1e-4, 1000 steps, 16 images per task: the reference's defaults). While training r is averaged
over each task's batch (the reference's ``batch_reduce``: one ensembled weight per task and step); the
trained model routes every example on its own.

The step is one jitted function: the K task batches through the routed model as one batch of K groups, each
head on its slice, the gradient of Σ_t L_t with respect to the routers alone. With ``sequential_tasks`` the K
batches go through the model one after another instead (a ``lax.scan`` over the tasks, ∇ = Σ_t ∇L_t summed in
the loop): the same gradient up to the order of float summation, with the activations and ensembled weights of
one task's batch alive at a time rather than K's (ViT-L/14, 8 tasks × 16 images, XLA:CPU's buffer assignment:
122 → 20.9 GiB of temporaries, 28.4 GiB in all; benchmarks/test_time_step_benchmark.py --memory-report).
Batches are split over the mesh's "data" axis as in AdaMerging. The loop is the one every test-time method
shares (`core.optimize.train_resumable`): a run with ``checkpoint_dir`` resumes bit-identically through
AdaMerging's checkpoint machinery and refuses a checkpoint of another run, naming what differs.

Memory: the routed group holds W_0 and K task vectors per upscaled layer, so with P the model's parameters,
P_g those of one layer's group and P_r one router (2-layer, width d: d² + d + dK + K),

    P_WEMoE = P + k_up · K · P_g + k_up · P_r

(+ the merged parameters the group replaces, kept nowhere). CLIP ViT-B/32, 8 tasks, all 12 MLPs upscaled
(P_g = 2 · 768 · 3072 + 3072 + 768 = 4.72M, P_r = 0.60M): 453.4M task-vector and 7.2M router parameters on top of
the model, 574M in the reference's count against its 113M for the model (the image tower alone is 87.8M here:
548M); τ held in bf16 (``precision: bfloat16``) halves the 453M part.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from adamerging_jax.core.checkpoint import tree_digest
from adamerging_jax.core.objective import SharedBackbone, mean_entropy
from adamerging_jax.core.optimize import BatchSource, LoopNames, train_resumable
from adamerging_jax.core.parallel import data_mesh, place_tree, replicated, replicated_copy
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import check_stacked
from adamerging_jax.core.trees import PyTree, check_int, check_number, jsonable, stack_trees
from adamerging_jax.models.routing import Routing

PAPER = "Tang et al., Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, ICML 2024"
REFERENCE = ("FusionBench 0.2.33 fusion_bench/method/we_moe/ (we_moe.py, clip_we_moe.py), "
             "fusion_bench/models/we_moe.py")
FORMULA = ("W(h) = W_0 + Σ_k r_k(h) τ_k in the upscaled modules, r(h) = mean_tokens fc2(ReLU(fc1(h)));  the rest "
           "θ0 + λ Σ_k τ_k;  r = argmin Σ_t mean_x H(softmax(head_t(f(x))))  (Adam, unlabeled test x)")
ENTROPY_EPS = 1e-8
NAMES = LoopNames("WEMoE", "entropy", "we_moe_batch_size")


@dataclasses.dataclass(frozen=True)
class ExpertMixture:
    """How a model family becomes a weight-ensembling MoE (declared by its binding).

    Attributes:
      layers: how many layers can be upscaled (the top ``k`` of them are).
      module_group: the upscaled modules, in words (for the model card and errors).
      upscale: ``upscale(θ0, θ_merged, τ, k, expert_dtype) -> frozen``: the routed model's frozen parameters,
        θ_merged outside the group of the top k layers, W_0 and τ [K, ...] (in ``expert_dtype``, None: θ0's) in it.
      init_routers: ``init_routers(key, θ0, k, routing) -> routers``, the initial routers of the top k layers.
      features: ``features(frozen, routers, inputs, groups) -> z [N, d]``, the representation the heads read;
        ``groups`` None routes each example on its own, G averages r over G equal consecutive groups.
      expert_leaves: ``expert_leaves(frozen) -> {name: array}``: the task vectors of the group, for the export.
    """

    layers: int
    module_group: str
    upscale: Callable[[PyTree, PyTree, PyTree, int, Any], PyTree]
    init_routers: Callable[[jax.Array, PyTree, int, Routing], PyTree]
    features: Callable[[PyTree, PyTree, Any, int | None], jax.Array]
    expert_leaves: Callable[[PyTree], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class WEMoEConfig:
    """WEMoE's training settings (the reference's defaults); ``steps``, ``checkpoint_dir``, ``checkpoint_every``
    and ``quiet`` may change on resume, every other field is part of the checkpoint's fingerprint."""

    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 16
    sequential_tasks: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    quiet: bool = False

    def __post_init__(self) -> None:
        check_int("WEMoEConfig.steps", self.steps, minimum=0)
        if not isinstance(self.sequential_tasks, bool):
            raise ValueError(f"WEMoEConfig.sequential_tasks must be a bool, got {self.sequential_tasks!r}")
        check_number("WEMoEConfig.lr", self.lr, positive=True)
        check_int("WEMoEConfig.batch_size", self.batch_size, minimum=1)
        check_int("WEMoEConfig.checkpoint_every", self.checkpoint_every, minimum=1)

    def resume_settings(self) -> dict[str, Any]:
        return dict(lr=self.lr, batch_size=self.batch_size, sequential_tasks=self.sequential_tasks)


@dataclasses.dataclass
class WEMoEResult:
    """The trained routers and the per-step losses ``{"loss": [steps, K]}`` (L_t before each step's update)."""

    routers: PyTree
    history: dict[str, np.ndarray]


def task_losses(mixture: ExpertMixture, head_fn: Callable[[jax.Array, int], Any], routers: PyTree, frozen: PyTree,
                batches: list[Any]) -> jax.Array:
    """L_t = mean_x H(softmax(head_t(f(x)))) per task [K]: the K batches (equal sizes) through the routed model
    as K groups, each routed by its batch's mean r."""
    k = len(batches)
    inputs = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *batches)
    z = mixture.features(frozen, routers, inputs, k)
    z = z.reshape(k, -1, *z.shape[1:])
    return jnp.stack([mean_entropy(head_fn(z[t], t), ENTROPY_EPS) for t in range(k)])


def joint_losses_and_gradient(mixture: ExpertMixture, head_fn: Callable[[jax.Array, int], Any], routers: PyTree,
                              frozen: PyTree, batches: list[Any]) -> tuple[jax.Array, PyTree]:
    """(L [K], ∂Σ_t L_t / ∂routers) with the K batches through the model at once (`task_losses`)."""
    per_task, pullback = jax.vjp(lambda r: task_losses(mixture, head_fn, r, frozen, batches), routers)
    (grads,) = pullback(jnp.ones_like(per_task))
    return per_task, grads


def sequential_losses_and_gradient(mixture: ExpertMixture, head_fn: Callable[[jax.Array, int], Any],
                                   routers: PyTree, frozen: PyTree, batches: list[Any]) -> tuple[jax.Array, PyTree]:
    """(L [K], Σ_t ∂L_t / ∂routers) with one task's batch through the model at a time: a ``lax.scan`` over the
    tasks (head t chosen by ``lax.switch``), so XLA keeps one task's activations for the backward, not K's."""
    heads = [functools.partial(lambda t, z: mean_entropy(head_fn(z, t), ENTROPY_EPS), t) for t in range(len(batches))]
    stacked = stack_trees(batches)

    def one_task(total: PyTree, task_and_batch: tuple[jax.Array, Any]) -> tuple[PyTree, jax.Array]:
        task, batch = task_and_batch
        loss, grads = jax.value_and_grad(
            lambda r: jax.lax.switch(task, heads, mixture.features(frozen, r, batch, 1)))(routers)
        return jax.tree_util.tree_map(jnp.add, total, grads), loss

    total, per_task = jax.lax.scan(one_task, jax.tree_util.tree_map(jnp.zeros_like, routers),
                                   (jnp.arange(len(batches)), stacked))
    return per_task, total


def make_we_moe_step(mixture: ExpertMixture, head_fn: Callable[[jax.Array, int], Any],
                     optimizer: optax.GradientTransformation, sequential_tasks: bool = False
                     ) -> Callable[..., tuple]:
    """The (unjitted) step ``(routers, opt_state, frozen, batches) -> (routers', opt_state', L [K])``: one Adam
    step on ∂Σ_t L_t / ∂routers, the tasks' batches through the model at once or, with ``sequential_tasks``, one
    after another (`sequential_losses_and_gradient`)."""
    losses_and_gradient = sequential_losses_and_gradient if sequential_tasks else joint_losses_and_gradient

    def step(routers, opt_state, frozen, batches):
        per_task, grads = losses_and_gradient(mixture, head_fn, routers, frozen, batches)
        updates, opt_state = optimizer.update(grads, opt_state, routers)
        return optax.apply_updates(routers, updates), opt_state, per_task

    return step


def _jit_step(mixture: ExpertMixture, head_fn: Callable, lr: float, sequential_tasks: bool) -> Callable[..., tuple]:
    # The routers and the optimiser state are donated: `train_we_moe` passes only copies it made.
    step = make_we_moe_step(mixture, head_fn, optax.adam(lr, b1=0.9, b2=0.999), sequential_tasks)
    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _cached_step(mixture: ExpertMixture, head_fn: Callable, lr: float, sequential_tasks: bool
                 ) -> Callable[..., tuple]:
    return _jit_step(mixture, head_fn, lr, sequential_tasks)


def _compiled_step(mixture: ExpertMixture, head_fn: Callable, lr: float, sequential_tasks: bool
                   ) -> Callable[..., tuple]:
    """The jitted step, shared by runs with the same mixture, heads, learning rate and task order (when
    hashable)."""
    try:
        return _cached_step(mixture, head_fn, lr, sequential_tasks)
    except TypeError:
        return _jit_step(mixture, head_fn, lr, sequential_tasks)


def _fingerprint(config: WEMoEConfig, routers: PyTree, frozen: PyTree, data: str, mesh: Mesh) -> dict[str, Any]:
    """What `core.optimize.fingerprint_differences` compares: the settings, the initial routers (their draw and
    layout), the routed model's frozen parameters (θ_merged, W_0 and τ in one digest, a setting: a change names
    ``routed_model``) and the data."""
    sharding = replicated(mesh)
    layout = json.dumps([[list(x.shape), str(x.dtype)] for x in jax.tree_util.tree_leaves(routers)])
    settings = {**config.resume_settings(), "initial_routers": tree_digest(routers, sharding),
                "routed_model": tree_digest(frozen, sharding)}
    fingerprint = dict(settings=settings, coefficients=hashlib.sha256(layout.encode()).hexdigest()[:16],
                       pretrained="in routed_model", task_vectors="in routed_model", data=data)
    return json.loads(json.dumps(jsonable(fingerprint)))


def train_we_moe(
    mixture: ExpertMixture,
    head_fn: Callable[[jax.Array, int], Any],
    frozen: PyTree,
    routers: PyTree,
    batches: BatchSource,
    config: WEMoEConfig = WEMoEConfig(),
    *,
    mesh: Mesh | None = None,
    tasks: int | None = None,
) -> WEMoEResult:
    """Train the routers of the routed model ``(frozen, routers)`` (module docstring).

    Args:
      mixture: the binding's `ExpertMixture`.
      head_fn: ``head_fn(z, task) -> logits``, the heads after the representation.
      frozen, routers: the routed model (`ExpertMixture.upscale`, `ExpertMixture.init_routers`).
      batches: per step, K unlabeled batches (``step -> batches`` or an iterable, as AdaMerging's); the first
        ``config.batch_size`` examples of each are used.
      config: `WEMoEConfig`.
      mesh: devices (default: a 1-D "data" mesh over all); batches are split over its "data" axis.
      tasks: K, the experts the routers weigh; a step with batches for another number of tasks is refused
        (default: step 0's count).
    """
    mesh = mesh or data_mesh()
    frozen = place_tree(frozen, mesh, False)
    initial = replicated_copy(routers, mesh)
    opt_state = replicated_copy(optax.adam(config.lr, b1=0.9, b2=0.999).init(initial), mesh)
    compiled = _compiled_step(mixture, head_fn, config.lr, config.sequential_tasks)

    def step(state: tuple, placed: list[Any]) -> tuple[tuple, jax.Array]:
        trained, state, per_task = compiled(*state, frozen, placed)
        return (trained, state), per_task

    def fingerprint(data: str) -> dict[str, Any]:
        return _fingerprint(config, initial, frozen, data, mesh)

    (trained, _), history = train_resumable(step, (initial, opt_state), batches, config, fingerprint, NAMES, mesh=mesh,
                                            tasks=tasks)
    return WEMoEResult(trained, {"loss": history})


@dataclasses.dataclass(frozen=True)
class WEMoEModel:
    """The trained routed model: the frozen parameters and the routers (evaluated by `we_moe_apply_fn`)."""

    frozen: PyTree
    routers: PyTree


def we_moe_apply_fn(mixture: ExpertMixture, head_fn: Callable[[jax.Array, int], Any]) -> SharedBackbone:
    """``apply_fn(WEMoEModel, x, t) = head_t(f(x))`` with every example routed on its own (the reference's
    ``batch_reduce = False`` after training), as a `SharedBackbone` (the routed backbone compiled once)."""
    return SharedBackbone(
        features=lambda model, x: mixture.features(model["frozen"], model["routers"], x, None), head=head_fn)


UPSCALE_TOP_K = Parameter("upscale_top_k", None, "upscale the module group of the top k layers; None: every layer "
                          "(the reference's)", kind=int, minimum=1, optional=True)
INIT_LAMBDA = Parameter("init_lambda", 0.3, "task arithmetic's λ for the modules outside the group, and the "
                        "routers' initial r (the reference's init_lambda)")
ROUTER_LAYERS = Parameter("router_hidden_layers", 2, "the router's depth (the reference's router_hidden_layers)",
                          choices=(0, 1, 2))
STEPS = Parameter("we_moe_steps", None, "Adam steps on the routers; None: the run's AdaMerging steps (the "
                  "reference's max_steps: 1000)", kind=int, minimum=0, optional=True)
LR = Parameter("we_moe_lr", 1e-4, "Adam's learning rate on the routers (the reference's)", minimum=0.0)
SEQUENTIAL = Parameter("we_moe_sequential_tasks", False, "run the tasks' batches through the model one after "
                       "another in each step (the same gradient; one task's activations in memory, not K's)")
BATCH = Parameter("we_moe_batch_size", None, "unlabeled images per task and step, the first of each step's "
                  "adaptation batch; None: the run's AdaMerging batch size (the reference's: 16)",
                  kind=int, minimum=1, optional=True)
SEED = Parameter("seed", 0, "the seed of the routers' initial draw (N(0, 0.01²) kernels)", minimum=0)
PARAMETERS = (UPSCALE_TOP_K, INIT_LAMBDA, ROUTER_LAYERS, STEPS, LR, BATCH, SEQUENTIAL, SEED)


def upscaled_layers(mixture: ExpertMixture, top_k: int | None) -> int:
    """k: the layers whose module group is upscaled (all for None); a ValueError past the model's layers."""
    if top_k is None:
        return mixture.layers
    if top_k > mixture.layers:
        raise ValueError(f"upscale_top_k = {top_k} exceeds the {mixture.layers} layers the model can upscale "
                         f"({mixture.module_group})")
    return top_k


def build_routed_model(mixture: ExpertMixture, pretrained: PyTree, merged: PyTree, task_vectors: PyTree,
                       top_k: int | None, routing: Routing, seed: int, expert_dtype: Any = None
                       ) -> tuple[PyTree, PyTree]:
    """(frozen, initial routers) of the routed model (`ExpertMixture.upscale`, `ExpertMixture.init_routers`)."""
    k = upscaled_layers(mixture, top_k)
    check_stacked(pretrained, task_vectors)
    frozen = mixture.upscale(pretrained, merged, task_vectors, k, expert_dtype)
    return frozen, mixture.init_routers(jax.random.PRNGKey(seed), pretrained, k, routing)
