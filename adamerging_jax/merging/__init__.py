"""``adamerging-jax merge CONFIG.yaml --output DIR``: a user's own CLIP checkpoints and unlabeled images in,
a merged Hugging Face model, named λ and a report out.

- :mod:`~adamerging_jax.merging.config`: the YAML schema, validated field by field;
- :mod:`~adamerging_jax.merging.binding`: the CLIP model binding (θ0, τ, zero-shot heads, tensor names);
- :mod:`~adamerging_jax.merging.plan`: every check before any compute (``--dry-run`` prints the plan);
- :mod:`~adamerging_jax.merging.checked_run`: what every checked run shares (devices, ``--weights``);
- :mod:`~adamerging_jax.merging.exports`: what every run shares once built (given λ, named λ, the report);
- :mod:`~adamerging_jax.merging.errors`: `MergeError`, the refusal every module raises;
- :mod:`~adamerging_jax.merging.run`: the methods run through the protocol, the output folder written;
- :mod:`~adamerging_jax.merging.card`: the model card.
"""
