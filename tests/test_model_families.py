"""A model family is one value: a family registered in `merging.families.FAMILIES` is read, checked, prepared
and run by the ``merge`` modules without any of them naming it, and a family's keys are refused for another."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adamerging_jax.merging.config import ConfigError, parse_config
from adamerging_jax.merging.families import FAMILIES
from adamerging_jax.merging.family import ModelFamily
from adamerging_jax.merging.plan import prepare
from adamerging_jax.merging.run import run_plan
from adamerging_jax.merging.schema import TaskConfig, config_path, keys_of, nonempty_string


@dataclasses.dataclass
class ToyPlan:
    config: object
    output: Path


def toy_task(where, value, base):
    fields = keys_of(where, value, {"name", "weights_file"})
    return TaskConfig(name=nonempty_string(f"{where}.name", fields["name"]),
                      finetuned=config_path(base, nonempty_string(f"{where}.weights_file", fields["weights_file"])))


def refuse_one_task(where, fields, tasks, settings):
    if len(tasks) < 2:
        raise ConfigError(f"{where}: the toy family merges at least 2 tasks")


TOY = ModelFamily(name="toy", title="toy", own_keys=frozenset({"max_length"}), task_keys=frozenset({"name"}),
                  parse_task=toy_task, pretrained=config_path, check_config=refuse_one_task, unified_exports=(),
                  prepare=lambda config, output, weights, log: ToyPlan(config, output),
                  run=lambda plan, log: {"ran": plan.config.model, "tasks": [t.finetuned for t in plan.config.tasks]})


@pytest.fixture
def toy():
    FAMILIES.add(TOY)
    yield TOY
    del FAMILIES[TOY.name]


def document(**changes):
    return {"model": "toy", "pretrained": "base", "methods": ["task_arithmetic"],
            "tasks": [{"name": "a", "weights_file": "a.bin"}, {"name": "b", "weights_file": "b.bin"}], **changes}


def test_a_registered_family_is_read_prepared_and_run_through_the_shared_modules(toy, tmp_path):
    config = parse_config(document(max_length=8), "toy.yaml", tmp_path)
    assert config.model == "toy" and config.pretrained == str(tmp_path / "base") and config.max_length == 8
    plan = prepare(config, tmp_path / "out", log=lambda _: None)
    assert isinstance(plan, ToyPlan) and plan.output == tmp_path / "out"
    assert run_plan(plan) == {"ran": "toy", "tasks": [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]}


def test_a_family_refuses_what_it_does_not_read(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"toy.yaml: the toy family merges at least 2 tasks"):
        parse_config(document(tasks=[{"name": "a", "weights_file": "a.bin"}]), "toy.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"tasks\[0\]: unknown key\(s\) \['classes'\]"):
        parse_config(document(tasks=[{"name": "a", "weights_file": "a", "classes": ["x"]}]), "toy.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"\['export'\] do not apply to model: toy \(they are CLIP settings\)"):
        parse_config(document(export="clip"), "toy.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"model must be one of \['clip', 'causal_lm', 'toy'\], got 'toys'"):
        parse_config(document(model="toys"), "toy.yaml", tmp_path)
