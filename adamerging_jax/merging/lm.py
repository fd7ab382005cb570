"""The causal-LM side of ``adamerging-jax merge`` (``model: causal_lm``): Llama / Qwen2 checkpoints and
PEFT LoRA adapters in, a merged Hugging Face causal LM, named λ and an entropy report out.

Task vectors (Ilharco et al., ICLR 2023; a LoRA adapter's as in ``models.lora``):

    τ_k = θ_k − θ0                    for a full fine-tuned folder (same architecture as θ0)
    τ_k = s (B A)ᵀ on adapted kernels  for an adapter (0 elsewhere); ``factored: true`` keeps (A, B, s)

and θ = θ0 + Σ_k clamp(λ_k) τ_k with λ learned by AdaMerging (Yang et al., ICLR 2024) on each task's unlabeled
prompts: the mask-weighted mean next-token entropy, or with ``candidates`` the entropy over the candidate
answers' tokens at the prompt's last position (`merging.lm_binding.causal_lm_binding`).

Checked before any compute (`prepare_lm`, each failure one line naming the task, file or field): θ0 loads;
every fine-tuned folder has θ0's architecture and loads (every tensor's shape); every adapter reads and each
adapted module fits θ0's kernel; the tokenizer in θ0's folder loads; every prompt file reads, is non-empty
and tokenizes to ids inside the model's vocabulary; every candidate answer is one token; the mesh fits the
devices and splits the batches. When θ0 and τ are sharded (an ``fsdp`` mesh, or ``shard_task_vectors``) they are
read from disk slice by slice straight into their shards (`read_language_models`, `models.sharded_reads`): loading
never holds the whole θ0 or τ on the host (the export still gathers the merged model). `run_lm_plan` then writes

    OUT/model/               the exported method's model (save_hf_causal_lm: config.json, safetensors, the
                             tokenizer files) and the model card README.md
    OUT/lambdas.json         λ by HF tensor name → one value per task (adaptive methods or --weights)
    OUT/lambdas.safetensors  the same, tensor name → float32 [K]
    OUT/results.json, table.md, *.png   per method the prompts' entropy per task (θ0's as a reference row),
                             AdaMerging's entropy per step and its λ
    OUT/state/<method>/      AdaMerging's resumable state; a rerun with other settings, prompts or τ is refused

The prompts' identity in that state is `PromptBatches.fingerprint`: a digest of every tokenized prompt and of
the sampler's settings.

A run whose exported method streams (`core.registry.MergeMethod.streaming`: task arithmetic, weight
averaging, TIES, DARE, MagMax, TSV-M, Iso-C, Iso-CTS, WUDI), with no method that learns from data, no prompts
and no ``--weights`` (`streaming.streams`, the rule every family shares), loads nothing:
`prepare_lm` checks every checkpoint's tensor names, shapes and dtypes from the file headers (and that θ0's
folder holds a tokenizer's files, copied to the export; nothing is tokenized), and
`run_lm_plan` merges tensor by tensor from disk to ``OUT/model`` (`merging.streaming`), in memory a few
copies of the largest tensor. Only the exported method is built (without prompts the others would have no
output). The merged model's tensors keep θ0's dtype (bf16 in, bf16 out), or take the config's ``dtype``;
sums run in float32 (float64 for float64 inputs) either way. Either way the whole output (model, λ, report)
is built in a hidden sibling folder and swapped in at once (`adamerging_jax.output.staged_output`), so a
run killed while writing leaves the previous result (or none); the next run removes what the killed one left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import adamerging_jax as am
from adamerging_jax.core.checkpoint import write_atomic, write_json_atomic
from adamerging_jax.core.objective import task_entropy
from adamerging_jax.core.optimize import shards_frozen
from adamerging_jax.core.protocol import build_models, records_json
from adamerging_jax.core.registry import Merged
from adamerging_jax.data.text import (
    TextBatches,
    bucket_lengths,
    load_tokenizer,
    pad_id_of,
    read_prompts,
    tokenize_prompts,
)
from adamerging_jax.merging.card import lm_model_card
from adamerging_jax.merging.schema import MergeConfig, TaskConfig
from adamerging_jax.merging.lm_binding import causal_lm_binding
from adamerging_jax.merging.streaming import STREAMED, TaskTensors, TensorStream, binding_placement, streams
from adamerging_jax.merging.errors import MergeError
from adamerging_jax.merging.checked_run import CheckedRun, guarded, run_mesh
from adamerging_jax.merging.exports import (
    check_exported_finite,
    spec_with_coefficients,
    write_coefficients,
    write_report,
    write_streamed,
)
from adamerging_jax.models.llama import LlamaConfig, Params
from adamerging_jax.models.hf_files import tokenizer_files
from adamerging_jax.models.llama_checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    hf_config,
    hf_name,
    hf_tensor_shapes,
    leaf_shapes,
    load_hf_causal_lm,
    open_hf_causal_lm,
    read_config,
    save_hf_causal_lm,
)
from adamerging_jax.models.safetensors_stream import CheckpointFiles
from adamerging_jax.models.sharded_reads import (
    SliceReader,
    leaf_shape_tree,
    place_factored,
    read_pretrained,
    read_task_vectors,
)
from adamerging_jax.output import committed_paths, staged_output
from adamerging_jax.models.lora import (
    LoraAdapter,
    factored_task_vectors,
    lora_factors,
    lora_task_vector,
    read_lora_adapter,
)

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class LanguageModels:
    """θ0 and its config, the stacked task vectors ``[K, ...]`` (dense, or `LoraFactors` leaves when
    factored), the folder holding θ0's tokenizer and each task's adapter (None for a full model)."""

    config: LlamaConfig
    pretrained: Params
    task_vectors: Params
    tokenizer_dir: str
    adapters: list[LoraAdapter | None]


def _same_architecture(found: LlamaConfig, reference: LlamaConfig) -> None:
    """``found`` has θ0's architecture (every config field but the special token ids)."""
    differences = [f"{f.name} {getattr(found, f.name)!r} (θ0: {getattr(reference, f.name)!r})"
                   for f in dataclasses.fields(LlamaConfig)
                   if f.name not in TOKEN_ID_FIELDS and getattr(found, f.name) != getattr(reference, f.name)]
    if differences:
        raise ValueError("config.json differs from the pretrained model's: " + ", ".join(differences))


