"""Every hyper-parameter of the paper's experiments, in one place, with the official and FusionBench presets.

An :class:`ExperimentConfig` holds the checkpoints (:class:`Checkpoints`), where the test sets come from
(:class:`DataConfig`) and the merge settings (the protocol's :class:`~adamerging_jax.core.protocol.MergeSettings`
made by :func:`merge_settings`: registry methods, and the core's :class:`~adamerging_jax.AdaMergingConfig`:
``official()`` = 500 steps, 2 x 16 test images per task per step, λ clamped to [0, 1]; ``fusionbench()`` =
1000 steps, 1 x 16, no clamp, entropy eps 1e-8).  Task arithmetic λ = 0.3; TIES: top 20% over the whole model,
disjoint *sum*, scale 0.3 (the official AdaMerging script's baseline, also what AdaMerging++ preprocesses with).
Every config is validated when it is built; an error names the field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from adamerging_jax.cache import cache_root
from adamerging_jax.core.optimize import AdaMergingConfig
from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.core.trees import check_int, jsonable
from adamerging_jax.core.registry import method_spec, method_specs
from adamerging_jax.models.clip import stacked

METHODS = ("pretrained", "individual", "weight_average", "task_arithmetic", "ties", "task_wise_adamerging",
           "task_wise_adamerging++", "layer_wise_adamerging", "layer_wise_adamerging++")
"""Table 1's rows, in the paper's order (registry names)."""

DEFAULT_CACHE = cache_root()

CHECKPOINTS = {
    "B/32": ("openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_{task}"),
    "B/16": ("openai/clip-vit-base-patch16", "tanganke/clip-vit-base-patch16_{task}"),
    "L/14": ("openai/clip-vit-large-patch14", "tanganke/clip-vit-large-patch14_{task}"),
}
"""Per CLIP variant: the pretrained CLIP (θ0, projection, text tower) and FusionBench's fine-tuned towers."""


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where θ0, the heads' text tower and the fine-tuned image towers come from.

    ``pretrained``: a full HF CLIP (directory or hub id): θ0's image tower, the visual projection, the text
    tower, ``logit_scale`` and the tokenizer files.  ``finetuned``: one path or hub id per task, ``{task}``
    standing for the FusionBench/head name (``stanford-cars``) and ``{dataset}`` for the task_vectors folder
    name (``Cars``); HF ``CLIPVisionModel`` directories/ids, or open_clip state dicts (``.pt``/``.pth``, read
    with torch).  ``pretrained_vision`` optionally replaces θ0's image tower (e.g. task_vectors' open_clip
    ``zeroshot.pt``, so τ = finetuned − zeroshot as in the official code).  ``trust_pickle`` allows the
    task_vectors pickled modules (they run code when loaded).
    """

    pretrained: str = CHECKPOINTS["B/32"][0]
    finetuned: str = CHECKPOINTS["B/32"][1]
    pretrained_vision: str | None = None
    trust_pickle: bool = False
    allow_download: bool = True

    @classmethod
    def fusionbench(cls, variant: str, **overrides: Any) -> Checkpoints:
        if variant not in CHECKPOINTS:
            raise ValueError(f"no default checkpoints for CLIP {variant!r}; known: {sorted(CHECKPOINTS)}")
        pretrained, finetuned = CHECKPOINTS[variant]
        return cls(**{"pretrained": pretrained, "finetuned": finetuned, **overrides})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where each task's test set is read, and how.

    ``folders[task]``: a split folder of class subfolders (task_vectors' layout, e.g. ``.../dtd/val``); labels
    are the sorted class folders' ranks, which is task_vectors' class order.  ``task_vectors_dir``: task_vectors'
    data location; the tasks it keeps as class folders (SUN397, EuroSAT, DTD) are read from their test split
    there (``data.folder.TASK_VECTORS_TEST_FOLDERS``) unless ``folders`` names them.  Other tasks are read from the
    ArrayRecord datasets prepared under ``tfds_dir`` (``adamerging_jax.data.tfds_sources.prepare``);
    ``file_lists[task]`` selects a published file list there (e.g. resisc45-test.txt).
    ``cache_images`` keeps the decoded, resized crops of the images AdaMerging visits (about 150 KB each at
    224 px; the 4 AdaMerging runs of Table 1 visit the same images).  ``max_test_images`` evaluates and
    adapts on the first N images of each test set only: a smoke-test knob, not the paper's protocol.
    """

    tfds_dir: str | None = None
    task_vectors_dir: str | None = None
    folders: Mapping[str, str] = dataclasses.field(default_factory=dict)
    file_lists: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cache_images: bool = True
    eval_batch_size: int = 256
    num_threads: int = 8
    max_test_images: int | None = None

    def __post_init__(self) -> None:
        for field in ("eval_batch_size", "num_threads"):
            check_int(f"DataConfig.{field}", getattr(self, field), 1)
        if self.max_test_images is not None:
            check_int("DataConfig.max_test_images", self.max_test_images, 1)


def merge_settings(preset: str = "official", methods: Sequence[Any] = METHODS, ties_total_size: int | None = None,
                   **adamerging: Any) -> MergeSettings:
    """The paper's `MergeSettings`: `methods` (registry names or specs; the registry's defaults are the
    official script's: task arithmetic 0.3, TIES 20% / dis-sum / 0.3) with the ``official`` (EnnengYang/
    AdaMerging) or ``fusionbench`` (FusionBench 0.2.33) AdaMerging settings, CLIP's stacked layers declared;
    ``ties_total_size`` (the official ++ count, text side included) goes to TIES and AdaMerging++."""
    specs = []
    for spec in method_specs(methods):
        if ties_total_size is not None and "total_size" in spec.params:
            spec = method_spec(spec, total_size=ties_total_size)
        specs.append(spec)
    return MergeSettings(tuple(specs), AdaMergingConfig.from_preset(preset, stacked=stacked, **adamerging))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the tasks merged, the tasks evaluated (merged first), models, data, methods, output.

    ``devices``: AdaMerging's batches are split over the first N accelerators (default: all of them).
    """

    name: str
    merge_tasks: tuple[str, ...]
    eval_tasks: tuple[str, ...]
    checkpoints: Checkpoints = Checkpoints()
    data: DataConfig = DataConfig()
    merge: MergeSettings = dataclasses.field(default_factory=merge_settings)
    seed: int = 0
    devices: int | None = None
    cache_dir: str = str(DEFAULT_CACHE)
    checkpoint_runs: bool = True
    quiet: bool = False

    def __post_init__(self) -> None:
        check_int("ExperimentConfig.seed", self.seed, 0)
        if self.devices is not None:
            check_int("ExperimentConfig.devices", self.devices, 1)
        if not isinstance(self.merge, MergeSettings):
            raise ValueError(f"ExperimentConfig.merge must be a MergeSettings, got {self.merge!r}")
        if tuple(self.eval_tasks[: len(self.merge_tasks)]) != tuple(self.merge_tasks):
            raise ValueError(f"eval_tasks {self.eval_tasks} must start with the merged tasks {self.merge_tasks}")
        if len(self.merge_tasks) < 2:
            raise ValueError(f"merging needs at least 2 tasks, got {self.merge_tasks}")

    def settings(self) -> dict[str, Any]:
        """A JSON-able record of every setting (callables by name)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "merge"}
        fields = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}
        return {**jsonable(fields), "merge": self.merge.describe()}
