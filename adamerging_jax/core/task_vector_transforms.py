"""What AdaMerging's λ scales: task-vector transforms as values, registered by name like merge methods.

AdaMerging learns θ = θ0 + Σ_k λ_k ⊙ τ'_k, where τ' = T(τ) is the stacked task vectors after a transform T
(still ``[K, ...]`` per leaf, one component per task):

- ``raw``: τ' = τ (AdaMerging, Yang et al., ICLR 2024);
- ``ties``: TIES's trimmed, sign-agreeing τ̂ (AdaMerging++, same paper);
- ``dare``: DARE's randomly dropped and rescaled τ (Yu et al., ICML 2024);
- ``breadcrumbs``, ``della``: Model Breadcrumbs' and DELLA's per-tensor sparsified τ (mergekit's sparsifiers);
- further transforms registered beside their methods (e.g. TSV's per-task orthogonalised low-rank parts).

A transform is ``apply(task_vectors, **parameters) -> task_vectors'``, or ``apply(task_vectors, view,
**parameters)`` when it reads the binding's `MatrixView`: as matrices (``uses_view``: a binding without a view
is refused) or only for which leaves stack layers (``layered``: without a view every leaf is one tensor).
In a method's parameters a transform is a name (``"tsv"``) or a mapping (``{"name": "dare", "p": 0.5}``);
parameters the transform shares with AdaMerging's own (``density``, ``scope``, ``total_size`` for ``ties``)
default to AdaMerging's values.

    register_transform(TaskVectorTransform("scaled", "τ times 2", "me", lambda tau: jax.tree.map(lambda t: 2 * t, tau)))
    spec = method_spec("layer_wise_adamerging", task_vectors={"name": "dare", "p": 0.5})
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from adamerging_jax.core import methods as core_methods
from adamerging_jax.core.catalog import Catalog
from adamerging_jax.core.matrix_view import MatrixView, require_view
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.transforms import check_keep_band
from adamerging_jax.core.trees import PyTree


@dataclasses.dataclass(frozen=True)
class TaskVectorTransform:
    """A transform of the stacked task vectors that AdaMerging's λ then scales (module docstring).

    Attributes:
      name: the registry key.
      label: one line saying what τ' is.
      paper: where it comes from.
      apply: ``(τ, **parameters) -> τ'`` (``(τ, view, **parameters)`` with `uses_view` or `layered`), both
        stacked ``[K, ...]``.
      parameters: its declared parameters with their defaults.
      uses_view: it reads each leaf as matrices and needs the binding's `MatrixView`.
      layered: it gets the binding's `MatrixView` (None where the binding has none) only to tell which leaves
        stack layers, each layer one tensor (TIES's per-tensor scope); it runs without one.
    """

    name: str
    label: str
    paper: str
    apply: Callable[..., PyTree]
    parameters: tuple[Parameter, ...] = ()
    uses_view: bool = False
    layered: bool = False

    def configure(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's value, defaults filled in, each validated."""
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"task-vector transform {self.name!r} has no parameters {unknown}; "
                             f"its parameters: {sorted(known) or 'none'}")
        return {name: p.validate(self.name, values.get(name, p.default), "task-vector transform")
                for name, p in known.items()}


TRANSFORMS = Catalog("task-vector transform")


def register_transform(transform: TaskVectorTransform, *, replace: bool = False) -> TaskVectorTransform:
    """Add `transform` to the registry (an existing name needs ``replace=True``); returns it."""
    return TRANSFORMS.add(transform, replace=replace)


def get_transform(name: str) -> TaskVectorTransform:
    """The registered transform called `name`; an unknown name lists the known ones."""
    return TRANSFORMS.lookup(name)


def canonical_transform(value: Any) -> str | dict[str, Any]:
    """A transform given as a name or ``{"name": ..., **parameters}``, checked: the name as is, or the mapping
    with every parameter validated (unset ones left to their defaults at `transform_task_vectors`)."""
    if isinstance(value, str):
        get_transform(value)
        return value
    if isinstance(value, Mapping):
        fields = dict(value)
        name = fields.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a task-vector transform mapping needs a 'name', got {dict(value)}")
        transform = get_transform(name)
        configured = transform.configure(fields)
        return {"name": name, **{key: configured[key] for key in fields}}
    raise ValueError(f"must be a transform name or a mapping with a 'name', got {value!r}; known: {sorted(TRANSFORMS)}")


