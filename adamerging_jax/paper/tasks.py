"""The paper's 8 tasks and their names in each place they come from.

``name`` is the key of :data:`adamerging_jax.data.tfds_sources.TASKS`; ``head`` the key of the packaged
zero-shot class names (``heads/clip_tasks.json``), which is also FusionBench's checkpoint suffix
(``tanganke/clip-vit-base-patch32_<head>``); ``dataset`` the folder name of the task_vectors checkpoints
(``<root>/ViT-B-32/<dataset>/finetuned.pt``) and the column title of the paper's tables.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class PaperTask:
    name: str
    head: str
    dataset: str


TASKS: dict[str, PaperTask] = {
    t.name: t
    for t in (
        PaperTask("sun397", "sun397", "SUN397"),
        PaperTask("cars", "stanford-cars", "Cars"),
        PaperTask("resisc45", "resisc45", "RESISC45"),
        PaperTask("eurosat", "eurosat", "EuroSAT"),
        PaperTask("svhn", "svhn", "SVHN"),
        PaperTask("gtsrb", "gtsrb", "GTSRB"),
        PaperTask("mnist", "mnist", "MNIST"),
        PaperTask("dtd", "dtd", "DTD"),
    )
}
"""Table 1's tasks in the paper's column order."""

ALL_TASKS: tuple[str, ...] = tuple(TASKS)
ROBUSTNESS_TASKS: tuple[str, ...] = ("cars", "eurosat", "resisc45", "gtsrb")
GENERALIZATION_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "1": (("sun397", "cars", "resisc45", "dtd", "svhn", "gtsrb"), ("mnist", "eurosat")),
    "2": (("sun397", "cars", "gtsrb", "eurosat", "dtd", "mnist"), ("resisc45", "svhn")),
}
"""The paper's two generalization experiments: (seen tasks merged, unseen tasks only evaluated)."""


def paper_task(name: str) -> PaperTask:
    """The task called ``name`` (our name, the head/FusionBench name or the paper's column title)."""
    for task in TASKS.values():
        if name in (task.name, task.head, task.dataset):
            return task
    raise ValueError(f"unknown task {name!r}; the tasks are {list(TASKS)}")


def canonical(names: Iterable[str]) -> tuple[str, ...]:
    """Our names of ``names``, duplicates refused."""
    out = tuple(paper_task(n).name for n in names)
    if len(set(out)) != len(out):
        raise ValueError(f"a task is listed twice in {list(names)}")
    return out
