"""The published numbers the experiments are compared with (top-1 accuracy, %).

Transcribed from the AdaMerging paper (Yang et al., ICLR 2024) -- Table 1 (ViT-B/32, 8 tasks), Table 2
(ViT-L/14) and its generalization experiment (merge 6 tasks, test on the 2 unseen), the numbers agreeing with
the official repository's logs and with later papers' reprints (EMR-Merging, WUDI-Merging, StatsMerging) --
and from FusionBench's published tables: its re-runs on its own Hugging Face checkpoints (ViT-B/32 and
ViT-L/14) and its robustness experiment (ViT-B/32, clean and 7 corruptions).  Each table maps method ->
{task or "mean": value}; a number the sources do not give is absent (shown as "–").  "AdaMerging" without
qualifier in the generalization and robustness experiments is the layer-wise one.
"""
from __future__ import annotations

from adamerging_jax.paper.tasks import ALL_TASKS

Reference = dict[str, dict[str, float]]


def _per_task(values: tuple[float, ...], mean: float) -> dict[str, float]:
    return {**dict(zip(ALL_TASKS, values)), "mean": mean}


TABLE1_VIT_B32: Reference = {
    "pretrained": {"mean": 48.0},
    "individual": {"mean": 90.5},
    "weight_average": {"mean": 65.8},
    "task_arithmetic": _per_task((55.2, 54.9, 66.7, 78.9, 80.2, 69.7, 97.3, 50.4), 69.1),
    "ties": _per_task((59.8, 58.6, 70.7, 79.7, 86.2, 72.1, 98.3, 54.2), 72.4),
    "task_wise_adamerging": {"mean": 71.1},
    "task_wise_adamerging++": {"mean": 73.7},
    "layer_wise_adamerging": _per_task((64.5, 68.1, 79.2, 93.8, 87.0, 91.9, 97.5, 59.1), 80.1),
    "layer_wise_adamerging++": _per_task((66.6, 68.3, 82.2, 94.2, 89.6, 89.0, 98.3, 60.6), 81.1),
}
"""AdaMerging Table 1 (ViT-B/32, open_clip task_vectors checkpoints)."""

TABLE2_VIT_L14: Reference = {
    "pretrained": {"mean": 64.5},
    "individual": {"mean": 94.2},
    "weight_average": {"mean": 79.6},
    "task_arithmetic": {"mean": 84.5},
    "ties": {"mean": 86.0},
    "layer_wise_adamerging": {"mean": 90.8},
    "layer_wise_adamerging++": {"mean": 91.0},
}
"""AdaMerging Table 2 (ViT-L/14); the task-wise variants are not reported."""

FUSIONBENCH_VIT_B32: Reference = {
    "task_arithmetic": {"mean": 68.0},
    "ties": {"mean": 72.2},
    "task_wise_adamerging": {"mean": 68.7},
    "layer_wise_adamerging": {"mean": 82.6},
}
"""FusionBench's numbers on its HF checkpoints (tanganke/clip-vit-base-patch32_<task>), the default ones here."""

FUSIONBENCH_VIT_L14: Reference = {"layer_wise_adamerging": {"mean": 91.0}}

GENERALIZATION: dict[str, Reference] = {
    "1": {
        "task_arithmetic": {"mnist": 77.2, "eurosat": 46.2, "mean": 61.7},
        "layer_wise_adamerging": {"mnist": 84.0, "eurosat": 56.1, "mean": 70.0},
    },
    "2": {
        "task_arithmetic": {"resisc45": 52.3, "svhn": 44.9},
        "layer_wise_adamerging": {"resisc45": 50.2, "svhn": 60.9, "mean": 55.5},
    },
}
"""Accuracy on the unseen tasks of the two generalization splits (see ``tasks.GENERALIZATION_SPLITS``)."""

ROBUSTNESS: dict[str, Reference] = {
    condition: {"layer_wise_adamerging": {"mean": ada}, "task_arithmetic": {"mean": ta}}
    for condition, ada, ta in (
        ("clean", 88.5, 77.9),
        ("motion_blur", 81.2, 65.9),
        ("impulse_noise", 68.0, 57.6),
        ("gaussian_noise", 71.4, 59.8),
        ("pixelate", 41.5, 30.0),
        ("spatter", 73.7, 63.3),
        ("contrast", 79.9, 66.0),
        ("jpeg_compression", 80.1, 67.8),
    )
}
"""FusionBench's re-run of the robustness experiment (ViT-B/32), mean over Cars, EuroSAT, RESISC45, GTSRB."""
