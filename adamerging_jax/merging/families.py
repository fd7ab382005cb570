"""The model families ``merge`` knows, by the config's ``model:`` name: `FAMILIES` (a `core.catalog.Catalog` of
`merging.family.ModelFamily`). Another family is registered with ``FAMILIES.add(family)``."""

from __future__ import annotations

from adamerging_jax.core.catalog import Catalog
from adamerging_jax.merging.clip_family import CLIP
from adamerging_jax.merging.lm_family import CAUSAL_LM

FAMILIES = Catalog("model family")
FAMILIES.add(CLIP)
FAMILIES.add(CAUSAL_LM)
