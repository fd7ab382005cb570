"""adamerging_jax: AdaMerging (Yang et al., ICLR 2024) and task-vector model merging in JAX.

The public API works on any pytree of parameters and any `apply_fn(params, inputs, task_index) -> logits`.
"""

from adamerging_jax.core.coefficients import Coefficients, init_coefficients
from adamerging_jax.core.evaluate import Accuracy, PerTask, evaluate, evaluate_models
from adamerging_jax.core.merge import merge
from adamerging_jax.core.emr import emr_merging
from adamerging_jax.core.isotropic import iso_c_merging, iso_cts_merging
from adamerging_jax.core.magmax import magmax
from adamerging_jax.core.matrix_view import Matrix, MatrixView
from adamerging_jax.core.methods import (
    breadcrumbs,
    dare,
    dare_task_arithmetic,
    della,
    task_arithmetic,
    ties_merging,
    ties_task_vectors,
    weight_average,
)
from adamerging_jax.core.model_stock import model_stock
from adamerging_jax.core.regmean import regmean, regmean_plusplus
from adamerging_jax.core.slerp import slerp
from adamerging_jax.core.tall_masks import consensus_merging, tall_mask_models
from adamerging_jax.core.tsv import tsv_merging
from adamerging_jax.core.objective import Predictions, SharedBackbone, entropy, entropy_objective
from adamerging_jax.core.checkpoint import CorruptCheckpointError
from adamerging_jax.core.optimize import (
    AdaMergingConfig,
    AdaMergingResult,
    LambdaBoundError,
    NonFiniteError,
    adamerging,
    load_coefficients,
    make_step,
)
from adamerging_jax.core.low_rank import LoraFactors
from adamerging_jax.core.parallel import data_mesh, make_mesh
from adamerging_jax.core.protocol import MergeSettings, MethodRecord, run_methods
from adamerging_jax.core.registry import (
    GROUPS,
    REGISTRY,
    AdaptContext,
    Merged,
    MergeMethod,
    MethodSpec,
    Parameter,
    get_method,
    group_members,
    method_spec,
    register,
)
from adamerging_jax.core.task_vector_transforms import TaskVectorTransform, register_transform
from adamerging_jax.core.task_vectors import check_stacked, task_vectors
from adamerging_jax.core.transforms import disjoint_reduce, drop, elect_sign, keep_agreeing, trim
from adamerging_jax.core.trees import path_str
from adamerging_jax.core.wudi import wudi_merging

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "AdaMergingConfig",
    "AdaMergingResult",
    "AdaptContext",
    "Coefficients",
    "CorruptCheckpointError",
    "GROUPS",
    "LambdaBoundError",
    "LoraFactors",
    "Matrix",
    "MatrixView",
    "MergeMethod",
    "MergeSettings",
    "Merged",
    "MethodRecord",
    "MethodSpec",
    "NonFiniteError",
    "Parameter",
    "PerTask",
    "Predictions",
    "REGISTRY",
    "SharedBackbone",
    "TaskVectorTransform",
    "adamerging",
    "breadcrumbs",
    "check_stacked",
    "consensus_merging",
    "dare",
    "dare_task_arithmetic",
    "data_mesh",
    "della",
    "disjoint_reduce",
    "drop",
    "elect_sign",
    "emr_merging",
    "entropy",
    "entropy_objective",
    "evaluate",
    "evaluate_models",
    "get_method",
    "group_members",
    "init_coefficients",
    "iso_c_merging",
    "iso_cts_merging",
    "keep_agreeing",
    "load_coefficients",
    "magmax",
    "make_mesh",
    "make_step",
    "merge",
    "method_spec",
    "model_stock",
    "path_str",
    "register",
    "register_transform",
    "regmean",
    "regmean_plusplus",
    "run_methods",
    "slerp",
    "tall_mask_models",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "ties_task_vectors",
    "trim",
    "tsv_merging",
    "weight_average",
    "wudi_merging",
]
