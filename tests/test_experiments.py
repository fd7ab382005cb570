"""The paper's experiment commands end to end on tiny CLIP checkpoints and tiny datasets.

θ0 is the committed tiny HF CLIP fixture ("Ti/8", 32 px, with text tower and tokenizer); each task's
"fine-tuned" tower is θ0's perturbed and written as an HF CLIPVisionModel with the project's own
``save_hf_vision_model``.  Test sets are class folders (one folder per class of the task's head, as the real
sets have) or, for MNIST in the generalization run, a tiny tfds ArrayRecord dataset prepared by the
``prepare_data`` command.  Accuracies in the JSON are checked against an independent computation: the merge
written out in numpy, the images preprocessed one by one, and the core's ``evaluate``.
"""
import functools
import gzip
import json
import os
import runpy
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import adamerging_jax as am
from adamerging_jax.data.clip_preprocess import preprocess
from adamerging_jax.data.folder import FolderImages
from adamerging_jax.heads import zero_shot
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import load_hf_clip, save_hf_vision_model
from adamerging_jax.paper import published
from adamerging_jax.paper.tasks import ALL_TASKS, ROBUSTNESS_TASKS, TASKS

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "clip", "ti8")
EXPERIMENTS = os.path.join(ROOT, "experiments")
STEPS, BATCH = 2, 4


def num_classes(task):
    return len(zero_shot.task_prompts(TASKS[task].head)[0])


def varied_image(rng, size):
    """A colour gradient with a bright block and noise: random CLIP towers then predict varied classes."""
    height, width = size
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-200, 200, 3) + rng.uniform(0, 255, 3)
    image = np.broadcast_to(ramp, (height, width, 3)).copy()
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top: top + height // 3, left: left + width // 3] = 255 * rng.uniform(size=3)
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fine-tuned towers for the 8 tasks, a class-folder test set per task, a shared heads cache."""
    root = tmp_path_factory.mktemp("paper")
    config, params = load_hf_clip(FIXTURE)
    rng = np.random.default_rng(0)
    for task in ALL_TASKS:
        tower = jax.tree_util.tree_map(
            lambda a: np.asarray(a) + 0.5 * np.std(a) * rng.standard_normal(np.shape(a)).astype(np.float32),
            params["vision"])
        save_hf_vision_model(str(root / "finetuned" / TASKS[task].head), tower, config)
        for c in range(num_classes(task)):
            folder = root / "data" / task / "test" / f"class{c:03d}"
            folder.mkdir(parents=True)
            Image.fromarray(varied_image(rng, (20 + c % 7, 24))).save(folder / "0.png")
    return root


def common_args(world, output, tasks=ALL_TASKS):
    args = ["--pretrained", FIXTURE, "--finetuned", str(world / "finetuned" / "{task}"),
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--eval-batch-size", "64", "--num-threads", "2",
            "--devices", "1",
            "--output", str(output), "--cache-dir", str(world / "cache"), "--quiet"]
    for task in tasks:
        args += ["--folder", f"{task}={world / 'data' / task / 'test'}"]
    return args


def run_command(script, argv):
    """``python experiments/<script> argv`` in this process (the thin command, as a user runs it)."""
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(EXPERIMENTS, script), run_name="__main__")
    finally:
        sys.argv = saved
    assert exit_info.value.code == 0


def load_tower(path):
    return jax.tree_util.tree_map(np.asarray, load_hf_clip(str(path))[1]["vision"])


@functools.cache
def head_of(task):
    config, full = load_hf_clip(FIXTURE)
    return zero_shot.clip_zero_shot_head(full, config, zero_shot.load_tokenizer(FIXTURE),
                                         *zero_shot.task_prompts(TASKS[task].head))


def independent_accuracy(vision, task, test_folder, corrupt_fn=None):
    """Accuracy of image tower ``vision`` on a class folder: per-image preprocessing, the tower with the
    pretrained projection, the zero-shot head, the core's ``evaluate``."""
    config, full = load_hf_clip(FIXTURE)
    head = head_of(task)
    source = FolderImages(os.path.dirname(test_folder), os.path.basename(test_folder))
    images = []
    for i in range(len(source)):
        image = source[i][0]
        images.append(preprocess(corrupt_fn(image, i) if corrupt_fn else image, 32))
    labels = np.array([label for _, label in source.samples])
    encode = clip.image_encoder(config, full["visual_projection"]["kernel"])
    apply_fn = lambda p, x, t: zero_shot.zero_shot_logits(encode(p, x), head)
    return am.evaluate(apply_fn, vision, [(np.stack(images), labels)], [task], batch_size=64).per_task[task]


@pytest.fixture(scope="module")
def table1(world):
    output = world / "table1"
    run_command("table1_vit_b32.py", common_args(world, output))
    return output, json.loads((output / "results.json").read_text())


def test_table1_writes_every_method_on_every_task(table1):
    _, result = table1
    assert result["tasks"] == list(ALL_TASKS) and result["merged_tasks"] == list(ALL_TASKS)
    assert set(result["methods"]) == set(published.TABLE1_VIT_B32)
    for method, record in result["methods"].items():
        assert set(record["accuracy"]) == set(ALL_TASKS), method
        assert record["mean"] == pytest.approx(np.mean(list(record["accuracy"].values())))
    assert result["settings"]["merge"]["adamerging"]["steps"] == STEPS