def _stack(task_vectors: Sequence[Params]) -> Params:
    """Per-task τ trees with a leading task axis of 1 each, concatenated to ``[K, ...]``."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves), *task_vectors)


def checked_adapter(task: TaskConfig, base: Params, log: Callable[[str], None]) -> LoraAdapter:
    """The task's LoRA adapter, read and checked to fit θ0 (``base``: its arrays or shape structs); `MergeError`
    naming the task otherwise."""
    what = f"task {task.name!r} adapter"
    log(f"[models] {task.name}: LoRA adapter {task.adapter}{' (factored)' if task.factored else ''}")
    adapter = guarded(what, lambda: read_lora_adapter(task.adapter))
    guarded(what, lambda: lora_factors([adapter], base))  # every module fits θ0
    return adapter


def load_language_models(config: MergeConfig, log: Callable[[str], None] = print, mesh: Any = None,
                         shard: bool = False) -> LanguageModels:
    """θ0, every task's τ (module docstring) and the tokenizer folder; `MergeError` naming the task and file
    when a checkpoint does not load or does not fit θ0. With ``shard`` (θ0 and τ split over ``mesh``) each
    is read slice by slice straight into its shards (`read_language_models`)."""
    if shard:
        return read_language_models(config, mesh, log)
    log(f"[models] pretrained {config.pretrained}")
    lm_config, pretrained = guarded(f"pretrained {config.pretrained}", lambda: load_hf_causal_lm(config.pretrained))
    dense, adapters = [], []
    for task in config.tasks:
        if task.finetuned:
            what = f"task {task.name!r} finetuned {task.finetuned}"
            log(f"[models] {task.name}: fine-tuned model {task.finetuned}")
            guarded(what, lambda task=task: _same_architecture(read_config(task.finetuned), lm_config))
            _, params = guarded(what, lambda task=task: load_hf_causal_lm(task.finetuned))
            dense.append(guarded(what, lambda params=params: am.task_vectors(pretrained, [params])))
            adapters.append(None)
            continue
        adapter = checked_adapter(task, pretrained, log)
        adapters.append(adapter)
        if not task.factored:
            dense.append(jax.tree_util.tree_map(lambda x: x[None], lora_task_vector(adapter, pretrained)))
    if all(task.factored for task in config.tasks):
        task_vectors = factored_task_vectors(adapters, pretrained)
    else:
        task_vectors = _stack(dense)
    return LanguageModels(lm_config, pretrained, task_vectors, config.pretrained, adapters)


def read_language_models(config: MergeConfig, mesh: Any, log: Callable[[str], None] = print) -> LanguageModels:
    """`load_language_models` for θ0 and τ sharded over ``mesh``: the checkpoints are checked from their headers,
    then every leaf is read from disk straight into its shards, each process reading only its devices' slices
    (`models.sharded_reads`: the host holds one shard per local device of one leaf at a time); the bytes read
    are logged."""
    log(f"[models] pretrained {config.pretrained} (read by shards onto the mesh)")
    base = guarded(f"pretrained {config.pretrained}", lambda: SliceReader(config.pretrained))
    shapes = leaf_shape_tree(base.config)
    sources: list[SliceReader | LoraAdapter] = []
    for task in config.tasks:
        if task.finetuned:
            what = f"task {task.name!r} finetuned {task.finetuned}"
            log(f"[models] {task.name}: fine-tuned model {task.finetuned}")
            guarded(what, lambda task=task: _same_architecture(read_config(task.finetuned), base.config))
            sources.append(guarded(what, lambda task=task: SliceReader(task.finetuned, base.config)))
            continue
        sources.append(checked_adapter(task, shapes, log))
    pretrained = guarded(f"pretrained {config.pretrained}", lambda: read_pretrained(base, mesh, True))
    adapters = [source if isinstance(source, LoraAdapter) else None for source in sources]
    if all(task.factored for task in config.tasks):
        task_vectors = guarded("task vectors", lambda: place_factored(adapters, base.config, mesh, True))
    else:
        task_vectors = guarded("task vectors", lambda: read_task_vectors(base, sources, mesh, True))
    readers = [base, *(source for source in sources if isinstance(source, SliceReader))]
    log(f"[models] read {sum(reader.bytes_read for reader in readers) / 1e6:.1f} MB of checkpoint slices in this "
        f"process")
    return LanguageModels(base.config, pretrained, task_vectors, config.pretrained, adapters)


@dataclasses.dataclass
class StreamedModels:
    """The checkpoints of a streamed run, checked but not loaded: θ0's config and tensors, each task's source of
    τ (`streaming.TaskTensors`), the tokenizer folder and each task's adapter (None for a full model)."""

    config: LlamaConfig
    pretrained: CheckpointFiles
    tasks: list[TaskTensors]
    tokenizer_dir: str
    adapters: list[LoraAdapter | None]


