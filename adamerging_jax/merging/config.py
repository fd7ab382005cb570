"""The ``merge`` command's YAML file: its schema, checked field by field, and the command-line overrides.

    pretrained: openai/clip-vit-base-patch32    # full CLIPModel (its text tower builds the zero-shot heads)
    pretrained_vision: null                     # optional θ0 image tower (HF folder / id or open_clip file)
    tasks:
      - name: cars
        finetuned: /ckpt/clip-vit-b32-cars      # HF CLIPVisionModel folder / id, or an open_clip .pt/.pth/.bin
        unlabeled: {folder: /data/cars/unlabeled}   # | {class_folders: DIR} | {tfds: NAME, split, data_dir}
                                                    # | {file_list: FILE}; optional for data-free methods
        classes: [...]                          # or classes_file: one class name per line
        templates: ["a photo of a {}."]         # optional ({} is the class name); CLIP's defaults otherwise
        test: /data/cars/test                   # optional class folders named as the classes → accuracy
    methods: [layer_wise_adamerging, {name: ties, density: 0.2}]
    export_method: null                         # default: the first method
    preset: official                            # or fusionbench; adamerging: {...} overrides its fields
                                                #   (not granularity: task_wise_* / layer_wise_* fix it)
    precision: float32                          # or bfloat16: θ0 and τ storage during AdaMerging
    export: vision_with_projection              # or clip
    seed: 0
    devices: null
    adaptation: transductive                    # or held_out: adapt on held_out_fraction of each task's test
    held_out_fraction: 0.5                      #   images (no unlabeled folder) and score on the rest

A causal language model (Llama / Qwen2) takes ``model: causal_lm`` and, per task, a full fine-tuned folder or
a PEFT LoRA adapter and its unlabeled prompts:

    model: causal_lm
    pretrained: /models/base                    # HF causal-LM folder: config.json, safetensors, tokenizer files
    tasks:
      - name: math
        finetuned: /models/base-math            # a full fine-tuned folder, or
        # adapter: /adapters/math               # a PEFT LoRA adapter folder (factored: true keeps B·A factored)
        prompts: {file: math.txt}               # one prompt a line, or {jsonl: data.jsonl, field: prompt}
        # candidates: [" A", " B"]              # optional: classification over these one-token answers
    methods: [layer_wise_adamerging, task_arithmetic]
    max_length: 256                             # prompts are cut to this many tokens
    mesh: {data: 1, fsdp: 1}                    # optional 2-D device mesh (else devices: N, a 1-D data mesh)
    precision: bfloat16
    dtype: null                                 # the merged model's dtype (default: θ0's, tensor by tensor)

``pretrained_vision``, ``export``, ``trust_pickle``, ``offline`` and ``eval_batch_size`` are CLIP's;
``max_length``, ``mesh`` and ``dtype`` are the language model's.

Relative paths are read from the YAML file's folder. Every error is one line naming the field
(``tasks[1].unlabeled.folder``) and, for an unknown key, the known ones. The YAML file and class files are
read strictly: UTF-8 only (the error names the file and byte offset), no key given twice in one mapping at
any depth (YAML readers keep the last silently; the error names the key and both lines), no class name twice
in a task, no class name without a visible character.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from adamerging_jax.core.optimize import PRESETS, AdaMergingConfig
from adamerging_jax.core.protocol import Adaptation, MergeSettings
from adamerging_jax.data.strict_text import read_utf8, text_lines, visible
from adamerging_jax.merging.errors import MergeError

PRECISIONS = {"float32": None, "bfloat16": "bfloat16"}
EXPORTS = ("vision_with_projection", "clip")
SOURCE_OPTIONS = {"folder": ("recursive",), "class_folders": (), "tfds": ("split", "data_dir"), "file_list": ()}
HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
MODELS = ("clip", "causal_lm")
DTYPES = ("float32", "bfloat16", "float16", "float64")
PROMPT_OPTIONS = {"file": (), "jsonl": ("field",)}
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


UNIFIED_EXPORTS = ("emr", "surgery")
"""Methods with one model per task that ``merge`` exports for CLIP as a unified model plus what makes each task's
model from it (EMR-Merging: `merging.emr_files`; Representation Surgery: `merging.surgery_files`)."""
CLIP_ONLY_KEYS = {"pretrained_vision", "export", "trust_pickle", "offline", "eval_batch_size", "adaptation",
                  "held_out_fraction"}
LM_ONLY_KEYS = {"max_length", "mesh", "dtype"}
TOP_KEYS = {f.name for f in dataclasses.fields(MergeConfig)} - {"source"}
TASK_KEYS = {"name", "finetuned", "unlabeled", "classes", "classes_file", "templates", "test"}
LM_TASK_KEYS = {"name", "finetuned", "adapter", "factored", "prompts", "candidates"}


def _known(where: str, mapping: Any, known: set[str] | Sequence[str]) -> dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(mapping).__name__}")
    if unknown := sorted(set(map(str, mapping)) - set(known)):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return dict(mapping)


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value


def _integer(where: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where} must be an integer ≥ {minimum}{' or null' if optional else ''}, got {value!r}")
    return value


def _boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _path(base: Path, value: str) -> str:
    """``value`` joined to the config's folder when relative."""
    return value if os.path.isabs(value) else str(base / value)


