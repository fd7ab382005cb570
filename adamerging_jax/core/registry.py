"""Merge methods as values: a name, a label, a paper, declared parameters, whether unlabeled data is needed,
and how the merged model is built. One registry names them all; a user's own method runs everywhere a
built-in one does once `register`ed.

A method builds a `Merged` model from the pretrained tree θ0 and the stacked task vectors τ (`[K, ...]` per
leaf):

- data-free methods: ``build(θ0, τ, **parameters)`` — weight averaging, task arithmetic, TIES, DARE, and the
  two reference rows of the paper's tables (pretrained θ0, and the individual fine-tuned models θ0 + τ_t);
- adaptive methods (``needs_data=True``): ``build(θ0, τ, context, **parameters)`` with an `AdaptContext`
  holding ``apply_fn``, the unlabeled batches and the `AdaMergingConfig`. The four AdaMerging rows of the
  paper are one method with two parameters, not four names: the granularity of λ (``"task"``: one λ per task;
  ``"layer"``: one per task and tensor) and the task vectors λ scales, a registered transform
  (`core.task_vector_transforms`: ``"raw"`` τ, ``"ties"`` TIES's trimmed, sign-agreeing τ̂ i.e. AdaMerging++,
  ``"dare"``, and those registered beside newer methods).

Methods that read leaves as weight matrices (``uses_view``) also get ``view``, the binding's `MatrixView`.

    spec = method_spec("ties", density=0.1)              # validated; unknown names and bad values raise
    merged = spec.build(theta0, tau)                      # Merged(params=...)
    register(MergeMethod("my_merge", "My merge", "me", build=lambda p, t, alpha: ..., parameters=(
        Parameter("alpha", 0.5, "mixing weight", minimum=0.0, maximum=1.0),)))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax

from adamerging_jax.core import methods as core_methods
from adamerging_jax.core.catalog import Catalog
from adamerging_jax.core import regmean
from adamerging_jax.core import emr, tall_masks
from adamerging_jax.core import magmax, model_stock, slerp, wudi
from adamerging_jax.core import isotropic, surgery, tsv, we_moe
from adamerging_jax.core.coefficients import Coefficients
from adamerging_jax.core.merge import merge
from adamerging_jax.core.matrix_view import MatrixView, requires_view
from adamerging_jax.core.optimize import AdaMergingConfig, BatchSource, adamerging
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import num_tasks
from adamerging_jax.core.task_vector_transforms import (DENSITY, DROP_RATE, EPSILON, GAMMA, SCOPE, SEED, TOTAL_SIZE,
                                                        TRANSFORM_PARAMETER, rescale_parameter, transform_task_vectors)
from adamerging_jax.core.transforms import check_keep_band
from adamerging_jax.core.trees import PyTree

PerTaskParams = Callable[[int], "PyTree | None"]


@dataclasses.dataclass
class Merged:
    """What a method built: one merged tree for every task (``params``) or one per task (``per_task``,
    returning None where the method has no model, e.g. an individual model for an unseen task); for
    adaptive methods also λ, the loss history ``{"loss": [steps, K]}``, the task vectors λ scaled and the
    model at the initial λ (for the entropy before and after). ``apply_fn`` is the forward pass its models run
    with where it is not the binding's (Surgery: the base model, then task t's module, then head t)."""

    params: PyTree | None = None
    per_task: PerTaskParams | None = None
    coefficients: Coefficients | None = None
    history: dict[str, Any] | None = None
    initial_params: PyTree | None = None
    apply_fn: Callable[..., Any] | None = None

    def for_task(self, task: int) -> PyTree | None:
        return self.per_task(task) if self.per_task is not None else self.params


@dataclasses.dataclass(frozen=True)
class AdaptContext:
    """What an adaptive method gets besides θ0 and τ.

    Attributes:
      apply_fn: ``apply_fn(params, inputs, task) -> logits``.
      batches: the unlabeled batches, ``step -> [batch per task]`` or an iterable (see `adamerging`).
      config: the shared `AdaMergingConfig` (steps, lr, clamp, ...); a method sets its own granularity.
      mesh: devices to run on (None: all).
      checkpoint_dir: where this method's run state is kept (None: not resumable).
      gram_fn: the binding's Gram capture for RegMean (`core.regmean.GramFn`: ``gram_fn(params, inputs) -> {leaf
        path: input Gram matrix [(L,) in, in]}``; for RegMean++ also its staged form `core.regmean.LayerwiseGrams`,
        e.g. ``clip.vision_grams(variant)``); None where the binding has none.
      features_fn, head_fn: the binding's representation ``features_fn(params, inputs) -> z [N, d]`` and the head
        after it, ``head_fn(z, task) -> logits`` (``apply_fn = head_fn(features_fn(...))``), for Surgery; None
        where the binding has none.
      mixture: the binding's weight-ensembling MoE form (`core.we_moe.ExpertMixture`), for WEMoE; None where the
        binding declares none.
    """

    apply_fn: Callable[..., Any]
    batches: BatchSource
    config: AdaMergingConfig
    mesh: Any = None
    checkpoint_dir: str | None = None
    gram_fn: Callable[..., Any] | None = None
    features_fn: Callable[..., Any] | None = None
    head_fn: Callable[..., Any] | None = None
    mixture: Any = None


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A merge method as a value (see the module docstring).

    Attributes:
      name: the registry key (also the key of its results).
      label: the row title in tables.
      paper: where the method comes from.
      build: ``(θ0, τ, **parameters) -> Merged``, or ``(θ0, τ, context, **parameters)`` when `needs_data`.
      parameters: the declared, user-settable parameters with their defaults.
      needs_data: whether the method learns from unlabeled batches (gets an `AdaptContext`).
      fixed: parameters of `build` this method sets and users cannot (e.g. a variant's granularity).
      per_task_models: the method builds one model per task (no single merged model to export, and none for a
        task it did not merge).
      uses_view: `build` also gets ``view``, the binding's `MatrixView` (None where the binding declares none):
        the method reads leaves as weight matrices, or as the per-layer tensors a stacked leaf holds (TIES's
        per-tensor scope).
      num_tasks: the exact number of task vectors the method merges (SLERP: 2); None: any. Groups leave such a
        method out (it is named explicitly), and `MethodSpec.build` refuses another K.
      requires: ``requires(context, view) -> reason or None``: why a binding (its `AdaptContext` — None for a
        data-free method — and matrix view) cannot run the method; None: any binding can. Named by itself, such
        a method is refused with the reason; reached through a group, it is skipped with the reason logged.
      formula: the method in one line of math (for tables and docs/methods.md).
      reference: the implementation its results are compared with (file of the reference code).
      learns_coefficients: the method learns λ per task (AdaMerging): its parameters hold λ's ``granularity``,
        and given λ (``merge --weights``) can stand in for the learning.
      grouped: the method is a member of the groups it qualifies for (`GROUPS`); False for a method whose
        defaults repeat another's (the generic ``adamerging`` is layer-wise AdaMerging), so ``all`` runs it once.
      streaming: how a merge of checkpoints larger than memory runs it tensor by tensor from disk
        (`adamerging_jax.merging.streaming`): ``"tensor"``, its result for each tensor is its result on a
        one-tensor tree; ``"entry"``, its merged entry depends on that entry alone, so it runs on parts of a
        tensor (a ``seed`` parameter is folded with the tensor's and the part's index: each draws its own
        randomness); ``"global"``, as ``"tensor"`` or ``"entry"`` once model-wide statistics found in first
        streaming passes are given to `build` as keyword arguments (TIES: ``thresholds``, ``majority``); None:
        in memory only.
    """

    name: str
    label: str
    paper: str
    build: Callable[..., Merged]
    parameters: tuple[Parameter, ...] = ()
    needs_data: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    per_task_models: bool = False
    uses_view: bool = False
    num_tasks: int | None = None
    requires: Callable[[AdaptContext | None, MatrixView | None], str | None] | None = None
    formula: str = ""
    reference: str = ""
    learns_coefficients: bool = False
    grouped: bool = True
    streaming: str | None = None

    def parameter(self, name: str) -> Parameter:
        for parameter in self.parameters:
            if parameter.name == name:
                return parameter
        allowed = [p.name for p in self.parameters]
        raise ValueError(f"method {self.name!r} has no parameter {name!r}; its parameters: {allowed or 'none'}")

    def unavailable(self, context: AdaptContext | None, view: MatrixView | None) -> str | None:
        """Why a binding with this context and view cannot run the method (`requires`), or None."""
        return self.requires(context, view) if self.requires is not None else None

    def configure(self, **values: Any) -> MethodSpec:
        """This method with its parameters: defaults filled in, every value validated."""
        chosen = {p.name: p.default for p in self.parameters}
        for name, value in values.items():
            chosen[name] = self.parameter(name).validate(self.name, value)
        return MethodSpec(self, tuple(chosen.items()))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method with its parameter values: one row of a run (``from_group``: it was named through a
    group, not by itself)."""

    method: MergeMethod
    values: tuple[tuple[str, Any], ...] = ()
    from_group: bool = False

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def label(self) -> str:
        return self.method.label

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.values)

    def build(self, pretrained: PyTree, task_vectors: PyTree, context: AdaptContext | None = None,
              view: MatrixView | None = None) -> Merged:
        """The merged model; `context` for methods that learn from data, `view` (the binding's matrix view)
        for methods that read leaves as weight matrices."""
        arguments = {**self.params, **dict(self.method.fixed)}
        expected = self.method.num_tasks
        if expected is not None and (count := num_tasks(task_vectors)) != expected:
            raise ValueError(f"method {self.name!r} merges exactly {expected} models; got {count} task vectors")
        if self.method.uses_view:
            arguments["view"] = view
        if self.method.needs_data and context is None:
            raise ValueError(f"method {self.name!r} learns from unlabeled data: give it an AdaptContext (the "
                             "unlabeled batches and what it reads from the binding: apply_fn, or gram_fn for RegMean)")
        if (reason := self.method.unavailable(context, view)) is not None:
            raise ValueError(f"method {self.name!r} {reason}")
        if not self.method.needs_data:
            return self.method.build(pretrained, task_vectors, **arguments)
        return self.method.build(pretrained, task_vectors, context, **arguments)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record: name, label, paper, parameters."""
        params = {**self.params, **dict(self.method.fixed)}
        return dict(name=self.name, label=self.label, paper=self.method.paper, params=params)


REGISTRY = Catalog("merge method")


REFERENCE_ROWS = ("pretrained", "individual")
"""The reference rows of a table (θ0 alone, each fine-tuned model on its task): registered, not merge methods."""

GROUPS: dict[str, Callable[[MergeMethod], bool]] = {
    "all": lambda method: True,
    "data_free": lambda method: not method.needs_data and method.name not in REFERENCE_ROWS,
    "adaptive": lambda method: method.needs_data,
}
"""Named groups of registered methods, usable wherever methods are named (``--methods data_free``)."""


def group_members(group: str) -> list[str]:
    """The registered methods of `group`, in registration order."""
    return [name for name, method in REGISTRY.items()
            if method.grouped and method.num_tasks is None and GROUPS[group](method)]


def _entry_name(entry: Any) -> Any:
    """The method name of a `methods` entry: a name, a ``{"name": ...}`` mapping or a spec."""
    if isinstance(entry, Mapping):
        return entry.get("name")
    return entry if isinstance(entry, str) else getattr(entry, "name", None)


def expand_groups(methods: Iterable[Any]) -> list[Any]:
    """`methods` with each group name (``"all"``, ``"data_free"``, ``"adaptive"``) replaced by its members, as
    specs marked ``from_group`` (a binding that cannot run one skips it, see `MergeMethod.requires`). A method
    named both directly and through a group is kept once, at its first place, as named directly; one named
    twice directly stays twice, for `method_specs` to refuse."""
    expanded: list[Any] = []
    for entry in methods:
        if isinstance(entry, str) and entry in GROUPS:
            named = {_entry_name(item) for item in expanded}
            expanded += [dataclasses.replace(get_method(name).configure(), from_group=True)
                         for name in group_members(entry) if name not in named]
            continue
        place = next((i for i, item in enumerate(expanded) if isinstance(item, MethodSpec) and item.from_group
                      and item.name == _entry_name(entry)), None)
        if place is None:
            expanded.append(entry)
        else:
            expanded[place] = entry
    return expanded


def register(method: MergeMethod, *, replace: bool = False) -> MergeMethod:
    """Add `method` to the registry (an existing name needs ``replace=True``); returns it."""
    if method.name in GROUPS:
        raise ValueError(f"{method.name!r} names a group of methods ({sorted(GROUPS)}); choose another method name")
    return REGISTRY.add(method, replace=replace)


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`; an unknown name lists the known ones."""
    return REGISTRY.lookup(name)


def method_spec(method: str | MethodSpec | Mapping[str, Any], **values: Any) -> MethodSpec:
    """A `MethodSpec` from a name (+ parameter values), a mapping ``{"name": ..., **parameters}`` (config
    files), or a spec (returned as is, or reconfigured with `values`)."""
    if isinstance(method, MethodSpec):
        if not values:
            return method
        return dataclasses.replace(method.method.configure(**{**method.params, **values}), from_group=method.from_group)
    if isinstance(method, Mapping):
        fields = dict(method)
        if "name" not in fields:
            raise ValueError(f"a method entry needs a 'name', got {fields}")
        return method_spec(fields.pop("name"), **fields, **values)
    if not isinstance(method, str):
        raise ValueError(f"a method is a name, a mapping with a 'name' or a MethodSpec, got {method!r}")
    return get_method(method).configure(**values)


def method_specs(methods: Iterable[str | MethodSpec | Mapping[str, Any]]) -> tuple[MethodSpec, ...]:
    """`method_spec` of each, group names expanded (`expand_groups`); a name given twice is refused (results are
    keyed by method name)."""
    specs = tuple(method_spec(m) for m in expand_groups(methods))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods listed more than once: {duplicates}")
    return specs


# --- the built-in methods ------------------------------------------------------------------------------------

def _pretrained(pretrained: PyTree, task_vectors: PyTree) -> Merged:
    return Merged(params=pretrained)


def _individual(pretrained: PyTree, task_vectors: PyTree) -> Merged:
    add = jax.jit(lambda p, tv, t: jax.tree_util.tree_map(lambda a, b: (a + b[t]).astype(a.dtype), p, tv))
    count = jax.tree_util.tree_leaves(task_vectors)[0].shape[0]
    return Merged(per_task=lambda task: add(pretrained, task_vectors, task) if task < count else None)


def _data_free(function: Callable[..., PyTree]) -> Callable[..., Merged]:
    return lambda pretrained, task_vectors, **values: Merged(params=function(pretrained, task_vectors, **values))


def _mergekit(name: str, function: Callable[..., PyTree]) -> Callable[..., Merged]:
    """The build of a method of mergekit's generalized task arithmetic: its parameter ``lambda`` (a Python keyword)
    is the function's ``lambda_``, and DELLA's keep probabilities density ± epsilon are checked naming the method."""

    def build(pretrained: PyTree, task_vectors: PyTree, view: MatrixView | None = None, **values: Any) -> Merged:
        values["lambda_"] = values.pop("lambda")
        if "epsilon" in values:
            check_keep_band(values["density"], values["epsilon"], f"method {name!r}")
        return Merged(params=function(pretrained, task_vectors, view=view, **values))

    return build


def _mergekit_parameters(sparsifier: tuple[Parameter, ...], normalize: bool, rescale: bool) -> tuple[Parameter, ...]:
    """mergekit's parameters (and defaults) of a generalized task arithmetic method; its per-model ``weight`` is one
    ``scale`` for every task."""
    return (Parameter("density", 1.0, "fraction of each tensor's entries kept (mergekit's default: all)",
                      minimum=0.0, maximum=1.0),
            *sparsifier,
            Parameter("scale", 0.3, "mergekit's weight w, the same for every task"),
            Parameter("lambda", 1.0, "factor λ on the merged task vector"),
            Parameter("normalize", normalize,
                      "divide by the sum of the weights (with sign consensus: of the agreeing tasks)"),
            rescale_parameter(rescale))


BREADCRUMBS_PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024"
DELLA_PAPER = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, 2024"
MERGEKIT_REFERENCE = "mergekit 0.1.5 mergekit/sparsify.py ({}), mergekit/merge_methods/generalized_task_arithmetic.py"


def _adamerging(pretrained: PyTree, tau: PyTree, context: AdaptContext, *, granularity: str,
                task_vectors: str | Mapping[str, Any], density: float, total_size: int | None, scope: str,
                view: MatrixView | None) -> Merged:
    """AdaMerging (Yang et al., ICLR 2024): λ learned by entropy minimisation on the unlabeled batches, on the
    task vectors τ' = T(τ) of the transform `task_vectors` (`core.task_vector_transforms`): raw τ, TIES's τ̂
    (AdaMerging++), DARE, TSV's per-task parts, ..."""
    task_vectors = transform_task_vectors(task_vectors, tau, view, dict(density=density, total_size=total_size, scope=scope))
    config = dataclasses.replace(context.config, granularity=granularity, checkpoint_dir=context.checkpoint_dir)
    result = adamerging(context.apply_fn, pretrained, task_vectors, context.batches, config, mesh=context.mesh)
    initial = jax.tree_util.tree_map(lambda lam: lam * 0 + config.init_value, result.coefficients)
    return Merged(params=result.params, coefficients=result.coefficients, history=result.history,
                  initial_params=merge(pretrained, task_vectors, initial, clamp=config.clamp))


ADAMERGING_PARAMETERS = (
    Parameter("granularity", "layer", "one λ per task, or per task and tensor", choices=("task", "layer")),
    TRANSFORM_PARAMETER,
    DENSITY, TOTAL_SIZE, SCOPE,
)
ADAMERGING_PAPER = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024"
ADAMERGING_FORMULA = "θ = θ0 + Σ_k λ_k ⊙ T(τ)_k,  λ = argmin Σ_t mean_x H(softmax(head_t(f_θ(x))))  (Adam, unlabeled test x)"
ADAMERGING_REFERENCE = ("EnnengYang/AdaMerging src/main_*_adamerging.py; FusionBench 0.2.33 "
                        "fusion_bench/method/adamerging/")


def adamerging_method(name: str, label: str, **fixed: str) -> MergeMethod:
    """An AdaMerging variant as data: the shared build with some of its parameters fixed (e.g.
    ``granularity="layer", task_vectors="ties"`` is layer-wise AdaMerging++)."""
    parameters = tuple(p for p in ADAMERGING_PARAMETERS if p.name not in fixed)
    return MergeMethod(name, label, ADAMERGING_PAPER, _adamerging, parameters, needs_data=True,
                       fixed=tuple(fixed.items()), uses_view=True, formula=ADAMERGING_FORMULA,
                       reference=ADAMERGING_REFERENCE, learns_coefficients=True, grouped=bool(fixed))


def canonical_base(value: Any) -> str | dict[str, Any]:
    """Surgery's base method given by name or as ``{"name": ..., **parameters}``, validated: a registered method
    that builds one merged model (not Surgery itself, not a per-task method)."""
    if not isinstance(value, (str, Mapping)):
        raise ValueError(f"must be a method name or a mapping {{name, parameters}}, got {value!r}")
    spec = method_spec(value)
    if spec.name == "surgery" or spec.method.per_task_models:
        raise ValueError(f"{spec.name!r} builds no single merged model to operate on; choose a method that "
                         "merges one model (e.g. layer_wise_adamerging, task_arithmetic, tsv_m)")
    return value if isinstance(value, str) else {"name": spec.name, **spec.params}


def _requires_representation(context: AdaptContext | None, view: MatrixView | None) -> str | None:
    if context is None or context.features_fn is None or context.head_fn is None:
        missing = [name for name in ("features_fn", "head_fn") if context is None or getattr(context, name) is None]
        return (f"needs the binding's representation: its {' and '.join(missing)} (features_fn(params, inputs) -> z "
                "and head_fn(z, task) -> logits, with apply_fn = head_fn(features_fn(...))); this binding has none")
    return None


def _subfolder(folder: str | None, name: str) -> str | None:
    return None if folder is None else f"{folder}/{name}"


def _surgery(pretrained: PyTree, task_vectors: PyTree, context: AdaptContext, *, base: str | Mapping[str, Any],
             hidden_dim: int, surgery_steps: int | None, surgery_lr: float, surgery_batch_size: int | None, seed: int,
             view: MatrixView | None) -> Merged:
    """Representation Surgery (`core.surgery`) on the model `base` builds: its state (the base's, when it learns
    from data, and the modules') kept under ``base/`` and ``surgery/`` of the method's checkpoint folder. Steps
    and batch size left None are the run's AdaMerging ones."""
    spec = method_spec(base)
    base_context = dataclasses.replace(context, checkpoint_dir=_subfolder(context.checkpoint_dir, "base"))
    merged = spec.build(pretrained, task_vectors, base_context if spec.method.needs_data else None, view)
    config = surgery.SurgeryConfig(
        steps=context.config.steps if surgery_steps is None else surgery_steps, lr=surgery_lr,
        batch_size=surgery_batch_size or context.config.batch_size, hidden_dim=hidden_dim, seed=seed,
        checkpoint_dir=_subfolder(context.checkpoint_dir, "surgery"), checkpoint_every=context.config.checkpoint_every,
        quiet=context.config.quiet)
    result = surgery.train_surgery(context.features_fn, merged.params, pretrained, task_vectors, context.batches,
                                   config, mesh=context.mesh)
    # The base's entropy history is not this method's loss: kept apart, so no record reads it as Surgery's.
    history = {**{f"base_{key}": value for key, value in (merged.history or {}).items()},
               "surgery_loss": result.history["loss"]}
    return Merged(params=merged.params, per_task=surgery.SurgeryModels(merged.params, result.modules),
                  coefficients=merged.coefficients, history=history,
                  apply_fn=surgery.surgery_apply_fn(context.features_fn, context.head_fn))


def _requires_mixture(context: AdaptContext | None, view: MatrixView | None) -> str | None:
    if context is None or context.mixture is None or context.head_fn is None:
        missing = [name for name in ("mixture", "head_fn") if context is None or getattr(context, name) is None]
        return (f"needs the binding's weight-ensembling form: its {' and '.join(missing)} (ModelBinding.mixture, a "
                "core.we_moe.ExpertMixture, and head_fn(z, task) -> logits); this binding has none")
    return None


def _we_moe(pretrained: PyTree, task_vectors: PyTree, context: AdaptContext, *, upscale_top_k: int | None,
            init_lambda: float, router_hidden_layers: int, we_moe_steps: int | None, we_moe_lr: float,
            we_moe_batch_size: int | None, we_moe_sequential_tasks: bool, seed: int) -> Merged:
    """WEMoE (`core.we_moe`): task arithmetic at init_lambda outside the binding's module group, the group of the
    top layers upscaled (its task vectors in the run's ``param_dtype``), the routers trained on the unlabeled
    batches; steps and batch size left None are the run's AdaMerging ones. The model routes every example."""
    mixture = context.mixture
    merged = core_methods.task_arithmetic(pretrained, task_vectors, init_lambda)
    routing = we_moe.Routing(num_tasks(task_vectors), router_hidden_layers, init_lambda)
    frozen, routers = we_moe.build_routed_model(mixture, pretrained, merged, task_vectors, upscale_top_k, routing,
                                                seed, context.config.param_dtype)
    config = we_moe.WEMoEConfig(
        steps=context.config.steps if we_moe_steps is None else we_moe_steps, lr=we_moe_lr,
        batch_size=we_moe_batch_size or context.config.batch_size, sequential_tasks=we_moe_sequential_tasks,
        checkpoint_dir=context.checkpoint_dir,
        checkpoint_every=context.config.checkpoint_every, quiet=context.config.quiet)
    result = we_moe.train_we_moe(mixture, context.head_fn, frozen, routers, context.batches, config,
                                 mesh=context.mesh, tasks=routing.experts)
    return Merged(params={"frozen": frozen, "routers": result.routers}, history=result.history,
                  apply_fn=we_moe.we_moe_apply_fn(mixture, context.head_fn))


SURGERY_PARAMETERS = (
    Parameter("base", "layer_wise_adamerging", "the merged model Surgery operates on: a registered method, by name "
              "or as {name, parameters}", kind=object, convert=canonical_base),
    *surgery.PARAMETERS,
)


def _regmean_method(name: str, label: str, paper: str, layerwise: bool,
                    requires: Callable[[AdaptContext | None, MatrixView | None], str | None], formula: str,
                    reference: str) -> MergeMethod:
    """RegMean (``layerwise`` False) or RegMean++ as a registry method: closed form on the binding's Gram capture."""

    def build(pretrained: PyTree, task_vectors: PyTree, context: AdaptContext, **values: Any) -> Merged:
        return Merged(params=regmean.from_context(name, layerwise, pretrained, task_vectors, context, **values))

    return MergeMethod(name, label, paper, build, regmean.PARAMETERS, needs_data=True, uses_view=True,
                       requires=requires, formula=formula, reference=reference)


for _method in (
    MergeMethod("pretrained", "Pretrained (frozen head)", "θ0 on every task", _pretrained, formula="θ = θ0",
                streaming="entry"),
    MergeMethod("individual", "Individual (fine-tuned)", "θ0 + τ_t on its own task t (the fine-tuned models)", _individual,
                per_task_models=True, formula="θ_t = θ0 + τ_t"),
    MergeMethod("weight_average", "Weight averaging", "Wortsman et al., Model soups, ICML 2022",
                _data_free(core_methods.weight_average), formula="θ = θ0 + (1/K) Σ_k τ_k",
                reference="FusionBench 0.2.33 fusion_bench/method/simple_average.py", streaming="entry"),
    MergeMethod("task_arithmetic", "Task arithmetic",
                "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
                _data_free(core_methods.task_arithmetic),
                (Parameter("scale", 0.3, "λ for every task vector"),), formula="θ = θ0 + s Σ_k τ_k",
                reference="FusionBench 0.2.33 fusion_bench/method/task_arithmetic/", streaming="entry"),
    MergeMethod("ties", "TIES-merging", "Yadav et al., TIES-Merging, NeurIPS 2023",
                _data_free(core_methods.ties_merging),
                (DENSITY, Parameter("reduce", "sum", "disjoint mean or sum of the agreeing entries",
                                    choices=("mean", "sum")),
                 Parameter("scale", 0.3, "λ applied to the merged task vector"), SCOPE, TOTAL_SIZE),
                uses_view=True,
                formula="θ = θ0 + s · reduce_k τ̂_k,  τ̂_k = τ_k^trim ⊙ [sgn τ_k^trim = sgn Σ_j τ_j^trim]",
                reference="EnnengYang/AdaMerging src/ties_merging_utils.py; FusionBench 0.2.33 "
                          "fusion_bench/method/ties_merging/", streaming="global"),
    MergeMethod("dare", "DARE + task arithmetic", "Yu et al., Language Models are Super Mario, ICML 2024",
                _data_free(core_methods.dare_task_arithmetic),
                (DROP_RATE, SEED,
                 Parameter("scale", 0.3, "λ for every task vector")),
                formula="θ = θ0 + s Σ_k m_k ⊙ τ_k / (1 − p),  m_k ~ Bernoulli(1 − p)",
                reference="FusionBench 0.2.33 fusion_bench/method/dare/ (random masks: same law, not the same draw)",
                streaming="entry"),
    MergeMethod("tall_masks", "TALL masks", tall_masks.PAPER,
                lambda pretrained, task_vectors, tall_mask_lambda: Merged(
                    per_task=tall_masks.tall_mask_models(pretrained, task_vectors, tall_mask_lambda)),
                (tall_masks.TALL_MASK_LAMBDA,), per_task_models=True,
                formula="θ_t = θ0 + m_t ⊙ τ_MTL,  m_t = [|τ_t| > λ |τ_MTL − τ_t|],  τ_MTL = Σ_k τ_k",
                reference="FusionBench 0.2.33 fusion_bench/method/tall_mask/ (its generate_task_masks as documented; "
                          "TallMaskTaskArithmeticAlgorithm.run passes it τ_t for θ_t, i.e. |θ0 − τ_t|, and stops "
                          "at a Parameter/Tensor type check)"),
    MergeMethod("consensus", "Consensus merging", tall_masks.PAPER, _data_free(tall_masks.consensus_merging),
                (Parameter("k", 2, "keep the entries that at least k tasks' TALL masks keep", minimum=0),
                 tall_masks.TALL_MASK_LAMBDA, Parameter("scale", 0.3, "α for the masked multi-task vector")),
                formula="θ = θ0 + α (c ⊙ Σ_k τ_k),  c = [Σ_t m_t ≥ k],  m_t = [|τ_t| > λ |Σ_k τ_k − τ_t|]",
                reference="FusionBench 0.2.33 fusion_bench/method/tall_mask/utils.py (generate_task_masks, "
                          "construct_consensus_mask; no algorithm class: θ0 + α (c ⊙ Σ τ) as the TALL-masks code "
                          "applies it)"),
    MergeMethod("emr", "EMR-Merging", emr.PAPER,
                lambda pretrained, task_vectors, view: Merged(per_task=emr.emr_merging(
                    pretrained, task_vectors, emr.layers_from_view(view, pretrained))),
                per_task_models=True, uses_view=True,
                formula="θ_t = θ0 + s_t · m_t ⊙ τ_uni,  τ_uni = sgn(Σ_k τ_k) ⊙ max_k |m_k ⊙ τ_k|,  "
                        "m_t = [τ_t · sgn(Σ_k τ_k) > 0],  s_t = Σ_n mean|τ_t,n| / Σ_n mean|m_t,n ⊙ τ_uni,n|",
                reference="FusionBench 0.2.33 fusion_bench/method/emr_merging/"),
    _regmean_method("regmean", "RegMean", regmean.REGMEAN_PAPER, False, regmean.requires_gram,
                    "W* = [(Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ]ᵀ per linear layer,  G̃_k = α G_k + (1 − α) diag(G_k),  "
                    "G_k = X_kᵀX_k / n_k (layer inputs under θ_k on task k's unlabeled x); other leaves averaged",
                    "FusionBench 0.2.33 fusion_bench/method/regmean/ (clip_regmean.py, regmean.py)"),
    _regmean_method("regmean_plusplus", "RegMean++", regmean.REGMEAN_PLUSPLUS_PAPER, True, regmean.requires_layerwise,
                    "RegMean block by block: G_k of block l from θ_k's block l on inputs through the averaged "
                    "stem and the merged blocks < l; leaves after the blocks stay θ0",
                    "FusionBench 0.2.33 fusion_bench/method/regmean_plusplus/"),
    MergeMethod("wudi", "WUDI merging", wudi.PAPER, _data_free(wudi.wudi_merging), wudi.PARAMETERS, uses_view=True, requires=requires_view,
                formula="θ = θ0 + argmin_X Σ_k ‖(X − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F per matrix (Adam from Σ_k τ_k, or the "
                        "exact minimiser); θ0 + (1/K) Σ_k τ_k for the other leaves",
                reference="FusionBench 0.2.33 fusion_bench/method/wudi/wudi.py", streaming="tensor"),
    MergeMethod("magmax", "MagMax", magmax.PAPER, _data_free(magmax.magmax), magmax.PARAMETERS,
                formula="θ = θ0 + s · τ_{k*},  k* = argmax_k |τ_k| per entry (ties: the later task)",
                reference="FusionBench 0.2.33 fusion_bench/method/magmax/magmax.py", streaming="entry"),
    MergeMethod("model_stock", "Model Stock", model_stock.PAPER, _data_free(model_stock.model_stock),
                model_stock.PARAMETERS, uses_view=True,
                formula="θ = θ0 + t · (1/K) Σ_k τ_k per tensor,  t = K cos φ̄ / ((K − 1) cos φ̄ + 1),  "
                        "φ̄ = mean_{i<j} ∠(τ_i, τ_j)",
                reference="FusionBench 0.2.33 fusion_bench/method/model_stock/model_stock.py"),
    MergeMethod("slerp", "SLERP", slerp.PAPER, _data_free(slerp.slerp), slerp.PARAMETERS, uses_view=True, num_tasks=2,
                formula="θ = sin((1 − t) Ω) / sin Ω · θ_1 + sin(t Ω) / sin Ω · θ_2 per tensor,  Ω = ∠(θ_1, θ_2) "
                        "(lerp where |cos Ω| > dot_threshold)",
                reference="FusionBench 0.2.33 fusion_bench/method/slerp/ (slerp.py, slerp_utils.py)"),
    MergeMethod("breadcrumbs", "Model Breadcrumbs", BREADCRUMBS_PAPER, _mergekit("breadcrumbs", core_methods.breadcrumbs),
                _mergekit_parameters((GAMMA,), normalize=False, rescale=False), fixed=(("consensus", False),),
                uses_view=True,
                formula="θ = θ0 + λ Σ_k w τ̃_k (÷ K w if normalize),  τ̃_k = τ_k ⊙ [b ≤ rank|τ_k| < b + ⌊ρ n⌋] per "
                        "tensor of n entries,  b = max(0, n − ⌊ρ n⌋ − ⌊γ n⌋)",
                reference=MERGEKIT_REFERENCE.format("magnitude_outliers")),
    MergeMethod("breadcrumbs_ties", "Model Breadcrumbs with TIES", BREADCRUMBS_PAPER,
                _mergekit("breadcrumbs_ties", core_methods.breadcrumbs),
                _mergekit_parameters((GAMMA,), normalize=False, rescale=False), fixed=(("consensus", True),),
                uses_view=True,
                formula="θ = θ0 + λ Σ_k m_k w τ̃_k (÷ Σ_k w m_k if normalize),  m_k = [sgn τ̃_k = γ],  "
                        "γ = +1 where Σ_j τ̃_j ≥ 0 else −1,  τ̃ as in breadcrumbs",
                reference=MERGEKIT_REFERENCE.format("magnitude_outliers")),
    MergeMethod("della", "DELLA", DELLA_PAPER, _mergekit("della", core_methods.della),
                _mergekit_parameters((EPSILON, SEED), normalize=True, rescale=True), fixed=(("consensus", True),),
                uses_view=True,
                formula="θ = θ0 + λ Σ_k m_k w τ̃_k / Σ_k w m_k (m_k, γ as in breadcrumbs_ties),  τ̃_k = (τ_k ⊙ b_k) "
                        "‖τ_k‖₁ / ‖τ_k ⊙ b_k‖₁ per tensor,  b ~ Bernoulli(ρ − ε + 2ε r / (m − 1)),  r: the rank of "
                        "|τ| in its row of m",
                reference=MERGEKIT_REFERENCE.format("della_magprune") + " (random masks: same law, not the same draw)"),
    MergeMethod("della_linear", "Linear DELLA", DELLA_PAPER, _mergekit("della_linear", core_methods.della),
                _mergekit_parameters((EPSILON, SEED), normalize=False, rescale=True), fixed=(("consensus", False),),
                uses_view=True, formula="θ = θ0 + λ Σ_k w τ̃_k (÷ K w if normalize),  τ̃ as in della",
                reference=MERGEKIT_REFERENCE.format("della_magprune") + " (random masks: same law, not the same draw)"),
    MergeMethod("tsv_m", "TSV-M", tsv.PAPER,
                lambda pretrained, task_vectors, view, **values: Merged(
                    params=tsv.tsv_merging(pretrained, task_vectors, view, **values)),
                (tsv.SCALE,), uses_view=True, requires=requires_view, formula=tsv.FORMULA, reference=tsv.REFERENCE, streaming="tensor"),
    MergeMethod("iso_c", "Iso-C", isotropic.PAPER,
                lambda pretrained, task_vectors, view, **values: Merged(
                    params=isotropic.iso_c_merging(pretrained, task_vectors, view, **values)),
                (isotropic.SCALE,), uses_view=True, requires=requires_view, formula=isotropic.ISO_C_FORMULA,
                reference=isotropic.REFERENCE.format("iso_c"), streaming="tensor"),
    MergeMethod("iso_cts", "Iso-CTS", isotropic.PAPER,
                lambda pretrained, task_vectors, view, **values: Merged(
                    params=isotropic.iso_cts_merging(pretrained, task_vectors, view, **values)),
                (isotropic.SCALE, isotropic.COMMON_SPACE_FRACTION), uses_view=True, requires=requires_view,
                formula=isotropic.ISO_CTS_FORMULA, reference=isotropic.REFERENCE.format("iso_cts"),
                streaming="tensor"),
    MergeMethod("surgery", "Representation Surgery", surgery.PAPER, _surgery, SURGERY_PARAMETERS, needs_data=True,
                per_task_models=True, uses_view=True, requires=_requires_representation, formula=surgery.FORMULA,
                reference=surgery.REFERENCE),
    MergeMethod("we_moe", "WEMoE", we_moe.PAPER, _we_moe, we_moe.PARAMETERS, needs_data=True,
                requires=_requires_mixture, formula=we_moe.FORMULA, reference=we_moe.REFERENCE),
    adamerging_method("adamerging", "AdaMerging"),
    adamerging_method("task_wise_adamerging", "Task-wise AdaMerging", granularity="task"),
    adamerging_method("layer_wise_adamerging", "Layer-wise AdaMerging", granularity="layer"),
    adamerging_method("task_wise_adamerging++", "Task-wise AdaMerging++", granularity="task", task_vectors="ties"),
    adamerging_method("layer_wise_adamerging++", "Layer-wise AdaMerging++", granularity="layer",
                      task_vectors="ties"),
):
    register(_method)
