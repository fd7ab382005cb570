"""Held-out adaptation: the test-time methods adapt on one part of each test split and every method is scored on
the other, so no scored image was adapted on; transductive (the default) adapts on the scored images."""
from __future__ import annotations

import numpy as np
import pytest

import argparse

from adamerging_jax import cli
from adamerging_jax.cli import adaptation_note, demo_config
from adamerging_jax.core.protocol import Adaptation
from adamerging_jax.demo.pipeline import DemoConfig, adaptation_batches, split_test_sets
from test_merge_command import world  # noqa: F401 (a fixture)


def tagged_test_sets(counts: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per task, images whose every pixel is the image's own id (task · 1000 + index), and labels."""
    inputs = [np.full((n, 4, 4, 3), 1000 * t, np.float32) + np.arange(n, dtype=np.float32)[:, None, None, None]
              for t, n in enumerate(counts)]
    return inputs, [np.arange(n) % 3 for n in counts]


def ids(images: np.ndarray) -> set[int]:
    return {int(v) for v in images[:, 0, 0, 0]}


def test_held_out_never_scores_an_image_it_adapted_on():
    """Every image the demo's adaptation batches draw over 200 steps (and the probe) is from the adaptation part;
    none of them is scored; the two parts cover the split, at the given fraction."""
    inputs, labels = tagged_test_sets([40, 31])
    adaptation = Adaptation("held_out", 0.25, seed=3)
    adapt, scored = split_test_sets(adaptation, inputs, labels)
    batches = adaptation_batches(DemoConfig.quick(), adapt)
    for task, x in enumerate(inputs):
        seen = set().union(*(ids(batches(step)[task]) for step in range(200)))
        scored_ids = ids(scored[task][0])
        assert seen == ids(adapt[task]) and not seen & scored_ids
        assert seen | scored_ids == ids(x) and len(seen) == round(0.25 * len(x))
        np.testing.assert_array_equal(scored[task][1], labels[task][np.asarray(sorted(scored_ids)) - 1000 * task])


def test_transductive_adapts_on_the_scored_images():
    inputs, labels = tagged_test_sets([10, 12])
    adapt, scored = split_test_sets(Adaptation(), inputs, labels)
    for task in range(2):
        assert ids(adapt[task]) == ids(scored[task][0]) == ids(inputs[task])


def test_the_split_depends_on_seed_and_task_and_refuses_an_empty_part():
    split = Adaptation("held_out", 0.5, seed=0).split
    assert not np.array_equal(split(20, 0)[0], split(20, 1)[0])
    assert not np.array_equal(split(20, 0)[0], Adaptation("held_out", 0.5, seed=1).split(20, 0)[0])
    with pytest.raises(ValueError, match="task 2: held_out_fraction 0.1 of 4 test images leaves no image to adapt on"):
        Adaptation("held_out", 0.1).split(4, 2)
    for bad in (0.0, 1.0, "half", True):
        with pytest.raises(ValueError, match="held_out_fraction must be a number in \\(0, 1\\)"):
            Adaptation("held_out", bad)
    with pytest.raises(ValueError, match="adaptation must be one of \\['transductive', 'held_out'\\], got 'both'"):
        Adaptation("both")


def demo_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli._demo_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", *flags])


def test_the_demo_flags_set_the_adaptation_and_the_table_reports_it():
    args = demo_args("--quick", "--adaptation", "held_out", "--held-out-fraction", "0.25")
    config = demo_config(args)
    assert config.merge.adaptation == Adaptation("held_out", 0.25)
    settings = config.merge.describe()
    assert settings["adaptation"] == {"mode": "held_out", "fraction": 0.25}
    assert "adapted on 25% of each test split" in adaptation_note(settings)
    assert "transductive" in adaptation_note(demo_config(demo_args("--quick")).merge.describe())
    with pytest.raises(SystemExit, match="held_out_fraction must be a number in \\(0, 1\\), got 1.5"):
        demo_config(demo_args("--adaptation", "held_out", "--held-out-fraction", "1.5"))


@pytest.mark.slow
def test_merge_held_out_adapts_on_part_of_each_test_folder_and_scores_the_rest(world, tmp_path, capsys):
    """``adaptation: held_out`` in a merge config (no unlabeled folders): per task, a quarter of the test folder's
    images is adapted on and the rest scored; every image the adaptation batches yield is one of the adapted
    images and none is a scored one (pixels compared after preprocessing); the run scores only the rest."""
    import json

    import yaml
    from PIL import Image
    from test_merge_command import CLASSES, FIXTURE, STEPS

    from adamerging_jax.cli import main
    from adamerging_jax.data.clip_preprocess import preprocess
    from adamerging_jax.merging.config import load_config
    from adamerging_jax.merging.plan import prepare
    from adamerging_jax.merging.clip_run import adaptation_batches

    rng = np.random.default_rng(7)
    tasks = []
    for task, classes in CLASSES.items():
        for name in classes:
            (tmp_path / "test" / task / name).mkdir(parents=True)
            for i in range(4):
                image = rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / "test" / task / name / f"{i}.png")
        tasks.append({"name": task, "finetuned": str(world / "finetuned" / task), "classes": classes,
                      "templates": ["a photo of a {}."], "test": str(tmp_path / "test" / task)})
    document = {"pretrained": FIXTURE, "tasks": tasks, "methods": ["layer_wise_adamerging"], "devices": 1,
                "adamerging": {"steps": STEPS, "batch_size": 2, "batches_per_task": 1}, "eval_batch_size": 8,
                "adaptation": "held_out", "held_out_fraction": 0.25, "seed": 5}
    path = tmp_path / "held_out.yaml"
    path.write_text(yaml.safe_dump(document))
    plan = prepare(load_config(path), tmp_path / "out", log=lambda _: None)
    size = plan.towers.config.vision.image_size
    read = lambda file: preprocess(np.asarray(Image.open(file).convert("RGB")), size)  # noqa: E731
    batches = adaptation_batches(plan)
    with batches:
        drawn = [np.concatenate([np.reshape(batches(step)[t], (-1, size, size, 3)) for step in range(STEPS)])
                 for t in range(len(tasks))]
    for t, task in enumerate(tasks):
        adapted, scored = plan.unlabeled[t].paths, plan.tests[t].paths
        everything = sorted(str(p) for p in (tmp_path / "test" / task["name"]).rglob("*.png"))
        assert not set(adapted) & set(scored) and sorted(adapted + scored) == everything
        assert len(adapted) == round(0.25 * len(everything))
        adapted_images, scored_images = [read(f) for f in adapted], [read(f) for f in scored]
        for image in drawn[t]:
            assert any(np.array_equal(image, a) for a in adapted_images)
            assert not any(np.array_equal(image, s) for s in scored_images)
    assert main(["merge", str(path), "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["settings"]["adaptation"] == {"mode": "held_out", "fraction": 0.25}
    logged = capsys.readouterr().out
    for t, task in enumerate(tasks):
        assert f"[eval] {task['name']}: {len(plan.tests[t])} examples" in logged


def test_a_source_subset_reads_its_examples_in_order_and_refuses_indices_outside():
    from adamerging_jax.data.pipeline import SourceSubset

    source = [(np.full((2, 2, 3), i, np.uint8), i % 2) for i in range(5)]
    subset = SourceSubset(source, np.array([4, 1]))
    assert len(subset) == 2 and subset[0][1] == 0 and int(subset[1][0][0, 0, 0]) == 1
    with pytest.raises(ValueError, match=r"indices \[5\] outside the source's 5 examples"):
        SourceSubset(source, [0, 5])