def _location(base: Path, value: str) -> str:
    """A checkpoint: a path (relative ones joined to the config's folder) or a hub id kept as it is."""
    joined = _path(base, value)
    return value if not os.path.exists(joined) and HUB_ID.fullmatch(value) else joined


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of strings, got {value!r}")
    return tuple(_string(f"{where}[{i}]", item) for i, item in enumerate(value))


def _one_kind(where: str, value: Any, options: Mapping[str, Sequence[str]], what: str) -> tuple[str, dict]:
    """(kind, fields) of a mapping naming exactly one of ``options``' kinds, with only that kind's options."""
    fields = _known(where, value, [*options, *{o for opts in options.values() for o in opts}])
    kinds = [kind for kind in options if kind in fields]
    if len(kinds) != 1:
        raise ConfigError(f"{where} needs exactly one of {list(options)}, got {sorted(fields)}")
    kind = kinds[0]
    if extra := sorted(set(fields) - {kind, *options[kind]}):
        raise ConfigError(f"{where}: {extra} do not apply to a {kind!r} {what}; it takes {list(options[kind])}")
    return kind, fields


def _unlabeled(where: str, value: Any, base: Path) -> Unlabeled:
    kind, fields = _one_kind(where, value, SOURCE_OPTIONS, "source")
    path = _string(f"{where}.{kind}", fields[kind])
    data_dir = fields.get("data_dir")
    return Unlabeled(kind, path if kind == "tfds" else _path(base, path),
                     split=_string(f"{where}.split", fields["split"]) if "split" in fields else None,
                     data_dir=_path(base, _string(f"{where}.data_dir", data_dir)) if data_dir is not None else None,
                     recursive=_boolean(f"{where}.recursive", fields.get("recursive", False)))


def _classes(where: str, fields: dict[str, Any], base: Path) -> tuple[str, ...]:
    """The task's class names: each with a visible character, none twice; from ``classes`` or one a line of
    ``classes_file`` (blank lines skipped), the error naming the entry or line."""
    if ("classes" in fields) == ("classes_file" in fields):
        raise ConfigError(f"{where} needs exactly one of 'classes' or 'classes_file'")
    if "classes" in fields:
        field = f"{where}.classes"
        entries = [(f"{field}[{i}]", name.strip()) for i, name in enumerate(_strings(field, fields["classes"]))]
    else:
        field = f"{where}.classes_file"
        path = _path(base, _string(field, fields["classes_file"]))
        if not os.path.isfile(path):
            raise ConfigError(f"{field}: {path!r} is missing")
        try:
            lines = text_lines(path)
        except ValueError as error:
            raise ConfigError(f"{field}: {error}") from None
        entries = [(f"{field} {path} line {number}", line.strip()) for number, line in enumerate(lines, start=1)
                   if line.strip()]
        if not entries:
            raise ConfigError(f"{field}: {path!r} names no class")
    first: dict[str, str] = {}
    for entry, name in entries:
        if not visible(name):
            raise ConfigError(f"{entry}: class name {name!r} has no visible character")
        if name in first:
            raise ConfigError(f"{entry}: class {name!r} is listed twice in the task (first at {first[name]})")
        first[name] = entry
    return tuple(name for _, name in entries)


