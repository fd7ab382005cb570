"""Every check of a ``merge`` run, before any compute, and the plan it prints (``--dry-run``).

Checked here for every model family: the output folder can be written, lies outside every input folder (and
no input inside it) and holds nothing a run does not write. Then the config's model family checks the rest
(its ``prepare``, `merging.families.FAMILIES`): CLIP's in `merging.clip_run` (unlabeled images and test
folders decode, the checkpoints load and fit θ0), the causal LM's in `merging.lm` (checkpoints and adapters
against θ0, the tokenizer, the prompts, the candidates); both the methods against their binding and a
``--weights`` file (`merging.checked_run`). Each failure is a `MergeError` naming the file, task or field, which
the command prints as one line ``error: ...``, never a traceback. A real run makes the same plan and runs from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from adamerging_jax.core.checkpoint import check_writable_folder
from adamerging_jax.merging.errors import MergeError
from adamerging_jax.merging.families import FAMILIES
from adamerging_jax.merging.schema import MergeConfig, require


def check_writable(output: Path) -> None:
    """``output`` is a folder, or can be made (`check_writable_folder`; nothing is created)."""
    try:
        check_writable_folder(output)
    except ValueError as error:
        raise MergeError(f"--output {error}") from None


def input_paths(config: MergeConfig) -> dict[str, str | None]:
    """Every file or folder the run reads, by config field (tfds names and hub ids are not paths)."""
    paths: dict[str, str | None] = {"pretrained": config.pretrained, "pretrained_vision": config.pretrained_vision}
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}]"
        paths.update({f"{where}.finetuned": task.finetuned, f"{where}.adapter": task.adapter,
                      f"{where}.test": task.test, f"{where}.prompts": task.prompts.path if task.prompts else None})
        if task.unlabeled is not None:
            kind = task.unlabeled.kind
            paths[f"{where}.unlabeled.{kind}"] = task.unlabeled.path if kind != "tfds" else None
            paths[f"{where}.unlabeled.data_dir"] = task.unlabeled.data_dir
    return paths


def check_output_placement(config: MergeConfig, output: Path) -> None:
    """The output is outside every input and holds nothing a run does not write (`adamerging_jax.output`)."""
    from adamerging_jax.output import check_output_contents, check_placement

    try:
        check_placement(output, input_paths(config))
        check_output_contents(output)
    except ValueError as error:
        raise MergeError(str(error)) from None


def prepare(config: MergeConfig, output: str | os.PathLike, coefficients_file: str | None = None,
            log: Callable[[str], None] = print) -> Any:
    """Check everything (module docstring) and return the plan the config's model family makes (its
    ``prepare``: `merging.clip_run.Plan`, `merging.lm.LmPlan`); `MergeError` naming the fault on a failure."""
    require("flax", "models", "the merge command")
    require("transformers", "models", "the merge command")
    require("safetensors", "models", "the merge command")
    output = Path(output)
    check_writable(output)
    check_output_placement(config, output)
    return FAMILIES[config.model].prepare(config, output, coefficients_file, log)
