#!/usr/bin/env python3
"""Data-free merges of language models, this project beside mergekit, in one run: wall time, peak memory and
exactness of each output.

The benchmark writes its own synthetic bf16 Llama θ0 and K = 3 full fine-tunes θ_k = θ0 + δ_k (δ_k = a shared
part plus the task's own, a tenth of θ0's scale), as Hugging Face folders (config.json, safetensors, a small
tokenizer), then runs each merge as a separate process, one after the other:

    project    adamerging-jax merge CONFIG --output OUT             (model: causal_lm, no prompts: streamed)
    mergekit   mergekit-yaml CONFIG OUT --lazy-unpickle              (from the venv given by --mergekit-python)

and measures each process's wall time and peak resident memory (``ru_maxrss`` of the child, from ``wait4``).
The merges, with the same numbers on both sides:

    task arithmetic   θ = θ0 + 0.3 Σ_k τ_k                   project task_arithmetic; mergekit task_arithmetic,
                                                               weight 0.3
    TIES (per tensor) θ = θ0 + mean_k τ̂_k, top 20% of each τ_k project ties (density 0.2, scope leaf, reduce
                      in each tensor, elected sign Σ_k           mean, scale 1); mergekit ties (density 0.2,
                                                               weight 1, normalize)
    DARE              θ = θ0 + 0.3 Σ_k m_k ⊙ τ_k / (1 − p),    project dare (p 0.9, scale 0.3); mergekit
                      m_k ~ Bernoulli(1 − p), p = 0.9          dare_linear (density 0.1, weight 3, no rescale)

Exactness: every output tensor against the formula computed in float64 from the bf16 inputs. Task
arithmetic and TIES: the distance in bf16 ulps to the formula rounded to bf16 (max, and the share of entries
more than one ulp away), the largest absolute error and the largest relative error. TIES's formula is the
project's definition (keep |τ_k| at or above its (⌊0.2 n⌋ + 1)-th largest; entries whose elected sign is 0 take
the model's majority sign); mergekit keeps ⌊0.2 n⌋ entries and gives sign 0 to +, so a few entries differ by
definition. DARE's masks are random: each entry is compared with the closest of the 2^K values θ0 + 0.3 Σ_k
m_k τ_k / 0.1, m ∈ {0, 1}^K, and the share of kept task-vector entries (≈ 1 − p) is reported.

``--size 2b`` makes a ≈2B-parameter model and 3 fine-tunes (16 GB of bf16 inputs) and merges it with the project
only, task arithmetic and global TIES (scope model, density 0.2, the method's defaults otherwise), to show a merge
whose inputs do not fit in memory (the machine's 24 GiB shared) staying under 4 GB; task arithmetic is checked
against the float64 formula. The models are deleted afterwards unless ``--keep``.

    python benchmarks/lm_merge_benchmark.py --mergekit-python /path/to/mergekit-venv/bin/python \\
        --sizes small,0.3b --out benchmarks/results/lm_merge.json
    python benchmarks/lm_merge_benchmark.py --size 2b --workdir /big/disk --out benchmarks/results/lm_merge_2b.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adamerging_jax.models.llama import LlamaConfig  # noqa: E402
from adamerging_jax.models.llama_checkpoint import hf_config, hf_tensor_shapes  # noqa: E402
from adamerging_jax.models.safetensors_stream import CheckpointFiles, ShardedWriter  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
K = 3
SIZES = {  # vocabulary, hidden, MLP, layers, heads, KV heads
    "small": (8000, 512, 1408, 4, 8, 4),
    "0.3b": (32000, 1024, 2816, 20, 16, 8),
    "2b": (32000, 2048, 5632, 40, 16, 8),
}
MERGES = {
    "task_arithmetic": ({"name": "task_arithmetic", "scale": 0.3},
                        {"merge_method": "task_arithmetic", "weight": 0.3, "parameters": {}}),
    "ties": ({"name": "ties", "density": 0.2, "scope": "leaf", "reduce": "mean", "scale": 1.0},
             {"merge_method": "ties", "weight": 1.0, "parameters": {"density": 0.2, "normalize": True}}),
    "dare": ({"name": "dare", "p": 0.9, "seed": 0, "scale": 0.3},
             {"merge_method": "dare_linear", "weight": 3.0, "parameters": {"density": 0.1, "rescale": False}}),
}
GLOBAL_MERGES = {"task_arithmetic": {"name": "task_arithmetic", "scale": 0.3}, "global_ties": {"name": "ties"}}


def llama_config(size: str) -> LlamaConfig:
    vocab, hidden, mlp, layers, heads, kv = SIZES[size]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads)


# ------------------------------------------------------------------------------------------------- models


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of a few words (the merge copies the tokenizer files; nothing is tokenized)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "the", "a", "merge"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def make_models(size: str, root: Path, seed: int = 0) -> dict[str, Path]:
    """θ0 and K fine-tunes of ``size`` in bf16, written tensor by tensor; their folders by name."""
    config = llama_config(size)
    shapes = hf_tensor_shapes(config)
    folders = {name: root / name for name in ["base", *(f"ft{k}" for k in range(K))]}
    writers = {}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(hf_config(config, [BF16]), indent=2))
        writers[name] = ShardedWriter(folder, {n: (BF16, shapes[n]) for n in sorted(shapes)}, 2 * 2**30)
    write_tokenizer(folders["base"])
    rng = np.random.default_rng(seed)
    for tensor in sorted(shapes):
        shape = shapes[tensor]
        theta0 = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if tensor.endswith("norm.weight"):
            theta0 += 1.0
        writers["base"].write(tensor, theta0.astype(BF16))
        shared = rng.standard_normal(shape, dtype=np.float32) * 0.001
        for k in range(K):
            delta = shared + rng.standard_normal(shape, dtype=np.float32) * 0.002
            writers[f"ft{k}"].write(tensor, (theta0 + delta).astype(BF16))
    for writer in writers.values():
        writer.close()
    return folders


# ------------------------------------------------------------------------------------------------ the runs


WRAPPER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - started,
                  "maxrss_kb": usage.ru_maxrss}))
"""


def measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` (output to ``log``); its wall time and peak RSS (the child's ru_maxrss, from wait4). A
    small wrapper process starts it: a child started straight from this process would inherit this
    process's peak as its own floor (Linux carries the peak RSS of the process image that exec replaces)."""
    result = json.loads(subprocess.run([sys.executable, "-c", WRAPPER, str(log), *command], check=True,
                                       capture_output=True, text=True).stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{command[0]} exited with {result['code']}; see {log}:\n" + log.read_text()[-3000:])
    return {"wall_s": round(result["wall_s"], 2), "peak_rss_gb": round(result["maxrss_kb"] * 1024 / 1e9, 3)}


def run_project(method: dict[str, Any], folders: dict[str, Path], out: Path) -> dict[str, Any]:
    config = {"model": "causal_lm", "pretrained": str(folders["base"]), "methods": [method],
              "tasks": [{"name": f"t{k}", "finetuned": str(folders[f"ft{k}"])} for k in range(K)]}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-c", "import sys; from adamerging_jax.cli import main; sys.exit(main())",
               "merge", str(path), "--output", str(out)]
    return {**measured(command, out.with_suffix(".log")), "model": str(out / "model")}


def run_mergekit(python: str, merge: dict[str, Any], folders: dict[str, Path], out: Path) -> dict[str, Any]:
    config = {"merge_method": merge["merge_method"], "base_model": str(folders["base"]), "dtype": "bfloat16",
              "models": [{"model": str(folders[f"ft{k}"]), "parameters": {"weight": merge["weight"]}}
                         for k in range(K)],
              "parameters": merge["parameters"]}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    script = Path(python).parent / "mergekit-yaml"
    command = [str(script), str(path), str(out), "--lazy-unpickle", "--random-seed", "0", "--quiet"]
    return {**measured(command, out.with_suffix(".log")), "model": str(out)}


# ------------------------------------------------------------------------------------------------ exactness


def ordinal(values: np.ndarray) -> np.ndarray:
    """bf16 values as integers in their order: adjacent bf16 numbers differ by 1."""
    bits = np.asarray(values, BF16).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


class Errors:
    """Running error statistics of an output against a float64 formula θ0 + u. Entries where θ0 and u cancel
    to below 2⁻¹⁶ of their size, or to 0 (the formula's value there lies below the bf16 inputs' own precision,
    and one float32 rounding anywhere shows as thousands of bf16 ulps of a near-zero number), are counted
    apart: the ulp and relative figures skip them, the error relative to |θ0| + |u| covers every entry."""

    def __init__(self) -> None:
        self.max_ulps, self.over_one, self.count, self.cancelled = 0, 0, 0, 0
        self.max_abs, self.max_rel, self.max_rel_terms = 0.0, 0.0, 0.0

    def add(self, output: np.ndarray, theta0: np.ndarray, update: np.ndarray) -> None:
        formula = theta0 + update
        terms = np.abs(theta0) + np.abs(update)
        error = np.abs(output.astype(np.float64) - formula)
        kept = (np.abs(formula) >= 2.0**-16 * terms) & (formula != 0)
        ulps = np.abs(ordinal(output[kept]) - ordinal(formula[kept].astype(BF16)))
        self.cancelled += int((~kept).sum())
        self.count += int(kept.sum())
        if ulps.size:
            self.max_ulps = max(self.max_ulps, int(ulps.max()))
            self.over_one += int((ulps > 1).sum())
            self.max_rel = max(self.max_rel, float((error[kept] / np.abs(formula[kept])).max()))
        self.max_abs = max(self.max_abs, float(error.max()))
        nonzero = terms > 0
        self.max_rel_terms = max(self.max_rel_terms, float((error[nonzero] / terms[nonzero]).max(initial=0.0)))

    def result(self) -> dict[str, Any]:
        return {"max_ulps": self.max_ulps, "share_over_1_ulp": self.over_one / max(self.count, 1),
                "cancelled_entries": self.cancelled, "max_abs_error": self.max_abs, "max_rel_error": self.max_rel,
                "max_error_over_terms": self.max_rel_terms}


def ties_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Each row of τ [K, n] kept where |τ| ≥ its (⌊density n⌋ + 1)-th largest magnitude."""
    rank = int(tau.shape[1] * density) + 1
    if rank > tau.shape[1]:
        return tau
    threshold = -np.partition(-np.abs(tau), rank - 1, axis=1)[:, rank - 1:rank]
    return np.where(np.abs(tau) >= threshold, tau, 0.0)


def check(method: str, folders: dict[str, Path], outputs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each output's errors against the float64 formula of ``method`` (module docstring)."""
    base = CheckpointFiles(folders["base"])
    finetuned = [CheckpointFiles(folders[f"ft{k}"]) for k in range(K)]
    written = {tool: CheckpointFiles(path) for tool, path in outputs.items()}
    errors = {tool: Errors() for tool in outputs}
    dtypes = {tool: sorted({files.info(n).dtype.name for n in files.names}) for tool, files in written.items()}
    majority = 0.0
    if method == "ties":  # the model-wide majority sign, for the entries whose elected sign is 0
        for name in base.names:
            theta0 = base.read(name).astype(np.float64).reshape(-1)
            tau = ties_trim(np.stack([f.read(name).astype(np.float64).reshape(-1) - theta0 for f in finetuned]), 0.2)
            majority += float(np.sign(tau.sum(axis=0)).sum())
        majority = float(np.sign(majority))
    kept, entries = 0, 0
    masks = np.array([[(m >> k) & 1 for k in range(K)] for m in range(2 ** K)], np.float64)
    for name in base.names:
        theta0_all = base.read(name).reshape(-1)
        thetas = [f.read(name).reshape(-1) for f in finetuned]
        outs_all = {tool: files.read(name).astype(BF16).reshape(-1) for tool, files in written.items()}
        step = theta0_all.size if method == "ties" else 1 << 21  # TIES trims over the whole tensor
        for start in range(0, theta0_all.size, step):
            part = slice(start, start + step)
            theta0 = theta0_all[part].astype(np.float64)
            tau = np.stack([t[part].astype(np.float64) - theta0 for t in thetas])
            outs = {tool: out[part] for tool, out in outs_all.items()}
            if method == "task_arithmetic":
                updates = dict.fromkeys(outs, 0.3 * tau.sum(axis=0))
            elif method == "ties":
                trimmed = ties_trim(tau, 0.2)
                sign = np.sign(trimmed.sum(axis=0))
                sign[sign == 0] = majority
                agreeing = np.where(np.sign(trimmed) == sign, trimmed, 0.0)
                updates = dict.fromkeys(outs, agreeing.sum(axis=0) / np.maximum((agreeing != 0).sum(axis=0), 1))
            else:  # DARE: the closest of the 2^K mask combinations
                candidates = 0.3 / 0.1 * (masks @ tau)  # [2^K, n]
                updates = {}
                for tool, out in outs.items():
                    best = np.abs(theta0 + candidates - out.astype(np.float64)).argmin(axis=0)
                    updates[tool] = candidates[best, np.arange(best.size)]
                    if tool == "project":
                        kept += int((masks[best] * (tau.T != 0)).sum())
                        entries += int((tau != 0).sum())
            for tool, out in outs.items():
                errors[tool].add(out, theta0, updates[tool])
    report = {tool: {**errors[tool].result(), "dtypes": dtypes[tool]} for tool in outputs}
    if method == "dare":
        report["project"]["kept_share"] = kept / max(entries, 1)
    return report


def check_task_arithmetic_chunked(folders: dict[str, Path], output: str, chunk: int = 1 << 22) -> dict[str, Any]:
    """Task arithmetic's errors row block by row block (for models whose tensors are large)."""
    base = CheckpointFiles(folders["base"])
    finetuned = [CheckpointFiles(folders[f"ft{k}"]) for k in range(K)]
    written = CheckpointFiles(output)
    errors = Errors()
    for name in base.names:
        theta0, out = base.read(name).reshape(-1), written.read(name).reshape(-1)
        thetas = [f.read(name).reshape(-1) for f in finetuned]
        for start in range(0, theta0.size, chunk):
            part = slice(start, start + chunk)
            t0 = theta0[part].astype(np.float64)
            errors.add(out[part].astype(BF16), t0, 0.3 * sum(t[part].astype(np.float64) - t0 for t in thetas))
    return errors.result()


# ------------------------------------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    import jax

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "load_average": os.getloadavg()}


def compare(size: str, workdir: Path, mergekit_python: str, methods: list[str], log) -> dict[str, Any]:
    root = workdir / size
    started = time.perf_counter()
    folders = make_models(size, root / "models")
    params = sum(int(np.prod(CheckpointFiles(folders["base"]).info(n).shape)) for n in
                 CheckpointFiles(folders["base"]).names)
    log(f"[{size}] {params / 1e9:.3f}B parameters, θ0 + {K} fine-tunes written in "
        f"{time.perf_counter() - started:.0f} s")
    results: dict[str, Any] = {"parameters": params, "merges": {}}
    for method in methods:
        ours, theirs = MERGES[method]
        run = {"project": run_project(ours, folders, root / f"project_{method}"),
               "mergekit": run_mergekit(mergekit_python, theirs, folders, root / f"mergekit_{method}")}
        exactness = check(method, folders, {tool: run[tool]["model"] for tool in run})
        for tool in run:
            run[tool].update(exactness[tool])
        results["merges"][method] = run
        shutil.rmtree(root / f"project_{method}")
        shutil.rmtree(root / f"mergekit_{method}")
        log(f"[{size}] {method}: " + "; ".join(
            f"{tool} {r['wall_s']} s, {r['peak_rss_gb']} GB, {r['dtypes']}, max {r['max_ulps']} ulp, "
            f"{100 * r['share_over_1_ulp']:.4f}% > 1 ulp, max rel {r['max_rel_error']:.3g}, "
            f"{r['cancelled_entries']} cancelled" for tool, r in run.items()))
    run = run_project(GLOBAL_MERGES["global_ties"], folders, root / "project_global_ties")
    results["merges"]["global_ties"] = {"project": run}
    log(f"[{size}] global TIES (project only): {run['wall_s']} s, {run['peak_rss_gb']} GB")
    shutil.rmtree(root)
    return results


def large(workdir: Path, keep: bool, log) -> dict[str, Any]:
    root = workdir / "2b"
    started = time.perf_counter()
    folders = make_models("2b", root / "models")
    base = CheckpointFiles(folders["base"])
    params = sum(int(np.prod(base.info(n).shape)) for n in base.names)
    inputs = sum(f.stat().st_size for folder in folders.values() for f in folder.glob("*.safetensors"))
    log(f"[2b] {params / 1e9:.3f}B parameters, {inputs / 1e9:.1f} GB of inputs written in "
        f"{time.perf_counter() - started:.0f} s")
    results: dict[str, Any] = {"parameters": params, "input_bytes": inputs, "merges": {}}
    for name, method in GLOBAL_MERGES.items():
        run = run_project(method, folders, root / f"project_{name}")
        if name == "task_arithmetic":
            run.update(check_task_arithmetic_chunked(folders, run["model"]))
        results["merges"][name] = run
        log(f"[2b] {name}: {json.dumps(run)}")
        shutil.rmtree(root / f"project_{name}")
    if not keep:
        shutil.rmtree(root)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,0.3b", help="comma-separated sizes compared with mergekit")
    parser.add_argument("--size", choices=["2b"], help="instead: the ≈2B model, project only (module docstring)")
    parser.add_argument("--methods", default="task_arithmetic,ties,dare")
    parser.add_argument("--mergekit-python", help="the python of a venv with mergekit (mergekit-yaml beside it)")
    parser.add_argument("--workdir", type=Path, help="where models and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the 2b models")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lm_merge_benchmark_"))
    log = lambda line: print(line, flush=True)  # noqa: E731
    result: dict[str, Any] = {"machine": machine(), "tasks": K}
    if args.size == "2b":
        result["2b"] = large(workdir, args.keep, log)
    else:
        if not args.mergekit_python:
            parser.error("--mergekit-python is required for the comparison with mergekit")
        methods = args.methods.split(",")
        result["sizes"] = {size: compare(size, workdir, args.mergekit_python, methods, log)
                           for size in args.sizes.split(",")}
    result["machine"]["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
