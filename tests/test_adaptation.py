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