def open_language_models(config: MergeConfig, log: Callable[[str], None] = print) -> StreamedModels:
    """θ0 and every task's checkpoint opened and checked from the headers alone: every tensor present with θ0's
    shape and a floating dtype (`open_hf_causal_lm`), each fine-tuned model of θ0's architecture, each
    adapter's modules fitting θ0's weights; `MergeError` naming the task and file otherwise."""
    log(f"[models] pretrained {config.pretrained} (streamed: nothing loaded)")
    lm_config, pretrained = guarded(f"pretrained {config.pretrained}", lambda: open_hf_causal_lm(config.pretrained))
    shapes = {path: jax.ShapeDtypeStruct(shape, np.float32) for path, shape in leaf_shapes(lm_config).items()}
    tasks, adapters = [], []
    for task in config.tasks:
        if task.finetuned:
            what = f"task {task.name!r} finetuned {task.finetuned}"
            log(f"[models] {task.name}: fine-tuned model {task.finetuned}")
            guarded(what, lambda task=task: _same_architecture(read_config(task.finetuned), lm_config))
            _, files = guarded(what, lambda task=task: open_hf_causal_lm(task.finetuned, lm_config))
            tasks.append(TaskTensors(task.name, what, checkpoint=files))
            adapters.append(None)
            continue
        what = f"task {task.name!r} adapter"
        log(f"[models] {task.name}: LoRA adapter {task.adapter}")
        adapter = guarded(what, lambda task=task: read_lora_adapter(task.adapter))
        guarded(what, lambda adapter=adapter: lora_factors([adapter], shapes))  # every module fits θ0
        modules = {hf_name(m.path, m.layer): m for m in adapter.modules.values()}
        tasks.append(TaskTensors(task.name, f"{what} {task.adapter}", adapter=modules))
        adapters.append(adapter)
    return StreamedModels(lm_config, pretrained, tasks, config.pretrained, adapters)


