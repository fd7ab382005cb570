"""The ``merge`` config's values and the field readers every model family's YAML schema uses: `MergeConfig` and
`TaskConfig` (the fields of every family, each family reading its own), `ConfigError` naming the field at fault,
and the readers of one field each (a non-empty string, one of some choices, an integer, a path read from the
config's folder, ...). The schema itself is `merging.config` (shared fields) and each family's module (its own).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from adamerging_jax.core.optimize import AdaMergingConfig
from adamerging_jax.core.protocol import Adaptation, MergeSettings
from adamerging_jax.merging.errors import MergeError


PRECISIONS = {"float32": None, "bfloat16": "bfloat16"}


HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


INSTALL = {"models": 'pip install "adamerging-jax[models]"', "data": 'pip install "adamerging-jax[data]"'}


class ConfigError(MergeError):
    """A config field that breaks the schema; the message names the field."""


def require(module: str, extra: str, purpose: str) -> None:
    """Import ``module``; `MergeError` naming the extra that provides it when it is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MergeError(f"{purpose} needs the Python package {module!r}: {INSTALL[extra]}") from None


@dataclasses.dataclass(frozen=True)
class Unlabeled:
    """A task's unlabeled images: ``kind`` one of SOURCE_OPTIONS, ``path`` (a folder, list file or tfds name)."""

    kind: str
    path: str
    split: str | None = None
    data_dir: str | None = None
    recursive: bool = False


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A task's unlabeled prompts: a text file (one a line) or a JSONL file with the prompt under ``field``."""

    path: str
    field: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One merged task. CLIP: its fine-tuned tower, unlabeled images, class names, prompt templates, test
    folder. Causal LM: its full fine-tuned folder or LoRA ``adapter`` (``factored``: τ kept as B·A factors),
    its ``prompts`` and optional answer ``candidates``."""

    name: str
    finetuned: str | None = None
    classes: tuple[str, ...] = ()
    templates: tuple[str, ...] | None = None
    unlabeled: Unlabeled | None = None
    test: str | None = None
    adapter: str | None = None
    factored: bool = False
    prompts: Prompts | None = None
    candidates: tuple[str, ...] | None = None

    @property
    def checkpoint(self) -> str:
        """The task's checkpoint: its fine-tuned model, else its adapter."""
        return self.finetuned or self.adapter or ""


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """The whole ``merge`` config (module docstring); ``source`` is the YAML file it was read from."""

    pretrained: str
    tasks: tuple[TaskConfig, ...]
    methods: tuple[Any, ...] = ("layer_wise_adamerging",)
    export_method: str | None = None
    preset: str = "official"
    adamerging: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    precision: str = "float32"
    export: str = "vision_with_projection"
    seed: int = 0
    devices: int | None = None
    eval_batch_size: int = 256
    pretrained_vision: str | None = None
    trust_pickle: bool = False
    offline: bool = False
    model: str = "clip"
    max_length: int = 256
    mesh: tuple[int, int] | None = None
    dtype: str | None = None
    adaptation: str = "transductive"
    held_out_fraction: float = 0.5
    source: str = "<config>"

    def settings(self) -> MergeSettings:
        """The methods, the AdaMerging settings (the preset, then ``adamerging:``, seed and precision) and which
        test images the adaptive methods adapt on (``adaptation``, ``held_out_fraction``, split by the seed)."""
        fields = dict(self.adamerging)
        if isinstance(fields.get("clamp"), list):
            fields["clamp"] = tuple(fields["clamp"])
        try:
            adamerging = AdaMergingConfig.from_preset(
                self.preset, **{"seed": self.seed, "param_dtype": PRECISIONS[self.precision], **fields})
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{self.source}: adamerging: {error}") from None
        try:
            adaptation = Adaptation(self.adaptation, self.held_out_fraction, self.seed)
        except ValueError as error:
            raise ConfigError(f"{self.source}: {error}") from None
        try:
            return MergeSettings(self.methods, adamerging, adaptation)
        except ValueError as error:
            raise ConfigError(f"{self.source}: methods: {error}") from None

    @property
    def exported(self) -> str:
        """The method whose model is exported: ``export_method`` or the first method's name."""
        return self.export_method or self.settings().methods[0].name


def keys_of(where: str, mapping: Any, known: set[str] | Sequence[str]) -> dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(mapping).__name__}")
    if unknown := sorted(set(map(str, mapping)) - set(known)):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return dict(mapping)


def nonempty_string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def one_of(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value


def integer_at_least(where: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where} must be an integer ≥ {minimum}{' or null' if optional else ''}, got {value!r}")
    return value


def boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def config_path(base: Path, value: str) -> str:
    """``value`` joined to the config's folder when relative."""
    return value if os.path.isabs(value) else str(base / value)


def checkpoint_location(base: Path, value: str) -> str:
    """A checkpoint: a path (relative ones joined to the config's folder) or a hub id kept as it is."""
    joined = config_path(base, value)
    return value if not os.path.exists(joined) and HUB_ID.fullmatch(value) else joined


def string_list(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of strings, got {value!r}")
    return tuple(nonempty_string(f"{where}[{i}]", item) for i, item in enumerate(value))


def one_kind(where: str, value: Any, options: Mapping[str, Sequence[str]], what: str) -> tuple[str, dict]:
    """(kind, fields) of a mapping naming exactly one of ``options``' kinds, with only that kind's options."""
    fields = keys_of(where, value, [*options, *{o for opts in options.values() for o in opts}])
    kinds = [kind for kind in options if kind in fields]
    if len(kinds) != 1:
        raise ConfigError(f"{where} needs exactly one of {list(options)}, got {sorted(fields)}")
    kind = kinds[0]
    if extra := sorted(set(fields) - {kind, *options[kind]}):
        raise ConfigError(f"{where}: {extra} do not apply to a {kind!r} {what}; it takes {list(options[kind])}")
    return kind, fields