def test_table1_accuracies_match_an_independent_computation(table1, world):
    """pretrained, individual and task arithmetic: θ in numpy from the checkpoint files, evaluated per image."""
    _, result = table1
    pretrained = load_tower(FIXTURE)
    finetuned = [load_tower(world / "finetuned" / TASKS[t].head) for t in ALL_TASKS]
    arithmetic = jax.tree_util.tree_map(lambda p, *f: p + 0.3 * sum(x - p for x in f), pretrained, *finetuned)
    for task in ["sun397", "mnist"]:
        folder = str(world / "data" / task / "test")
        k = ALL_TASKS.index(task)
        assert result["methods"]["pretrained"]["accuracy"][task] == independent_accuracy(pretrained, task, folder)
        assert result["methods"]["individual"]["accuracy"][task] == independent_accuracy(finetuned[k], task, folder)
        assert result["methods"]["task_arithmetic"]["accuracy"][task] == independent_accuracy(arithmetic, task, folder)


def test_table1_layer_wise_adamerging_learned_lambda_and_its_model_is_the_one_evaluated(table1, world):
    _, result = table1
    record = result["methods"]["layer_wise_adamerging"]
    assert len(record["entropy"]) == STEPS
    lam = {path: np.asarray(value) for path, value in record["coefficients"].items()}
    layers = clip.get_config("Ti/8").vision.layers
    assert lam["layers/attn/q/kernel"].shape == (len(ALL_TASKS), layers)  # one λ per tensor per layer
    assert lam["class_embedding"].shape == (len(ALL_TASKS),)
    moved = np.abs(np.concatenate([v.ravel() for v in lam.values()]) - 0.3)
    assert moved.max() > 1e-4 and moved.max() <= STEPS * 1e-3 * 1.01  # Adam moves at most lr per step
    pretrained = load_tower(FIXTURE)
    finetuned = [load_tower(world / "finetuned" / TASKS[t].head) for t in ALL_TASKS]
    paths = [am.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(pretrained)[0]]
    leaves = jax.tree_util.tree_leaves(pretrained)
    merged_leaves = []
    for path, p, *f in zip(paths, leaves, *[jax.tree_util.tree_leaves(t) for t in finetuned]):
        c = np.clip(lam[path], 0.0, 1.0)  # the official preset clamps λ to [0, 1]
        merged_leaves.append(p + sum(c[k].reshape(c[k].shape + (1,) * (p.ndim - c[k].ndim)) * (x - p)
                                     for k, x in enumerate(f)))
    merged = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pretrained), merged_leaves)
    for task in ("dtd", "eurosat"):  # on DTD layer-wise AdaMerging differs from task arithmetic here
        assert record["accuracy"][task] == independent_accuracy(merged, task, str(world / "data" / task / "test"))