def output_dtypes(config: MergeConfig, pretrained: CheckpointFiles, names: Sequence[str]) -> dict[str, np.dtype]:
    """Each exported tensor's dtype: the config's ``dtype``, else θ0's stored dtype of that tensor."""
    chosen = jnp.dtype(config.dtype) if config.dtype else None
    return {name: chosen or pretrained.info(name).dtype for name in names}


def describe_dtypes(config: MergeConfig, dtypes: dict[str, np.dtype]) -> str:
    """The exported weights' dtype in words, for the plan and the model card."""
    if config.dtype:
        return f"`{config.dtype}` (the config's dtype)"
    return ", ".join(f"`{name}`" for name in sorted({np.dtype(d).name for d in dtypes.values()})) + " (θ0's)"


class PromptBatches(TextBatches):
    """`TextBatches` whose `fingerprint` identifies the data of a resumable run: every tokenized prompt of
    every task (ids and lengths) and the sampler's settings (batch size, batches per step, seed, buckets,
    padding)."""

    def fingerprint(self) -> str:
        settings = [self.batch_size, self.n_batches, self.seed, list(self.buckets), self.pad_id, self.padding_side]
        digest = hashlib.sha256(json.dumps(settings).encode())
        for sequences in self.tasks:
            digest.update(np.int64(len(sequences)).tobytes())
            for ids in sequences:
                ids = np.asarray(ids, np.int32)
                digest.update(np.int64(ids.size).tobytes() + ids.tobytes())
        return digest.hexdigest()[:16]


def tokenized_prompts(config: MergeConfig, tokenizer: Any, vocab_size: int) -> list[list[np.ndarray]] | None:
    """Every task's prompts as token ids (None when no task has prompts); one line naming the task and file for
    a missing, unreadable or empty file, or ids outside the model's vocabulary (tokenizer of another model)."""
    if not any(task.prompts for task in config.tasks):
        return None
    if missing := [task.name for task in config.tasks if not task.prompts]:
        raise MergeError(f"{config.source}: tasks {missing} have no prompts; give prompts to every task or to none")
    tasks = []
    for task in config.tasks:
        what = f"task {task.name!r} prompts {task.prompts.path}"
        prompts = guarded(what, lambda task=task: read_prompts(task.prompts.path, task.prompts.field))
        ids = guarded(what, lambda prompts=prompts, task=task: tokenize_prompts(
            prompts, tokenizer, config.max_length, task=f"task {task.name!r} prompts"))
        largest = max(int(sequence.max()) for sequence in ids)
        if largest >= vocab_size:
            raise MergeError(f"{what}: token id {largest} is outside the model's vocabulary of {vocab_size} (the "
                       "tokenizer does not belong to this model)")
        tasks.append(ids)
    return tasks