def _templates(where: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    templates = _strings(where, value)
    for i, template in enumerate(templates):
        if template.count("{}") != 1:
            raise ConfigError(f"{where}[{i}] must hold one {{}} where the class name goes, got {template!r}")
    return templates


def _task(where: str, value: Any, base: Path) -> TaskConfig:
    fields = _known(where, value, TASK_KEYS)
    for key in ("name", "finetuned"):
        if key not in fields:
            raise ConfigError(f"{where}.{key} is required")
    return TaskConfig(
        name=_string(f"{where}.name", fields["name"]),
        finetuned=_location(base, _string(f"{where}.finetuned", fields["finetuned"])),
        classes=_classes(where, fields, base),
        templates=_templates(f"{where}.templates", fields.get("templates")),
        unlabeled=_unlabeled(f"{where}.unlabeled", fields["unlabeled"], base) if fields.get("unlabeled") else None,
        test=_path(base, _string(f"{where}.test", fields["test"])) if fields.get("test") is not None else None,
    )


def _prompts(where: str, value: Any, base: Path) -> Prompts:
    kind, fields = _one_kind(where, value, PROMPT_OPTIONS, "file")
    path = _path(base, _string(f"{where}.{kind}", fields[kind]))
    if kind == "file":
        return Prompts(path)
    if not path.endswith(".jsonl"):
        raise ConfigError(f"{where}.jsonl must name a .jsonl file, got {path!r}")
    if "field" not in fields:
        raise ConfigError(f"{where}.field is required: the JSONL key that holds the prompt")
    return Prompts(path, _string(f"{where}.field", fields["field"]))


def _lm_task(where: str, value: Any, base: Path) -> TaskConfig:
    fields = _known(where, value, LM_TASK_KEYS)
    if "name" not in fields:
        raise ConfigError(f"{where}.name is required")
    if ("finetuned" in fields) == ("adapter" in fields):
        raise ConfigError(f"{where} needs exactly one of 'finetuned' (a full model folder) or 'adapter' (a PEFT "
                          "LoRA folder)")
    factored = _boolean(f"{where}.factored", fields.get("factored", False))
    if factored and "adapter" not in fields:
        raise ConfigError(f"{where}.factored applies to an adapter; a full fine-tuned model has no factors")
    candidates = fields.get("candidates")
    if candidates is not None:
        candidates = _strings(f"{where}.candidates", candidates)
        if len(candidates) < 2 or len(set(candidates)) < len(candidates):
            raise ConfigError(f"{where}.candidates must be at least 2 distinct answers, got {list(candidates)}")
    return TaskConfig(
        name=_string(f"{where}.name", fields["name"]),
        finetuned=_path(base, _string(f"{where}.finetuned", fields["finetuned"])) if "finetuned" in fields else None,
        adapter=_path(base, _string(f"{where}.adapter", fields["adapter"])) if "adapter" in fields else None,
        factored=factored,
        prompts=_prompts(f"{where}.prompts", fields["prompts"], base) if fields.get("prompts") else None,
        candidates=candidates,
    )


def _mesh(where: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    fields = _known(where, value, ["data", "fsdp"])
    return (_integer(f"{where}.data", fields.get("data", 1), 1), _integer(f"{where}.fsdp", fields.get("fsdp", 1), 1))


def _check_lm(where: str, fields: Mapping[str, Any], tasks: Sequence[TaskConfig], settings: MergeSettings) -> None:
    """The causal-LM rules that span fields: candidates and factored adapters for every task or none, factored
    τ only with AdaMerging on raw τ, prompts for every task when a method learns from them."""
    if any(task.candidates for task in tasks) and not all(task.candidates for task in tasks):
        missing = [task.name for task in tasks if not task.candidates]
        raise ConfigError(f"{where}: tasks {missing} have no candidates; give candidates to every task or none")
    if any(task.factored for task in tasks):
        if unfactored := [task.name for task in tasks if not task.factored]:
            raise ConfigError(f"{where}: tasks {unfactored} are not factored adapters; factored: true needs every "
                              "task to be an adapter with factored: true")
        dense = [spec.name for spec in settings.methods
                 if not (spec.method.learns_coefficients and spec.describe()["params"].get("task_vectors") == "raw")]
        if dense:
            raise ConfigError(f"{where}: methods {dense} need dense task vectors; factored: true works with "
                              "AdaMerging on raw τ only (drop factored, or those methods)")
    if settings.needs_data:
        needing = [spec.name for spec in settings.methods if spec.method.needs_data]
        for i, task in enumerate(tasks):
            if task.prompts is None:
                raise ConfigError(f"{where}: tasks[{i}].prompts is required: {needing} learn from unlabeled prompts")
    if fields.get("mesh") is not None and fields.get("devices") is not None:
        raise ConfigError(f"{where}: give mesh or devices, not both")


def parse_config(document: Any, source: str = "<config>", base: str | os.PathLike = ".") -> MergeConfig:
    """A `MergeConfig` from the YAML document (a mapping), every field checked; ConfigError names the field."""
    where = source
    fields = _known(where, document, TOP_KEYS)
    base = Path(base)
    model = _choice(f"{where}: model", fields.get("model", "clip"), MODELS)
    lm = model == "causal_lm"
    if foreign := sorted(set(fields) & (CLIP_ONLY_KEYS if lm else LM_ONLY_KEYS)):
        raise ConfigError(f"{where}: {foreign} do not apply to model: {model} (they are "
                          f"{'CLIP' if lm else 'causal_lm'} settings)")
    for key in ("pretrained", "tasks"):
        if key not in fields:
            raise ConfigError(f"{where}: {key} is required")
    if not isinstance(fields["tasks"], list) or not fields["tasks"]:
        raise ConfigError(f"{where}: tasks must be a non-empty list")
    parse_task = _lm_task if lm else _task
    tasks = tuple(parse_task(f"{where}: tasks[{i}]", task, base) for i, task in enumerate(fields["tasks"]))
    names = [task.name for task in tasks]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(f"{where}: tasks: names listed more than once: {duplicates}")
    methods = fields.get("methods", list(MergeConfig.methods))
    if isinstance(methods, (str, Mapping)):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{where}: methods must be a non-empty list of names or {{name: ..., parameter: ...}}")
    pretrained = _string(f"{where}: pretrained", fields["pretrained"])
    config = MergeConfig(
        pretrained=_path(base, pretrained) if lm else _location(base, pretrained),
        pretrained_vision=(_location(base, _string(f"{where}: pretrained_vision", fields["pretrained_vision"]))
                           if fields.get("pretrained_vision") is not None else None),
        tasks=tasks,
        methods=tuple(methods),
        export_method=(_string(f"{where}: export_method", fields["export_method"])
                       if fields.get("export_method") is not None else None),
        preset=_choice(f"{where}: preset", fields.get("preset", "official"), PRESETS),
        adamerging=_adamerging(f"{where}: adamerging", fields.get("adamerging") or {}, methods),
        precision=_choice(f"{where}: precision", fields.get("precision", "float32"), list(PRECISIONS)),
        export=_choice(f"{where}: export", fields.get("export", "vision_with_projection"), EXPORTS),
        seed=_integer(f"{where}: seed", fields.get("seed", 0), 0),
        devices=_integer(f"{where}: devices", fields.get("devices"), 1, optional=True),
        eval_batch_size=_integer(f"{where}: eval_batch_size", fields.get("eval_batch_size", 256), 1),
        trust_pickle=_boolean(f"{where}: trust_pickle", fields.get("trust_pickle", False)),
        offline=_boolean(f"{where}: offline", fields.get("offline", False)),
        model=model,
        max_length=_integer(f"{where}: max_length", fields.get("max_length", 256), 2),
        mesh=_mesh(f"{where}: mesh", fields.get("mesh")),
        dtype=_choice(f"{where}: dtype", fields["dtype"], DTYPES) if fields.get("dtype") is not None else None,
        adaptation=fields.get("adaptation", "transductive"),
        held_out_fraction=fields.get("held_out_fraction", 0.5),
        source=source,
    )
    settings = config.settings()
    names = [spec.name for spec in settings.methods]
    if config.export_method is not None and config.export_method not in names:
        raise ConfigError(f"{where}: export_method {config.export_method!r} is not among the methods {names}")
    exported = next(spec for spec in settings.methods if spec.name == config.exported)
    if exported.method.per_task_models and not (exported.name in UNIFIED_EXPORTS and not lm):
        raise ConfigError(f"{where}: export_method {config.exported!r} has one model per task, not one merged model "
                          f"(of those, only {list(UNIFIED_EXPORTS)} export, as a unified CLIP model)")
    if lm:
        _check_lm(where, fields, tasks, settings)
    elif settings.adaptation.mode == "held_out":
        _check_held_out(where, tasks)
    elif settings.needs_data:
        needing = [spec.name for spec in settings.methods if spec.method.needs_data]
        for i, task in enumerate(tasks):
            if task.unlabeled is None:
                raise ConfigError(f"{where}: tasks[{i}].unlabeled is required: {needing} learn from unlabeled images")
    return config


def _check_held_out(where: str, tasks: Sequence[TaskConfig]) -> None:
    """Held-out adaptation adapts on part of each task's test folder: every task needs one, and none gives
    unlabeled images (they would not be read)."""
    for i, task in enumerate(tasks):
        if task.test is None:
            raise ConfigError(f"{where}: tasks[{i}].test is required: adaptation: held_out adapts on part of each "
                              "task's test images and scores the rest")
        if task.unlabeled is not None:
            raise ConfigError(f"{where}: tasks[{i}].unlabeled is not read with adaptation: held_out (it adapts on "
                              "part of the test images); remove it, or use adaptation: transductive")


def _adamerging_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(AdaMergingConfig)} - {"optimizer", "stacked", "checkpoint_dir",
                                                                      "granularity"}


def _adamerging(where: str, value: Any, methods: Sequence[Any]) -> dict[str, Any]:
    """The ``adamerging:`` overrides of the preset. ``granularity`` is refused, naming the config's methods: each
    AdaMerging method fixes its own (``task_wise_*``: one λ per task, ``layer_wise_*``: one per task and tensor),
    and the key would be silently overwritten."""
    if isinstance(value, Mapping) and "granularity" in value:
        names = [method.get("name") if isinstance(method, Mapping) else method for method in methods]
        raise ConfigError(f"{where}.granularity: the method fixes the granularity of λ (methods {names}); name "
                          "task_wise_adamerging (one λ per task) or layer_wise_adamerging (one per task and tensor), "
                          "or their ++ variants, and remove the key")
    return _known(where, value, _adamerging_keys())


def load_yaml(text: str) -> Any:
    """The YAML document ``text`` read with PyYAML's safe loader, except that a mapping (at any depth) that
    gives one key twice is refused: ConfigError naming the key and both lines (a ``<<`` merge may override)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: the base loader refuses it
                    continue
                if first is not None:
                    raise ConfigError(f"key {key!r} is given twice in one mapping, on lines {first} and {line}")
                lines[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> MergeConfig:
    """Read and check the YAML file ``path`` (strictly: module docstring); ``overrides`` (the command line's
    flags) replace its fields (``steps`` and ``lr`` go into ``adamerging``)."""
    require("yaml", "models", "reading the merge config")
    import yaml

    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ConfigError(f"config file {source!r} is missing")
    try:
        document = load_yaml(read_utf8(source))
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except ValueError as error:  # not UTF-8: the message names the file
        raise ConfigError(str(error)) from None
    document = dict(document) if isinstance(document, Mapping) else document
    if isinstance(document, dict):
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in ("steps", "lr"):
                document["adamerging"] = {**(document.get("adamerging") or {}), key: value}
            else:
                document[key] = value
    return parse_config(document, source, Path(source).resolve().parent)
