"""A model family of the ``merge`` command as one value: what its YAML reads, how a run of it is checked and how
it runs. `merging.families.FAMILIES` holds them by name (the config's ``model:``); `merging.config`,
`merging.plan` and `merging.run` only look a family up and call it, so adding a family is one module that
builds a `ModelFamily` and adds it to the catalog.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.merging.schema import MergeConfig, TaskConfig

if TYPE_CHECKING:
    from adamerging_jax.merging.checked_run import CheckedRun

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family (module docstring).

    Attributes:
      name: the config's ``model:`` value.
      title: how errors name the family's settings ("CLIP", ...).
      own_keys: the top-level config keys only this family reads (refused for another family).
      task_keys: the keys of one of its tasks.
      parse_task: ``parse_task(where, value, base) -> TaskConfig``: one task read and checked, ``where`` naming it.
      pretrained: ``pretrained(base, value) -> str``: where θ0 is (a path read from the config's folder, or for a
        family that reads the hub, a hub id kept as it is).
      check_config: ``check_config(where, fields, tasks, settings)``: the family's rules that span fields.
      unified_exports: the methods with one model per task that it exports as one model.
      prepare: ``prepare(config, output, coefficients_file, log) -> CheckedRun``: every dry-run check, θ0 and τ loaded (or
        opened), the family's `ModelBinding` built; `MergeError` naming the fault.
      run: ``run(plan, log) -> dict``: the methods built, scored and the exported one written with its card;
        returns ``results.json``'s content.
    """

    name: str
    title: str
    own_keys: frozenset[str]
    task_keys: frozenset[str]
    parse_task: Callable[[str, Any, Path], TaskConfig]
    pretrained: Callable[[Path, str], str]
    check_config: Callable[[str, Mapping[str, Any], Sequence[TaskConfig], MergeSettings], None]
    unified_exports: tuple[str, ...]
    prepare: Callable[[MergeConfig, Path, "str | None", Log], "CheckedRun"]
    run: Callable[["CheckedRun", Log], dict[str, Any]]
