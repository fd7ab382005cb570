"""Bad input to evaluation, the method registry and the commands' settings is refused with the culprit named,
before any compute: one row per case (``CASES``), one test over them."""
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.cache import ENV_VAR
from adamerging_jax.cli import main
from adamerging_jax.demo.pipeline import DemoConfig
from bad_inputs import Case, assert_no_traceback


X = np.zeros((6, 3), np.float32)
LABELS = np.array([0, 1, 2, 0, 1, 2])


def logits(value: Any = None) -> Callable:
    """apply_fn giving 3-class logits, or `value(x)`."""
    return lambda params, x, task: value(x) if value is not None else jnp.zeros((x.shape[0], 3)) + params


def evaluate(apply_fn=None, labels=LABELS, names=None, test_sets=None, batch_size=4) -> Callable[[Any], Any]:
    test_sets = [(X, labels)] if test_sets is None else test_sets
    return lambda _: am.evaluate(apply_fn or logits(), jnp.float32(0.0), test_sets, names, batch_size=batch_size)


def demo(*flags: str) -> Callable[[Any], Any]:
    return lambda tmp: main(["demo", "--quick", "--no-cache", "--output", str(tmp / "out"), *flags])


def demo_output_is_a_file(tmp) -> Any:
    (tmp / "file").write_text("x")
    return main(["demo", "--quick", "--output", str(tmp / "file")])


def demo_config_file(fields: Any, text: str | None = None) -> Callable[[Any], Any]:
    def run(tmp):
        (tmp / "c.json").write_text(json.dumps(fields) if text is None else text)
        return main(["demo", "--config", str(tmp / "c.json"), "--output", str(tmp / "out")])

    return run


def paper(prepare: Callable[[Any], Any], *flags: str) -> Callable[[Any], Any]:
    """``paper table1`` with ``flags`` ("{tmp}" standing for the test's folder) after ``prepare(tmp)``; it is
    refused before any model or data loads."""
    def run(tmp):
        prepare(tmp)
        return main(["paper", "table1", "--offline", *(flag.replace("{tmp}", str(tmp)) for flag in flags)])

    return run


def folders(*names: str) -> Callable[[Any], None]:
    return lambda tmp: [(tmp / name).mkdir(parents=True) for name in names]


def held_output(tmp) -> None:
    """``tmp / "out"``'s lock held (by this process, on another open file: flock refuses it all the same)."""
    from adamerging_jax.output import output_lock

    lock = output_lock(tmp / "out")
    lock.__enter__()
    HELD.append(lock)


HELD: list = []


