"""What every model family's checked ``merge`` run shares: the `CheckedRun` it returns from its checks, the
devices it runs on (`run_mesh`), the λ of ``--weights`` (`read_coefficients_file`), and `guarded`, which turns a file, value
or key error into a `MergeError` naming what was being read.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any, Callable

from adamerging_jax import coefficient_formats as formats
from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.core.coefficients import Coefficients
from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.core.registry import AdaptContext, MethodSpec
from adamerging_jax.merging.schema import MergeConfig
from adamerging_jax.merging.errors import MergeError


def guarded(what: str, action: Callable[[], Any]) -> Any:
    """``action()``, with a file, value or key error turned into one line prefixed by ``what``."""
    try:
        return action()
    except MergeError:
        raise
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise MergeError(f"{what}: {message}") from None


def run_mesh(config: MergeConfig, settings: MergeSettings) -> Any:
    """The devices AdaMerging runs on: ``mesh: {data, fsdp}`` as a 2-D mesh of the first data × fsdp devices,
    else a 1-D data mesh of the first ``devices`` (all by default); each task's n·B inputs must split evenly
    over the data axis."""
    import jax

    from adamerging_jax.core.parallel import data_mesh, data_size, make_mesh

    devices = jax.devices()
    wanted = (config.mesh[0] * config.mesh[1]) if config.mesh else (config.devices or len(devices))
    if wanted > len(devices):
        raise MergeError(f"{config.source}: {'mesh' if config.mesh else 'devices'} asks for {wanted} devices, "
                   f"this machine has {len(devices)}")
    if config.mesh:
        mesh = make_mesh(config.mesh[0], config.mesh[1], devices[:wanted])
    else:
        mesh = data_mesh(devices[:wanted])
    rows = settings.adamerging.batches_per_task * settings.adamerging.batch_size
    if settings.needs_data and rows % data_size(mesh):
        raise MergeError(f"{config.source}: {rows} inputs per task and step do not split over the mesh's data axis of "
                   f"{data_size(mesh)} devices; change adamerging.batch_size or the mesh")
    return mesh


@dataclasses.dataclass
class CheckedRun:
    """What every checked merge run holds: the config, the settings with the model's stacked layers declared,
    the model binding, the output folder, the devices (`run_mesh`), and the λ of ``--weights``
    (`read_given_coefficients`)."""

    config: MergeConfig
    settings: MergeSettings
    binding: ModelBinding
    output: Path
    mesh: Any
    given_coefficients: Coefficients | None = dataclasses.field(default=None, kw_only=True)
    coefficients_file: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.check_methods_available()

    def check_methods_available(self) -> None:
        """Every method the config names can run on this binding (`MergeMethod.requires`: e.g. Surgery needs
        its representation, RegMean its Gram capture); one line naming the method and what the binding lacks
        otherwise. (A method reached through a group is skipped at run time instead.)"""
        shared = {f.name for f in dataclasses.fields(AdaptContext)} & {f.name for f in dataclasses.fields(ModelBinding)}
        context = AdaptContext(**{name: getattr(self.binding, name) for name in shared}, batches=None,
                               config=self.settings.adamerging)
        for spec in self.settings.methods:
            reason = spec.method.unavailable(context if spec.method.needs_data else None, self.binding.matrix_view)
            if reason is not None and not spec.from_group:
                raise MergeError(f"{self.config.source}: method {spec.name!r} {reason}")

    @property
    def export_spec(self) -> Any:
        return export_spec(self.settings, self.config)

    @property
    def pretrained(self) -> Any:
        """θ0, the tree λ is laid out over."""
        raise NotImplementedError

    def method_lines(self) -> list[str]:
        """One plan line per method: its parameters and, for an adaptive one, how many λ each task gets."""
        lines = []
        for spec in self.settings.methods:
            params = spec.describe()["params"]
            count = (f"; {self.binding.coefficients_per_task(self.pretrained, params['granularity'])} λ per task"
                     if spec.method.learns_coefficients else "")
            lines.append(f"method {spec.name} {params}{count}")
        return lines

    def exported_method(self, run: dict[str, Any]) -> dict[str, Any]:
        """The exported method as its model card names it: its record's name, label and parameters, its paper."""
        record = run["methods"][self.config.exported]
        return dict(name=self.config.exported, label=record["label"], params=record["params"],
                    paper=self.export_spec.method.paper)

    def read_given_coefficients(self, path: str | None) -> None:
        """Read ``--weights`` (any layout `run.read_coefficients_file` knows) for this run's tree; one line on failure."""
        if path is None:
            return
        self.coefficients_file = path
        self.given_coefficients = guarded(f"--weights {path}", lambda: read_coefficients_file(path, self))


def export_spec(settings: MergeSettings, config: MergeConfig) -> Any:
    """The `MethodSpec` of the method whose model is exported."""
    return next(spec for spec in settings.methods if spec.name == config.exported)


def _granularity(spec: MethodSpec) -> str:
    return spec.describe()["params"]["granularity"]


def read_coefficients_file(path: str, plan: CheckedRun) -> Coefficients:
    """λ of a ``--weights`` file (module docstring) in the layout of the exported AdaMerging method."""
    spec = plan.export_spec
    if not spec.method.learns_coefficients:
        raise ValueError(f"λ apply to an AdaMerging method; the exported method is {spec.name!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError("no such file")
    binding, k = plan.binding, len(plan.config.tasks)
    like = binding.init_coefficients(plan.pretrained, k, _granularity(spec))
    names, order = binding.tensor_names, binding.tensor_order
    adamerging = plan.settings.adamerging
    checks = dict(tasks=[task.name for task in plan.config.tasks],
                  bound=adamerging.lambda_bound if adamerging.clamp is None else None)
    if path.endswith(".json"):
        return formats.coefficients_from_named(formats.read_named_json(path), like, names, **checks)
    if path.endswith(".safetensors"):
        return formats.coefficients_from_named(formats.read_named_safetensors(path), like, names, **checks)
    if not path.endswith((".pt", ".pth", ".npy")):
        raise ValueError("expected .json, .safetensors (named λ), or .pt / .pth / .npy (FusionBench or official)")
    array = formats.read_fusionbench(path)
    if array.shape == (k, len(order)):
        return formats.from_fusionbench(array, like, order, names, **checks)
    rows = {1: None, len(order): order}
    if binding.official_rows is not None:
        rows[len(binding.official_rows.names)] = binding.official_rows
    if array.shape[1] == k + 1 and array.shape[0] in rows:
        return formats.from_official(array, like, rows[array.shape[0]], names, **checks)
    raise ValueError(f"shape {array.shape} is neither FusionBench's [K, n] = ({k}, {len(order)}) nor the official "
                     f"[n, 1 + K] with n in {sorted(rows)} (task-wise, HF order"
                     f"{', official open_clip order' if binding.official_rows is not None else ''}) for {k} tasks")