def candidate_ids(config: MergeConfig, tokenizer: Any) -> list[tuple[int, ...]] | None:
    """Per task, the token id of each candidate answer (None without candidates); each answer must be exactly
    one token (no special tokens added) and the answers distinct tokens."""
    if not config.tasks[0].candidates:
        return None
    out = []
    for task in config.tasks:
        ids = []
        for i, answer in enumerate(task.candidates):
            tokens = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
            if len(tokens) != 1:
                raise MergeError(f"task {task.name!r} candidates[{i}] {answer!r} is {len(tokens)} tokens {tokens}, not one; "
                           "each answer must be a single token of the tokenizer")
            ids.append(tokens[0])
        if len(set(ids)) < len(ids):
            raise MergeError(f"task {task.name!r} candidates {list(task.candidates)} share token ids {ids}")
        out.append(tuple(ids))
    return out


@dataclasses.dataclass
class LmPlan(CheckedRun):
    """A checked causal-LM run: also the loaded models, the prompt batches (None without prompts), the
    candidates' token ids and the mesh."""

    models: LanguageModels | StreamedModels
    batches: PromptBatches | None
    candidates: list[tuple[int, ...]] | None

    @property
    def streamed(self) -> bool:
        return isinstance(self.models, StreamedModels)

    def output_dtypes(self) -> dict[str, np.dtype]:
        """Each exported tensor's dtype (`output_dtypes`), θ0's read from its file headers."""
        pretrained = self.models.pretrained if self.streamed else CheckpointFiles(self.config.pretrained)
        return output_dtypes(self.config, pretrained, sorted(hf_tensor_shapes(self.models.config)))

    @property
    def pretrained(self) -> Params:
        return self.models.pretrained

    def describe(self) -> str:
        """The plan as text: model, tasks with their checkpoints and prompts, methods with their λ count per
        task, AdaMerging's settings, the mesh and the output."""
        config, lm = self.config, self.models.config
        lines = [f"pretrained: {config.pretrained} ({lm.model_type}, hidden {lm.hidden_size}, {lm.num_layers} "
                 f"layers, vocabulary {lm.vocab_size}; tokenizer from the same folder)"]
        for k, task in enumerate(config.tasks):
            adapter = self.models.adapters[k]
            if adapter is None:
                source = f"full fine-tuned {task.finetuned}"
            else:
                source = (f"LoRA adapter {task.adapter} ({len(adapter.modules)} modules"
                          f"{', factored' if task.factored else ''})")
            data = "no prompts"
            if self.batches is not None:
                sequences = self.batches.tasks[k]
                data = f"{len(sequences)} prompts (longest {max(len(s) for s in sequences)} tokens)"
            answers = f"; answers {list(task.candidates)} → ids {list(self.candidates[k])}" if self.candidates else ""
            lines.append(f"task {task.name}: {source}; {data}{answers}")
        lines += self.method_lines()
        adamerging = self.settings.adamerging
        objective = "entropy over the candidate answers" if self.candidates else "next-token entropy"
        if self.settings.needs_data:
            lines.append(f"AdaMerging: {config.preset} preset, {adamerging.steps} steps, lr {adamerging.lr}, "
                         f"{adamerging.batches_per_task}x{adamerging.batch_size} prompts per task and step (at "
                         f"most {config.max_length} tokens), {objective}, clamp {adamerging.clamp}, "
                         f"precision {config.precision}")
        lines.append("devices: " + " × ".join(f"{name} {size}" for name, size in self.mesh.shape.items()))
        if self.given_coefficients is not None:
            lines.append(f"λ given by --weights: {config.exported} applies them, no training")
        how = STREAMED if self.streamed else "built in memory"
        lines.append(f"export: {config.exported} to {self.output / 'model'} ({how}); weights "
                     f"{describe_dtypes(config, self.output_dtypes())}")
        return "\n".join(lines)