def demo_with_cache_root(make: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The demo with ``$ADAMERGING_JAX_CACHE`` set to ``make(tmp)`` for the call."""
    def run(tmp):
        previous = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = str(make(tmp))
        try:
            return demo("--tasks", "mnist,digits")(tmp)
        finally:
            os.environ.pop(ENV_VAR) if previous is None else os.environ.update({ENV_VAR: previous})

    return run


def surgery_without_representation() -> Any:
    """Surgery (over task arithmetic) through the protocol on a binding that gives apply_fn alone."""
    theta0 = {"w": jnp.zeros((3,))}
    settings = am.MergeSettings([{"name": "surgery", "base": "task_arithmetic"}])
    return am.run_methods(settings, theta0, {"w": jnp.ones((2, 3))}, apply_fn=logits(), test_sets=[(X, LABELS)] * 2,
                          task_names=["a", "b"], adaptation=lambda step: [X, X], log=lambda _: None)


def a_file(tmp) -> Any:
    (tmp / "file").write_text("x")
    return tmp / "file"


CASES = [
    Case("eval-labels-2d", "evaluate: labels of shape [N, 1] (would broadcast to N × N)", ValueError,
         "labels must be 1-D integers", evaluate(labels=LABELS[:, None])),
    Case("eval-labels-float", "evaluate: float labels", ValueError, "labels must be 1-D integers",
         evaluate(labels=LABELS.astype(np.float32))),
    Case("eval-labels-range", "evaluate: a label outside [0, C) of the model's classes", ValueError,
         "label 3 outside [0, 3)", evaluate(labels=np.array([0, 1, 3, 0, 1, 2]))),
    Case("eval-labels-count", "evaluate: fewer labels than inputs", ValueError, "6 inputs but 5 labels",
         evaluate(labels=LABELS[:5])),
    Case("eval-duplicate-tasks", "evaluate: two tasks with one name (one would be dropped)", ValueError,
         "repeated: ['a']", evaluate(names=["a", "a"], test_sets=[(X, LABELS), (X, LABELS)])),
    Case("eval-nan-logits", "evaluate: NaN logits (the argmax of NaN is meaningless)", ValueError,
         "NaN or inf logits on task '0'", evaluate(logits(lambda x: jnp.full((x.shape[0], 3), jnp.nan)))),
    Case("eval-logits-shape", "evaluate: logits that are not [N, C]", ValueError, "task 0: apply_fn must return",
         evaluate(logits(lambda x: jnp.zeros((x.shape[0],))))),
    Case("eval-empty", "evaluate: an empty test set", ValueError, "test set of task '0' is empty",
         evaluate(test_sets=[[]])),
    Case("eval-batch-zero", "evaluate: batch_size 0", ValueError, "evaluate: batch_size must be >= 1, got 0",
         evaluate(batch_size=0)),
    Case("eval-batch-float", "evaluate: a float batch size", TypeError, "evaluate: batch_size must be an integer, got 2.0",
         evaluate(batch_size=2.0)),
    Case("eval-no-tasks", "evaluate: an empty list of tasks", ValueError, "evaluate: test_sets is empty: no task to evaluate",
         evaluate(test_sets=[])),
    Case("eval-list-examples", "evaluate: inputs given as a Python list of examples", TypeError,
         "test set of task '0': the inputs are a Python list of 6 items", evaluate(test_sets=[(list(X), LABELS)])),
    Case("eval-list-labels", "evaluate: labels given as a Python list", TypeError,
         "test set of task '0': the labels are a Python list of 6 items", evaluate(labels=LABELS.tolist())),
    Case("eval-batch-not-pair", "evaluate: a test set of bare input arrays (no labels)", ValueError,
         "test set of task '0': batch 0 is not an (inputs, labels) pair", evaluate(test_sets=[[X]])),
    Case("eval-names-string", "evaluate: task names given as one string (would split into letters)", TypeError,
         "evaluate: task_names must be a sequence of names, got 'ab'", evaluate(names="ab")),
    Case("eval-models-list", "evaluate_models: models given as a list", TypeError,
         "evaluate_models: models must be a mapping name -> params, got list",
         lambda _: am.evaluate_models(logits(), [jnp.float32(0.0)], [(X, LABELS)])),
    Case("eval-models-empty", "evaluate_models: no model", ValueError, "evaluate_models: models is empty",
         lambda _: am.evaluate_models(logits(), {}, [(X, LABELS)])),
    Case("method-unknown", "a merge method that is not registered", ValueError, "unknown merge method 'magic'",
         lambda _: am.MergeSettings(["task_arithmetic", "magic"])),
    Case("method-parameter", "a method parameter out of its range", ValueError, "parameter 'density' must be ≤ 1.0",
         lambda _: am.method_spec("ties", density=2.0)),
    Case("surgery-hidden-zero", "Surgery with hidden_dim 0", ValueError,
         "method 'surgery': parameter 'hidden_dim' must be ≥ 1, got 0", lambda _: am.method_spec("surgery", hidden_dim=0)),
    Case("surgery-lr-zero", "Surgery with surgery_lr 0 (refused before its base model is built)", ValueError,
         "method 'surgery': parameter 'surgery_lr': must be a finite number > 0, got 0",
         lambda _: am.method_spec("surgery", surgery_lr=0)),
    Case("surgery-base-unknown", "Surgery on a base method that is not registered", ValueError,
         "method 'surgery': parameter 'base': unknown merge method 'magic'", lambda _: am.method_spec("surgery", base="magic")),
    Case("surgery-base-itself", "Surgery as its own base", ValueError,
         "method 'surgery': parameter 'base': 'surgery' builds no single merged model",
         lambda _: am.method_spec("surgery", base="surgery")),
    Case("surgery-base-per-task", "Surgery on a per-task base (individual: no single merged model)", ValueError,
         "method 'surgery': parameter 'base': 'individual' builds no single merged model",
         lambda _: am.method_spec("surgery", base="individual")),
    Case("surgery-base-parameter", "Surgery on a base with a bad parameter (TIES density 2)", ValueError,
         "method 'surgery': parameter 'base': method 'ties': parameter 'density' must be ≤ 1.0",
         lambda _: am.method_spec("surgery", base={"name": "ties", "density": 2.0})),
    Case("surgery-no-representation", "Surgery on a binding without features_fn and head_fn", ValueError,
         "method 'surgery' needs the binding's representation: its features_fn and head_fn",
         lambda _: surgery_without_representation()),
    Case("method-twice", "a method listed twice (results are keyed by method)", ValueError,
         "listed more than once: ['ties']", lambda _: am.MergeSettings(["ties", "ties"])),
    Case("demo-config-type", "demo settings: a string where a number belongs", TypeError,
         "DemoConfig.resolution must be an integer, got '48'", lambda _: DemoConfig(resolution="48")),
    Case("demo-config-range", "demo settings: a zero resolution", ValueError, "DemoConfig.resolution",
         lambda _: DemoConfig(resolution=0)),
    Case("cli-negative-steps", "`demo --steps -1`: refused before any work", SystemExit, "steps", demo("--steps", "-1")),
    Case("cli-unknown-method", "`demo --methods magic`: refused before any work", SystemExit,
         "unknown merge method 'magic'", demo("--methods", "magic")),
    Case("cli-output-file", "`demo --output` naming an existing file: refused before any work", SystemExit,
         "exists and is not a folder", demo_output_is_a_file),
    Case("cli-config-key", "`demo --config` with an unknown key", SystemExit, "unknown demo settings ['resolutoin']",
         demo_config_file({"resolutoin": 32})),
    Case("cli-config-adamerging", "`demo --config` with an unknown AdaMerging setting", SystemExit,
         "unknown AdaMerging settings ['step']", demo_config_file({"merge": {"adamerging": {"step": 3}}})),
    Case("cli-config-missing", "`demo --config` naming no file: one line, before any data loads", SystemExit,
         "nowhere.json: No such file or directory",
         lambda tmp: main(["demo", "--config", str(tmp / "nowhere.json"), "--output", str(tmp / "out")])),
    Case("cli-config-not-json", "`demo --config` that is not JSON", SystemExit,
         "c.json is not JSON: Expecting ',' delimiter: line 1 column 18",
         demo_config_file(None, '{"resolution": 3 4}')),
    Case("cli-config-not-object", "`demo --config` holding a JSON list, not an object", SystemExit,
         "must hold one JSON object of DemoConfig fields, got list", demo_config_file([1, 2])),
    Case("cli-one-task", "`demo --tasks mnist`: one task, nothing to merge", SystemExit,
         "the demo merges at least 2 tasks, got ['mnist']", demo("--tasks", "mnist")),
    Case("cli-unknown-task", "`demo --tasks mnist,magic`: a task no package provides", SystemExit,
         "unknown tasks ['magic']", demo("--tasks", "mnist,magic")),
    Case("cli-task-twice", "`demo --tasks mnist,mnist`: one task named twice", SystemExit,
         "a task is named more than once: ['mnist', 'mnist']", demo("--tasks", "mnist,mnist")),
    Case("cli-negative-seed", "`demo --seeds 0 -1`: a negative seed, refused before the first seed runs", SystemExit,
         "--seeds must be non-negative integers, got [-1]", demo("--seeds", "0", "-1")),
    Case("cli-task-folder-missing", "`demo --task-folder pets=PATH` with no folder at PATH", SystemExit,
         "--task-folder pets=", lambda tmp: demo("--task-folder", f"pets={tmp / 'nowhere'}")(tmp)),
    Case("cli-task-folder-form", "`demo --task-folder PATH` without NAME=", SystemExit,
         "--task-folder expects NAME=PATH, got 'pets'", demo("--task-folder", "pets")),
    Case("cli-cache-inside-output", "`demo --cache` inside `--output` (a run replaces the output folder)", SystemExit,
         "/out/cache) is inside --output", lambda tmp: main(["demo", "--quick", "--tasks", "mnist,digits", "--output",
                                                             str(tmp / "out"), "--cache", str(tmp / "out" / "cache")])),
    Case("cli-output-is-task-folder", "`demo --output` equal to a `--task-folder` (plots would become images)",
         SystemExit, "is the --task-folder pets folder",
         lambda tmp: main(["demo", "--quick", "--no-cache", "--task-folder", f"pets={tmp}", "--output", str(tmp)])),
    Case("cli-cache-root-file", "`$ADAMERGING_JAX_CACHE` naming a file, not a folder", SystemExit,
         "the cache folder ($ADAMERGING_JAX_CACHE or --cache)", demo_with_cache_root(a_file)),
    Case("cli-cache-root-under-file", "`$ADAMERGING_JAX_CACHE` below a file (cannot be made)", SystemExit,
         "is not writable", demo_with_cache_root(lambda tmp: a_file(tmp) / "cache")),
    Case("paper-output-in-test-folder", "`paper table1 --output` inside a `--folder` test set", SystemExit,
         "is inside the --folder cars folder",
         paper(folders("cars"), "--folder", "cars={tmp}/cars", "--output", "{tmp}/cars/out")),
    Case("paper-pretrained-inside-output", "`paper table1 --pretrained` inside `--output` (a report replaces it)",
         SystemExit, "/out/clip) is inside --output", paper(folders("out/clip"), "--pretrained", "{tmp}/out/clip",
                                                           "--output", "{tmp}/out")),
    Case("paper-cache-inside-output", "`paper table1 --cache-dir` inside `--output`", SystemExit,
         "/out/heads) is inside --output", paper(folders(), "--cache-dir", "{tmp}/out/heads", "--output", "{tmp}/out")),
    Case("paper-output-foreign-files", "`paper table1 --output` holding a file no experiment writes", SystemExit,
         "holds files a run does not write: ['notes.txt']",
         paper(lambda tmp: [folders("out")(tmp), (tmp / "out" / "notes.txt").write_text("mine")], "--output",
               "{tmp}/out")),
    Case("paper-output-locked", "`paper table1 --output` another live run holds", SystemExit,
         "is being written by another run (pid", paper(held_output, "--output", "{tmp}/out")),
    Case("paper-no-test-data", "`paper table1` with no data for a task: one line, not a traceback", SystemExit,
         "task 'sun397': no test data", paper(folders(), "--output", "{tmp}/out")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(case: Case, tmp_path, capfd):
    try:
        with pytest.raises(case.expected) as error:
            case.run(tmp_path)
    finally:
        while HELD:
            HELD.pop().__exit__(None, None, None)
    message = str(error.value)
    assert case.fragment in message, message
    assert "\n" not in message.strip(), "one line"
    assert_no_traceback(capfd)


def test_cases_are_well_formed():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    assert all(c.description and "\n" not in c.description for c in CASES)
