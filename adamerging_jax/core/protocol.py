"""The merging protocol, written once: run a list of registry methods on (θ0, τ), evaluate every merged model
in one pass over each test set, and return one record per method.

    θ0, θ_k ──task_vectors──▶ τ ──method.build──▶ θ (data-free)                 ┐
                                └─(adaptive)─ λ ──adamerging(apply_fn, batches)─▶ θ(λ) ├─▶ evaluate_models ─▶ MethodRecord
                                                                                 ┘

Every scenario (the offline demo, the paper's CLIP experiments, a user's own checkpoints) is a binding that
supplies only the model (`apply_fn`, θ0, τ), the unlabeled adaptation batches, the labelled test sets and the
`MergeSettings`; this module imports no model and no dataset.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adamerging_jax.core.evaluate import PerTask, evaluate_models
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.objective import ApplyFn, entropy_objective
from adamerging_jax.core.optimize import AdaMergingConfig, BatchSource
from adamerging_jax.core.regmean import GramFn
from adamerging_jax.core.registry import AdaptContext, Merged, MethodSpec, expand_groups, method_specs
from adamerging_jax.core.trees import PyTree, check_int, jsonable

MethodLike = Any
"""A method name, a mapping ``{"name": ..., **parameters}`` or a `MethodSpec`."""


def _as_known(entry: MethodLike, known: Mapping[str, MethodSpec]) -> MethodLike:
    """A method entry with the parameters it already has in `known` (a name, or a group's member), else as is."""
    if isinstance(entry, str):
        return known.get(entry, entry)
    if isinstance(entry, MethodSpec) and entry.from_group and entry.name in known:
        return dataclasses.replace(known[entry.name], from_group=True)
    return entry


ADAPTATION_MODES = ("transductive", "held_out")


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """Which test images the test-time methods (AdaMerging, Surgery, ...) adapt on, and which are scored.

    ``transductive`` (the papers' protocol): every method adapts on the unlabeled test images it is scored on.
    ``held_out``: per task, a seeded random ``fraction`` of the test split is given to adaptation and only the
    rest is scored, so no scored image was seen while adapting (every method is scored on that rest).
    """

    mode: str = "transductive"
    fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ADAPTATION_MODES:
            raise ValueError(f"adaptation must be one of {list(ADAPTATION_MODES)}, got {self.mode!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
            raise ValueError(f"held_out_fraction must be a number in (0, 1), got {self.fraction!r}")
        check_int("Adaptation.seed", self.seed, minimum=0)

    def split(self, count: int, task: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices adapted on, indices scored) of task `task`'s `count` test images: both all of them when
        transductive; held out, a permutation seeded by (seed, task) cut at round(fraction · count), each part
        non-empty (a ValueError naming the task otherwise)."""
        everything = np.arange(count)
        if self.mode == "transductive":
            return everything, everything
        cut = int(round(self.fraction * count))
        if not 0 < cut < count:
            raise ValueError(f"task {task}: held_out_fraction {self.fraction} of {count} test images leaves no image "
                             f"to {'adapt on' if cut == 0 else 'score'}")
        order = np.random.default_rng([self.seed, task]).permutation(count)
        return np.sort(order[:cut]), np.sort(order[cut:])

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, **({"fraction": self.fraction} if self.mode == "held_out" else {})}


@dataclasses.dataclass(frozen=True)
class MergeSettings:
    """The methods a run compares and the AdaMerging settings its adaptive methods share.

    ``methods`` are validated registry methods (names, ``{"name": ..., **parameters}`` mappings or
    `MethodSpec`s are accepted and turned into specs); ``adamerging`` is the core's `AdaMergingConfig`
    (each AdaMerging method sets its own granularity on it); ``adaptation`` which test images the test-time
    methods adapt on (`Adaptation`: transductive or held out), applied by the binding that splits its test sets;
    ``named`` the parameters a method outside ``methods`` takes when `with_changes` names it (a binding's own
    settings, e.g. the demo's Surgery learning rate), given as ``methods`` are.
    """

    methods: tuple[MethodSpec, ...]
    adamerging: AdaMergingConfig = AdaMergingConfig()
    adaptation: Adaptation = Adaptation()
    named: tuple[MethodSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", method_specs(self.methods))
        object.__setattr__(self, "named", method_specs(self.named))
        if not self.methods:
            raise ValueError("MergeSettings.methods is empty: name at least one merge method")
        if not isinstance(self.adamerging, AdaMergingConfig):
            raise ValueError(f"MergeSettings.adamerging must be an AdaMergingConfig, got {self.adamerging!r}")
        if not isinstance(self.adaptation, Adaptation):
            raise ValueError(f"MergeSettings.adaptation must be an Adaptation, got {self.adaptation!r}")

    def with_changes(self, methods: Sequence[MethodLike] | None = None, *, adaptation: Adaptation | None = None,
                     **adamerging: Any) -> MergeSettings:
        """These settings with other methods, another adaptation and/or AdaMerging fields. A method given by name
        keeps the parameters it has here, in ``methods`` or else in ``named`` (e.g. a binding's TIES settings), and
        takes the registry's defaults otherwise."""
        fields = {f.name for f in dataclasses.fields(AdaMergingConfig)}
        unknown = sorted(set(adamerging) - fields)
        if unknown:
            raise ValueError(f"unknown AdaMerging settings {unknown}; known: {sorted(fields)}")
        if methods is not None:
            known = {spec.name: spec for spec in (*self.named, *self.methods)}
            methods = tuple(_as_known(m, known) for m in expand_groups(methods))
        return MergeSettings(methods if methods is not None else self.methods,
                             dataclasses.replace(self.adamerging, **adamerging),
                             adaptation if adaptation is not None else self.adaptation, self.named)

    @property
    def needs_data(self) -> bool:
        return any(spec.method.needs_data for spec in self.methods)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the methods, the AdaMerging settings and the adaptation."""
        adamerging = {f.name: jsonable(getattr(self.adamerging, f.name)) for f in dataclasses.fields(self.adamerging)}
        return {"methods": [spec.describe() for spec in self.methods], "adamerging": adamerging,
                "adaptation": self.adaptation.describe()}


@dataclasses.dataclass
class MethodRecord:
    """One method's result.

    Attributes:
      accuracy: top-1 per evaluated task (tasks the method has no model for are absent).
      coefficients: λ per leaf path (adaptive methods), ``[K]`` or ``[K, L]`` as nested lists.
      loss: per step, the entropy L_t of each task before that step's update (``[steps, K]``).
      probe_entropy: Σ_t L_t on the fixed probe batches at the initial λ and at the learned λ.
      seconds: time to build the model and (shared among the models) to evaluate.
    """

    name: str
    label: str
    params: dict[str, Any]
    accuracy: dict[str, float]
    coefficients: dict[str, list] | None = None
    loss: list[list[float]] | None = None
    probe_entropy: tuple[float, float] | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        """Unweighted mean accuracy over the evaluated tasks (the paper's Avg.); None when none was evaluated."""
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else None

    @property
    def entropy(self) -> list[float] | None:
        """Σ_t L_t per step."""
        return None if self.loss is None else [float(sum(row)) for row in self.loss]

    def to_json(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), mean=self.mean, entropy=self.entropy)


def file_stem(method: str) -> str:
    """A file-system-safe name for `method` ("+" → "p", other unsafe characters → "_")."""
    return re.sub(r"[^\w.-]", lambda m: "p" if m[0] == "+" else "_", method)


def state_folder(root: str | Path | None, method: str) -> str | None:
    """Where `method`'s resumable state lives under `root` (None without a root)."""
    return None if root is None else str(Path(root) / file_stem(method))


def probe_entropy(apply_fn: ApplyFn, merged: Merged, probe: Sequence[Any]) -> tuple[float, float] | None:
    """Σ_t mean H on the probe batches at λ_init and at λ_final (adaptive methods only)."""
    if merged.initial_params is None:
        return None
    return tuple(float(entropy_objective(apply_fn, params, probe)[0]) for params in (merged.initial_params, merged.params))


def build_models(
    settings: MergeSettings,
    pretrained: PyTree,
    task_vectors: PyTree,
    *,
    apply_fn: ApplyFn,
    adaptation: BatchSource | None = None,
    probe: Sequence[Any] | None = None,
    state_dir: str | Path | None = None,
    mesh: Any = None,
    view: MatrixView | None = None,
    gram_fn: GramFn | None = None,
    features_fn: Callable[[PyTree, Any], Any] | None = None,
    head_fn: Callable[[Any, int], Any] | None = None,
    mixture: Any = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Merged], dict[str, MethodRecord]]:
    """Build every method's model; the models and their records (accuracy still empty). `view` is the
    binding's matrix view, for the methods that read leaves as weight matrices; `gram_fn` its Gram capture,
    for RegMean (`core.regmean`); `features_fn` and `head_fn` its representation and the head after it, for
    Surgery (`core.surgery`); `mixture` its weight-ensembling MoE form, for WEMoE (`core.we_moe`)."""
    if settings.needs_data and adaptation is None:
        needing = [s.name for s in settings.methods if s.method.needs_data]
        raise ValueError(f"methods {needing} learn from unlabeled data, but no adaptation batches were given")
    models: dict[str, Merged] = {}
    records: dict[str, MethodRecord] = {}
    for spec in settings.methods:
        log(f"[merge] {spec.name}")
        started = time.perf_counter()
        context = None
        if spec.method.needs_data:
            context = AdaptContext(apply_fn, adaptation, settings.adamerging, mesh, state_folder(state_dir, spec.name),
                                   gram_fn, features_fn, head_fn, mixture)
        reason = spec.method.unavailable(context, view)
        if reason is not None and spec.from_group:
            log(f"[merge] {spec.name}: skipped, it {reason}")
            continue
        merged = spec.build(pretrained, task_vectors, context, view)
        seconds = time.perf_counter() - started
        models[spec.name] = merged
        records[spec.name] = _record(spec, merged, apply_fn, probe, seconds)
        log(f"[merge] {spec.name}: built in {seconds:.1f} s" + _entropy_note(records[spec.name]))
    return models, records


def _record(spec: MethodSpec, merged: Merged, apply_fn: ApplyFn, probe: Sequence[Any] | None, seconds: float
            ) -> MethodRecord:
    coefficients = None
    if merged.coefficients is not None:
        coefficients = {path: np.asarray(value).tolist() for path, value in merged.coefficients.per_leaf().items()}
    loss = None
    if merged.history is not None and "loss" in merged.history:
        loss = np.asarray(merged.history["loss"], np.float64).tolist()
    return MethodRecord(
        spec.name, spec.label, spec.describe()["params"], {}, coefficients, loss,
        probe_entropy(apply_fn, merged, probe) if probe is not None else None, {"build": seconds})


def _entropy_note(record: MethodRecord) -> str:
    entropy = record.entropy
    return f"; summed entropy {entropy[0]:.4f} -> {entropy[-1]:.4f}" if entropy else ""


def run_methods(
    settings: MergeSettings,
    pretrained: PyTree,
    task_vectors: PyTree,
    *,
    apply_fn: ApplyFn,
    test_sets: Sequence[Any],
    task_names: Sequence[str],
    adaptation: BatchSource | None = None,
    probe: Sequence[Any] | None = None,
    state_dir: str | Path | None = None,
    mesh: Any = None,
    view: MatrixView | None = None,
    gram_fn: GramFn | None = None,
    features_fn: Callable[[PyTree, Any], Any] | None = None,
    head_fn: Callable[[Any, int], Any] | None = None,
    mixture: Any = None,
    eval_batch_size: int = 256,
    quiet: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, MethodRecord]:
    """Run every method of `settings` and evaluate all of them in one pass over each test set.

    Args:
      settings: the methods and the shared AdaMerging settings.
      pretrained, task_vectors: θ0 and the stacked τ ``[K, ...]`` of the merged tasks.
      apply_fn: ``apply_fn(params, inputs, task) -> logits``; task t < K is a merged task; test sets beyond
        the K merged tasks are unseen tasks (evaluated, never adapted on).
      test_sets, task_names: per evaluated task, ``(inputs, labels)`` arrays or an iterable of batches, and
        its name (the merged tasks first).
      adaptation: the unlabeled batches of the adaptive methods (``step -> [batch per merged task]``).
      probe: fixed unlabeled batches per merged task; records the summed entropy at λ_init and λ_final.
      state_dir: resumable AdaMerging state, one folder per method.
      mesh: devices for AdaMerging (None: all).
      view: the binding's matrix view (`core.matrix_view`), for methods that work per weight matrix.
      gram_fn: the binding's Gram capture (`core.regmean.GramFn`), for RegMean and RegMean++.
      features_fn, head_fn: the binding's representation ``z = features_fn(params, inputs)`` and the head after
        it, ``head_fn(z, task) -> logits``, for Surgery.
      mixture: the binding's weight-ensembling MoE form (`core.we_moe.ExpertMixture`), for WEMoE.
      eval_batch_size: evaluation batch size (shorter batches padded to it).

    Returns:
      method name → `MethodRecord`, in the order of ``settings.methods``.
    """
    if len(test_sets) != len(task_names):
        raise ValueError(f"{len(test_sets)} test sets for {len(task_names)} task names")
    models, records = build_models(settings, pretrained, task_vectors, apply_fn=apply_fn, adaptation=adaptation,
                                   probe=probe, state_dir=state_dir, mesh=mesh, view=view, gram_fn=gram_fn,
                                   features_fn=features_fn, head_fn=head_fn, mixture=mixture, log=log)
    return score_models(apply_fn, models, records, test_sets, task_names, eval_batch_size, quiet=quiet, log=log)


def score_models(
    apply_fn: ApplyFn,
    models: Mapping[str, Merged],
    records: Mapping[str, MethodRecord],
    test_sets: Sequence[Any],
    task_names: Sequence[str],
    eval_batch_size: int = 256,
    *,
    quiet: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, MethodRecord]:
    """Fill the records' accuracy: every model of `build_models` evaluated in one pass over each test set (the
    models that run with their own forward, `Merged.apply_fn`, in the same pass: a test set may be read once)."""
    started = time.perf_counter()
    to_evaluate = {name: PerTask(m.per_task) if m.per_task is not None else m.params for name, m in models.items()}
    forwards = {name: m.apply_fn for name, m in models.items() if m.apply_fn is not None}
    accuracy = evaluate_models(apply_fn, to_evaluate, test_sets, task_names, eval_batch_size, forwards=forwards,
                               quiet=quiet, log=log)
    seconds = time.perf_counter() - started
    for name, record in records.items():
        record.accuracy = accuracy[name].per_task
        record.seconds["evaluate"] = seconds
    return dict(records)


def records_json(records: Mapping[str, MethodRecord]) -> dict[str, Any]:
    """``{method: record as JSON}`` (for ``results.json``)."""
    return {name: record.to_json() for name, record in records.items()}
