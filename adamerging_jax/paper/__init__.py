"""The paper's experiments (AdaMerging, Yang et al., ICLR 2024) on CLIP: Table 1 (ViT-B/32), Table 2 (ViT-L/14),
generalization to unseen tasks and robustness to corrupted test data.

One idea a module: `tasks` (the 8 tasks' names across sources), `published` (the paper's numbers),
`settings` (every hyper-parameter, with the official and FusionBench presets), `models` (checkpoints and
zero-shot heads), `sources` (test sets from tfds or folders), `experiments` (the three protocols, each a
binding of the one merging protocol `adamerging_jax.core.protocol`), `report` (the paper-shaped markdown
tables over `adamerging_jax.report`) and `cli` (``adamerging-jax paper ...``, which ``experiments/`` call).
"""