def prepare_lm(config: MergeConfig, output: Path, coefficients_file: str | None = None,
               log: Callable[[str], None] = print) -> LmPlan:
    """Check everything (module docstring) and return the plan; `MergeError` with one line on a failure."""
    settings = guarded(config.source, config.settings)
    mesh = run_mesh(config, settings)
    if streams(config, settings, coefficients_file, scored=any(task.prompts for task in config.tasks)):
        # nothing to tokenize: the tokenizer's files are only copied
        models = open_language_models(config, log)
        guarded(f"pretrained {config.pretrained}", lambda: tokenizer_files(config.pretrained))
        prompts = candidates = None
    else:
        models = load_language_models(config, log, mesh, shards_frozen(settings.adamerging, mesh))
        tokenizer = guarded(f"pretrained {config.pretrained}: the tokenizer does not load",
                            lambda: load_tokenizer(config.pretrained))
        prompts = tokenized_prompts(config, tokenizer, models.config.vocab_size)
        candidates = candidate_ids(config, tokenizer)
    binding = causal_lm_binding(models.config, candidates=candidates)
    settings = binding.merge_settings(settings)
    batches = None
    if prompts is not None:
        adamerging = settings.adamerging
        batches = PromptBatches(prompts, batch_size=adamerging.batch_size, n_batches=adamerging.batches_per_task,
                                seed=config.seed, buckets=bucket_lengths(config.max_length, min(16, config.max_length)),
                                pad_id=pad_id_of(tokenizer))
    plan = LmPlan(config, settings, binding, output, mesh, models=models, batches=batches,
                  candidates=candidates)
    plan.read_given_coefficients(coefficients_file)
    return plan


def prompt_entropy(plan: LmPlan, models: dict[str, Merged], records: dict[str, Any], probe: Sequence[Any]
                   ) -> dict[str, dict[str, Any]]:
    """Per model (θ0 as "pretrained", then each method), L_t = the binding's mean entropy on task t's step-0
    prompts, their sum Σ_t L_t, and for an adaptive method the sum at λ_init (the record's probe entropy)."""
    names = [task.name for task in plan.config.tasks]
    entropy = jax.jit(lambda params, batch, task: task_entropy(plan.binding.apply_fn, params, batch, task),
                      static_argnums=2)

    def measure(params_of: Callable[[int], Params], initial: float | None) -> dict[str, Any]:
        per_task = {name: float(entropy(params_of(t), probe[t], t)) for t, name in enumerate(names)}
        return {"per_task": per_task, "sum": float(sum(per_task.values())), "initial": initial}

    out = {"pretrained": measure(lambda _: plan.pretrained, None)}
    for name, merged in models.items():
        params_of = merged.per_task if merged.per_task is not None else (lambda _, p=merged.params: p)
        initial = records[name].probe_entropy[0] if records[name].probe_entropy else None
        out[name] = measure(params_of, initial)
    return out


