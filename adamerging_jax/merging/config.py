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
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from adamerging_jax.core.optimize import PRESETS, AdaMergingConfig
from adamerging_jax.data.strict_text import read_utf8
from adamerging_jax.merging.families import FAMILIES
from adamerging_jax.merging.schema import (
    PRECISIONS,
    ConfigError,
    MergeConfig,
    boolean,
    integer_at_least,
    keys_of,
    nonempty_string,
    one_of,
    require,
)

EXPORTS = ("vision_with_projection", "clip")
DTYPES = ("float32", "bfloat16", "float16", "float64")
TOP_KEYS = {f.name for f in dataclasses.fields(MergeConfig)} - {"source"}


def _mesh(where: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    fields = keys_of(where, value, ["data", "fsdp"])
    return (integer_at_least(f"{where}.data", fields.get("data", 1), 1),
            integer_at_least(f"{where}.fsdp", fields.get("fsdp", 1), 1))


def parse_config(document: Any, source: str = "<config>", base: str | os.PathLike = ".") -> MergeConfig:
    """A `MergeConfig` from the YAML document (a mapping), every field checked; ConfigError names the field. The
    ``model:`` names the family (`merging.families.FAMILIES`) that reads its own keys and its tasks and checks
    its rules across fields."""
    where = source
    fields = keys_of(where, document, TOP_KEYS)
    base = Path(base)
    family = FAMILIES[one_of(f"{where}: model", fields.get("model", "clip"), list(FAMILIES))]
    others = {key: other for other in FAMILIES.values() if other is not family for key in other.own_keys}
    if foreign := sorted(set(fields) & set(others) - family.own_keys):
        owners = sorted({others[key].title for key in foreign})
        raise ConfigError(f"{where}: {foreign} do not apply to model: {family.name} (they are "
                          f"{' / '.join(owners)} settings)")
    for key in ("pretrained", "tasks"):
        if key not in fields:
            raise ConfigError(f"{where}: {key} is required")
    if not isinstance(fields["tasks"], list) or not fields["tasks"]:
        raise ConfigError(f"{where}: tasks must be a non-empty list")
    tasks = tuple(family.parse_task(f"{where}: tasks[{i}]", task, base) for i, task in enumerate(fields["tasks"]))
    names = [task.name for task in tasks]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(f"{where}: tasks: names listed more than once: {duplicates}")
    methods = fields.get("methods", list(MergeConfig.methods))
    if isinstance(methods, (str, Mapping)):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{where}: methods must be a non-empty list of names or {{name: ..., parameter: ...}}")
    config = MergeConfig(
        pretrained=family.pretrained(base, nonempty_string(f"{where}: pretrained", fields["pretrained"])),
        pretrained_vision=(family.pretrained(base, nonempty_string(f"{where}: pretrained_vision",
                                                                   fields["pretrained_vision"]))
                           if fields.get("pretrained_vision") is not None else None),
        tasks=tasks,
        methods=tuple(methods),
        export_method=(nonempty_string(f"{where}: export_method", fields["export_method"])
                       if fields.get("export_method") is not None else None),
        preset=one_of(f"{where}: preset", fields.get("preset", "official"), PRESETS),
        adamerging=_adamerging(f"{where}: adamerging", fields.get("adamerging") or {}, methods),
        precision=one_of(f"{where}: precision", fields.get("precision", "float32"), list(PRECISIONS)),
        export=one_of(f"{where}: export", fields.get("export", "vision_with_projection"), EXPORTS),
        seed=integer_at_least(f"{where}: seed", fields.get("seed", 0), 0),
        devices=integer_at_least(f"{where}: devices", fields.get("devices"), 1, optional=True),
        eval_batch_size=integer_at_least(f"{where}: eval_batch_size", fields.get("eval_batch_size", 256), 1),
        trust_pickle=boolean(f"{where}: trust_pickle", fields.get("trust_pickle", False)),
        offline=boolean(f"{where}: offline", fields.get("offline", False)),
        model=family.name,
        max_length=integer_at_least(f"{where}: max_length", fields.get("max_length", 256), 2),
        mesh=_mesh(f"{where}: mesh", fields.get("mesh")),
        dtype=one_of(f"{where}: dtype", fields["dtype"], DTYPES) if fields.get("dtype") is not None else None,
        adaptation=fields.get("adaptation", "transductive"),
        held_out_fraction=fields.get("held_out_fraction", 0.5),
        source=source,
    )
    settings = config.settings()
    names = [spec.name for spec in settings.methods]
    if config.export_method is not None and config.export_method not in names:
        raise ConfigError(f"{where}: export_method {config.export_method!r} is not among the methods {names}")
    exported = next(spec for spec in settings.methods if spec.name == config.exported)
    if exported.method.per_task_models and exported.name not in family.unified_exports:
        raise ConfigError(f"{where}: export_method {config.exported!r} has one model per task, not one merged model "
                          f"(of those, model: {family.name} exports only {list(family.unified_exports)}, as a "
                          "unified model)")
    family.check_config(where, fields, tasks, settings)
    return config


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
    return keys_of(where, value, _adamerging_keys())


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