def test_table1_markdown_is_laid_out_like_the_paper_with_its_numbers(table1):
    output, result = table1
    lines = (output / "table.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert header == "| Method | SUN397 | Cars | RESISC45 | EuroSAT | SVHN | GTSRB | MNIST | DTD | Avg. |"
    start = lines.index(header)
    rows = lines[start + 2: start + 2 + 9]
    assert next(row.split(" | ")[0] for row in rows) == "| Pretrained (frozen head)"
    layer_wise = next(row for row in rows if row.startswith("| Layer-wise AdaMerging |"))
    cells = [c.strip() for c in layer_wise.strip("|").split("|")]
    ours = 100 * result["methods"]["layer_wise_adamerging"]["accuracy"]["sun397"]
    assert cells[1] == f"{ours:.1f} (64.5)"
    assert cells[-1] == f"{100 * result['methods']['layer_wise_adamerging']['mean']:.1f} (80.1)"
    weight_average = next(row for row in rows if row.startswith("| Weight averaging |"))
    assert weight_average.rstrip(" |").endswith("(65.8)") and "(" not in weight_average.split("|")[2]
    assert any(line.startswith("| Layer-wise AdaMerging |") and line.rstrip(" |").endswith("| 80.1 | 82.6")
               for line in lines)  # the averages table: ours | paper | FusionBench


def write_tiny_mnist(downloads, rng, labels):
    for prefix, n in (("train", 5), ("t10k", len(labels))):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        header = b"\0\0\x08\x03" + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (downloads / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        y = np.array(labels if prefix == "t10k" else [1, 2, 3, 4, 5], np.uint8)
        header = b"\0\0\x08\x01" + n.to_bytes(4, "big")
        (downloads / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + y.tobytes()))


def test_generalization_merges_the_seen_tasks_and_tests_the_unseen_ones(world, tmp_path, monkeypatch):
    """Split 1; MNIST (unseen) from a tfds ArrayRecord dataset made by the prepare_data command."""
    from tensorflow_datasets.image_classification import mnist

    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", 5)
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", 6)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    write_tiny_mnist(downloads, np.random.default_rng(1), [0, 3, 9, 9, 2, 7])
    run_command("prepare_data.py", ["--data-dir", str(tmp_path / "tfds"), "--tasks", "mnist",
                                    "--local-downloads", str(downloads), "--download-dir", str(tmp_path / "dl"),
                                    "--offline"])
    output = tmp_path / "generalization"
    seen_and_eurosat = ["sun397", "cars", "resisc45", "dtd", "svhn", "gtsrb", "eurosat"]
    run_command("generalization.py", common_args(world, output, seen_and_eurosat) + [
        "--split", "1", "--tfds-dir", str(tmp_path / "tfds"), "--methods", "task_arithmetic,layer_wise_adamerging"])
    result = json.loads((output / "results.json").read_text())["splits"]["1"]
    assert result["merged_tasks"] == ["sun397", "cars", "resisc45", "dtd", "svhn", "gtsrb"]
    assert result["tasks"] == result["merged_tasks"] + ["mnist", "eurosat"]
    lam = result["methods"]["layer_wise_adamerging"]["coefficients"]["class_embedding"]
    assert len(lam) == 6  # λ for the 6 merged tasks only
    for method in ("task_arithmetic", "layer_wise_adamerging"):
        assert set(result["methods"][method]["accuracy"]) == set(result["tasks"])
        assert result["methods"][method]["accuracy"]["mnist"] in {i / 6 for i in range(7)}  # the 6 tfds images
    table = (output / "table.md").read_text()
    assert "### Unseen tasks" in table and "| Method | MNIST | EuroSAT | Avg. |" in table
    unseen_row = next(line for line in table.split("### Unseen tasks")[1].splitlines()
                      if line.startswith("| Layer-wise AdaMerging |"))
    assert unseen_row.endswith(" (70.0) |") and "(84.0)" in unseen_row


def test_robustness_adapts_and_evaluates_on_the_corrupted_test_sets(world, tmp_path):
    from adamerging_jax.data.clip_preprocess import resize_crop
    from adamerging_jax.data.corruptions import corrupt

    output = tmp_path / "robustness"
    tasks = ["cars", "eurosat", "resisc45", "gtsrb"]
    run_command("robustness.py", common_args(world, output, tasks) + [
        "--conditions", "clean,pixelate", "--severity", "1", "--corruption-size", "32"])
    result = json.loads((output / "results.json").read_text())
    assert list(result["conditions"]) == ["clean", "pixelate"] and result["tasks"] == tasks
    for run in result["conditions"].values():
        assert set(run["methods"]) == {"task_arithmetic", "layer_wise_adamerging"}
        assert len(run["methods"]["layer_wise_adamerging"]["coefficients"]["class_embedding"]) == 4
    pretrained = load_tower(FIXTURE)
    finetuned = [load_tower(world / "finetuned" / TASKS[t].head) for t in tasks]
    arithmetic = jax.tree_util.tree_map(lambda p, *f: p + 0.3 * sum(x - p for x in f), pretrained, *finetuned)
    task = "gtsrb"
    expected = independent_accuracy(arithmetic, task, str(world / "data" / task / "test"),
                                    corrupt_fn=lambda image, i: corrupt(resize_crop(image, 32), "pixelate", 1,
                                                                        np.random.default_rng([0, i])))
    assert result["conditions"]["pixelate"]["methods"]["task_arithmetic"]["accuracy"][task] == expected
    table = (output / "table.md").read_text()
    assert "### Clean test sets" in table and "### Pixelate" in table
    pixelate = table.split("### Pixelate")[1]
    assert "| Method | Cars | EuroSAT | RESISC45 | GTSRB | Avg. |" in pixelate
    assert next(l for l in pixelate.splitlines() if l.startswith("| Task arithmetic |")).endswith(" (30.0) |")


def test_robustness_runs_surgery_through_the_paper_s_clip_binding(world, tmp_path):
    """``--methods layer_wise_adamerging,surgery``: Surgery runs on the paper's CLIP (the normalised image
    embedding and the zero-shot heads) over its default base, layer-wise AdaMerging, learned again with the same
    seed and so the same λ; after STEPS Adam steps from W_up = 0 the modules have barely moved, so each task's
    predictions are its base model's."""
    output = tmp_path / "surgery"
    tasks = list(ROBUSTNESS_TASKS)
    run_command("robustness.py", common_args(world, output, tasks) + [
        "--conditions", "clean", "--methods", "layer_wise_adamerging,surgery"])
    methods = json.loads((output / "results.json").read_text())["conditions"]["clean"]["methods"]
    surgery, base = methods["surgery"], methods["layer_wise_adamerging"]
    assert surgery["coefficients"] == base["coefficients"] and base["loss"]
    assert surgery["loss"] is None  # the base's entropy is not Surgery's loss
    assert set(surgery["accuracy"]) == set(tasks) and surgery["accuracy"] == base["accuracy"]
    assert (output / "adamerging_state" / "clean" / "surgery" / "surgery").is_dir()  # the modules' resumable state
    assert "| Representation Surgery |" in (output / "table.md").read_text()
