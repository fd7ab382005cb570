"""A model binding: everything the core needs to know about one model family, in one value.

AdaMerging merges a parameter tree θ = θ0 + Σ_k clamp(λ_k) τ_k and scores it with
``apply_fn(params, inputs, task) -> logits``. Three facts about the model decide how λ is laid out and
exchanged, and a caller that forgets one gets a silently different run:

- ``apply_fn``: the merged tree's forward pass with task ``task``'s frozen head;
- ``stacked``: which leaves stack L layers on axis 0 (``lax.scan``), so that layer-wise λ is ``[K, L]``
  (one coefficient per task and per checkpoint tensor, Yang et al., ICLR 2024, Sec. 3.2.2) and not ``[K]``;
- ``tensor_names``: (leaf path, layer or None) → checkpoint tensor name, with ``tensor_order`` the
  checkpoint's own parameter order (FusionBench's columns), so λ can be written and read by name; and, where
  the official AdaMerging code publishes λ for the model, ``official_rows``: what each row of its files scales.

A binding hands these to the core (`merge_settings`, `init_coefficients`) so no caller can drop ``stacked``.
Model-agnostic: a CLIP image tower and a language model bind the same way.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from adamerging_jax.core.coefficients import Coefficients, Granularity, init_coefficients
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.objective import ApplyFn
from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.core.trees import PyTree

if TYPE_CHECKING:
    from adamerging_jax.coefficient_formats import OfficialRows
    from adamerging_jax.core.regmean import GramFn
    from adamerging_jax.core.we_moe import ExpertMixture

Entry = tuple[str, Optional[int]]


@dataclasses.dataclass(frozen=True)
class ModelBinding:
    """What the core needs from a model (module docstring).

    Attributes:
      apply_fn: ``apply_fn(params, inputs, task) -> logits`` of the merged tree.
      stacked: predicate on leaf path for leaves that stack layers (None: no leaf does).
      tensor_names: (leaf path, layer index or None) → checkpoint tensor name, for every entry of the tree.
      tensor_order: the checkpoint's tensor names in its own parameter order.
      matrix_view: which leaves are weight matrices and how they are laid out (`core.matrix_view`), for the
        methods that work per matrix (TSV-M, Iso-C, WUDI, ...); None: the model declares none.
      official_rows: the rows of the official code's layer-wise λ files for this model
        (`coefficient_formats.OfficialRows`); None: it publishes none beyond rows in ``tensor_order``.
      gram_fn: the input Gram matrix of every linear layer (`core.regmean.GramFn`), for RegMean; None: the
        model offers no Gram capture.
      features_fn, head_fn: the representation ``features_fn(params, inputs) -> z [N, d]`` and the head applied
        after it, ``head_fn(z, task) -> logits``, with ``apply_fn(params, x, t) = head_fn(features_fn(params, x),
        t)``, for Surgery (`core.surgery`); None: the model exposes no representation.
      mixture: the model as a weight-ensembling MoE (`core.we_moe.ExpertMixture`: which module group of its top
        layers is upscaled and how the routed model runs), for WEMoE; None: the model declares none.
    """

    apply_fn: ApplyFn
    stacked: Callable[[str], bool] | None
    tensor_names: Mapping[Entry, str]
    tensor_order: tuple[str, ...]
    matrix_view: MatrixView | None = None
    official_rows: OfficialRows | None = None
    gram_fn: GramFn | None = None
    features_fn: Callable[[PyTree, Any], Any] | None = None
    head_fn: Callable[[Any, int], Any] | None = None
    mixture: ExpertMixture | None = None

    def protocol_arguments(self) -> dict[str, Any]:
        """The model's part of `core.protocol.build_models` / `run_methods`' keyword arguments: ``apply_fn``,
        ``view`` (the matrix view), ``gram_fn``, ``features_fn``, ``head_fn`` and ``mixture``."""
        return {"apply_fn": self.apply_fn, "view": self.matrix_view, "gram_fn": self.gram_fn,
                "features_fn": self.features_fn, "head_fn": self.head_fn, "mixture": self.mixture}

    def merge_settings(self, settings: MergeSettings) -> MergeSettings:
        """``settings`` with this model's ``stacked`` declared on its AdaMerging config."""
        return settings.with_changes(stacked=self.stacked)

    def init_coefficients(self, pretrained: PyTree, num_tasks: int, granularity: Granularity,
                          value: float = 0.3) -> Coefficients:
        """Initial λ for this model's tree with its stacked leaves declared (see `init_coefficients`)."""
        return init_coefficients(pretrained, num_tasks, granularity, value, self.stacked)

    def coefficients_per_task(self, pretrained: PyTree, granularity: Granularity) -> int:
        """How many λ each task gets: 1 task-wise, one per checkpoint tensor layer-wise (199 on ViT-B/32)."""
        like = self.init_coefficients(pretrained, 1, granularity)
        return sum(int(value.size) for value in like.values.values())
