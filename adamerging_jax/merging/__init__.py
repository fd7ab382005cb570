"""``adamerging-jax merge CONFIG.yaml --output DIR``: a user's own CLIP checkpoints and unlabeled images, or causal
language models and unlabeled prompts, in; a merged Hugging Face model, named λ and a report out.

Each model family is one value, `merging.family.ModelFamily` (its YAML fields, checks, loader, binding, export),
registered by the config's ``model:`` name in `merging.families.FAMILIES`; the modules around them never ask
which family they run.

- :mod:`~adamerging_jax.merging.config`: the YAML schema's shared fields (:mod:`~adamerging_jax.merging.schema`:
  the config's values and field readers), each family reading its own;
- :mod:`~adamerging_jax.merging.plan`: every check before any compute (``--dry-run`` prints the plan);
- :mod:`~adamerging_jax.merging.run`: the plan run by its family, the output folder written;
- :mod:`~adamerging_jax.merging.checked_run`: what every checked run shares (devices, ``--weights``);
- :mod:`~adamerging_jax.merging.exports`: what every run shares once built (given λ, named λ, the report, a
  streamed run's output);
- :mod:`~adamerging_jax.merging.streaming`: data-free merges tensor by tensor from disk, for every family (the
  rule `streams`, the tensors' places from the binding);
- :mod:`~adamerging_jax.merging.errors`: `MergeError`, the refusal every module raises;
- CLIP: :mod:`~adamerging_jax.merging.clip_family` (its YAML), :mod:`~adamerging_jax.merging.clip_run` (checks,
  run, export), :mod:`~adamerging_jax.merging.binding` (θ0, τ, zero-shot heads, tensor names);
- causal LM: :mod:`~adamerging_jax.merging.lm_family` (its YAML), :mod:`~adamerging_jax.merging.lm` (checks, run,
  export), :mod:`~adamerging_jax.merging.lm_binding`;
- :mod:`~adamerging_jax.merging.card`: the model card.
"""