def entropy_table(run: dict[str, Any], candidates: bool) -> str:
    """Markdown: models × tasks entropy (nats), Σ over tasks, and Σ at λ_init for adaptive methods."""
    tasks = run["tasks"]
    what = "over the candidate answers" if candidates else "of the next token"
    lines = [f"Mean entropy {what} (nats) on each task's step-0 prompts; lower is more confident.", "",
             "| Model | " + " | ".join(tasks) + " | Σ | Σ at λ_init |", "|" + "---|" * (len(tasks) + 3)]
    for name, values in run["entropy"].items():
        label = run["methods"][name]["label"] if name in run["methods"] else "θ0 (pretrained)"
        initial = "–" if values["initial"] is None else f"{values['initial']:.4f}"
        cells = [f"{values['per_task'][task]:.4f}" for task in tasks] + [f"{values['sum']:.4f}", initial]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_lm_plan(plan: LmPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every method's model (AdaMerging resumable under ``OUT/state``), measure the prompts' entropy,
    export the chosen model with its card and write the named λ and the report; returns ``results.json``'s
    content. A streamed plan runs through `run_streamed`."""
    if plan.streamed:
        return run_streamed(plan, log)
    config, output, models_in = plan.config, plan.output, plan.models
    output.mkdir(parents=True, exist_ok=True)
    settings = plan.settings.with_changes(quiet=True)
    if plan.given_coefficients is not None:
        settings = settings.with_changes([spec_with_coefficients(plan.export_spec, plan.given_coefficients, plan, plan.mesh)])
    probe = plan.batches(0) if plan.batches is not None else None
    try:
        models, records = build_models(settings, models_in.pretrained, models_in.task_vectors,
                                       apply_fn=plan.binding.apply_fn,
                                       adaptation=plan.batches if settings.needs_data else None, probe=probe,
                                       state_dir=output / "state", mesh=plan.mesh,
                                       view=plan.binding.matrix_view, log=log)
    except ValueError as error:
        raise MergeError(str(error)) from None
    names = [task.name for task in config.tasks]
    run = {"model": "causal_lm", "tasks": names, "merged_tasks": names, "methods": records_json(records),
           "entropy": prompt_entropy(plan, models, records, probe) if probe is not None else None,
           "export": config.exported, "weights": plan.coefficients_file, "settings": settings.describe(),
           "config": config.source}
    merged = models[config.exported]
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(merged.params))
    check_exported_finite(params, plan.binding.tensor_names)
    table = entropy_table(run, plan.candidates is not None) if run["entropy"] else None
    dtypes = plan.output_dtypes()
    with staged_output(output) as stage:
        write_coefficients(plan, merged, run, stage)
        files = write_report(plan, run, table or "No prompts were given: no entropy.\n", log, stage)
        card = lm_model_card(config, plan.exported_method(run), run["settings"], run["lambda_summary"], table,
                             run.get("weights"), describe_dtypes(config, dtypes))
        save_hf_causal_lm(stage / "model", params, models_in.config, tokenizer_dir=models_in.tokenizer_dir,
                          dtype=dtypes)
        write_atomic(stage / "model" / "README.md", card.encode())
    log(f"[merge] wrote {output / 'model'} ({config.exported}), " + ", ".join(
        map(str, committed_paths(files, stage, output).values())))
    return run


def run_streamed(plan: LmPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The exported method merged tensor by tensor from disk into ``OUT/model`` (`exports.write_streamed`), with
    config.json, the tokenizer files and the card, then ``results.json`` and ``table.md``; returns
    ``results.json``'s content."""
    config, models = plan.config, plan.models
    dtypes = plan.output_dtypes()
    stream = TensorStream(models.pretrained, f"pretrained {config.pretrained}", models.tasks, sorted(dtypes),
                          binding_placement(plan.binding))
    described = describe_dtypes(config, dtypes)

    def model_files(folder: Path, run: dict[str, Any]) -> None:
        write_json_atomic(Path(folder, "config.json"), hf_config(models.config, dtypes.values()))
        for path in tokenizer_files(models.tokenizer_dir):
            shutil.copyfile(path, Path(folder, Path(path).name))
        card = lm_model_card(config, plan.exported_method(run), run["settings"], None, None, None, described)
        write_atomic(Path(folder, "README.md"), card.encode())

    fields = {"model": "causal_lm", "entropy": None, "dtype": described}
    return write_streamed(plan, stream, dtypes, fields, model_files, "No prompts were given: no entropy.\n",
                          max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, log=log)