def transform_task_vectors(value: str | Mapping[str, Any], task_vectors: PyTree, view: MatrixView | None,
                           shared: Mapping[str, Any] | None = None) -> PyTree:
    """τ' = T(τ) for the transform `value` (a name or a mapping); its parameters not given in `value` take
    `shared` (the calling method's own values of the same name), then their defaults."""
    name, given = (value, {}) if isinstance(value, str) else (value["name"], {k: v for k, v in value.items() if k != "name"})
    transform = get_transform(name)
    declared = {p.name for p in transform.parameters}
    inherited = {key: val for key, val in (shared or {}).items() if key in declared}
    if transform.uses_view:
        require_view(name, view, "task-vector transform")
    parameters = transform.configure({**inherited, **given})
    if transform.uses_view or transform.layered:
        return transform.apply(task_vectors, view, **parameters)
    return transform.apply(task_vectors, **parameters)


TRANSFORM_PARAMETER = Parameter(
    "task_vectors", "raw", "what λ scales: a registered task-vector transform, by name or as {name, parameters}",
    kind=object, convert=canonical_transform)

DENSITY = Parameter("density", 0.2, "fraction of each task vector's entries kept by magnitude", minimum=0.0, maximum=1.0)
TOTAL_SIZE = Parameter("total_size", None, "count the top-k over this many entries (the official ++ count)",
                       kind=int, minimum=1, optional=True)
SCOPE = Parameter("scope", "model", "trim over the whole model, or each checkpoint tensor on its own (a stacked "
                  "leaf layer by layer)", choices=("model", "leaf"))
DROP_RATE = Parameter("p", 0.9, "drop probability", minimum=0.0, maximum=0.999)
SEED = Parameter("seed", 0, "random seed of the drop mask")
GAMMA = Parameter("gamma", 0.01, "fraction of each tensor's largest magnitudes dropped (Model Breadcrumbs)",
                  minimum=0.0, maximum=1.0)
EPSILON = Parameter("epsilon", 0.15, "half-width of DELLA's keep probabilities density ± epsilon over magnitude ranks",
                    minimum=0.0, maximum=0.5)


def rescale_parameter(default: bool) -> Parameter:
    """mergekit's ``rescale``: match each tensor's L1 norm after sparsification."""
    return Parameter("rescale", default, "rescale each sparsified tensor to its L1 norm before sparsification")


def _della(tau: PyTree, view: MatrixView, density: float, epsilon: float, seed: int, rescale: bool) -> PyTree:
    check_keep_band(density, epsilon, "task-vector transform 'della'")
    return core_methods.della_task_vectors(tau, density, epsilon, seed, rescale, view)

for _transform in (
    TaskVectorTransform("raw", "τ as it is", "Yang et al., AdaMerging, ICLR 2024", lambda tau: tau),
    TaskVectorTransform("ties", "TIES's trimmed, sign-agreeing τ̂ (AdaMerging++)", "Yadav et al., TIES-Merging, NeurIPS 2023",
                        lambda tau, view, density, scope, total_size: core_methods.ties_task_vectors(
                            tau, density, scope, total_size, view=view),
                        (DENSITY, SCOPE, TOTAL_SIZE), layered=True),
    TaskVectorTransform("dare", "DARE's randomly dropped, rescaled τ", "Yu et al., Language Models are Super Mario, ICML 2024",
                        core_methods.dare, (DROP_RATE, SEED)),
    TaskVectorTransform("breadcrumbs", "Model Breadcrumbs' τ without each tensor's largest and smallest magnitudes",
                        "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024",
                        lambda tau, view, density, gamma, rescale: core_methods.breadcrumbs_task_vectors(
                            tau, density, gamma, rescale, view),
                        (DENSITY, GAMMA, rescale_parameter(False)), uses_view=True),
    TaskVectorTransform("della", "DELLA's τ, entries dropped with probabilities falling with their magnitude rank",
                        "Deep et al., DELLA-Merging, 2024", _della, (DENSITY, EPSILON, SEED, rescale_parameter(True)),
                        uses_view=True),
):
    register_transform(_transform)
