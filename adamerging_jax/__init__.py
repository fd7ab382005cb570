"""adamerging_jax: AdaMerging (Yang et al., ICLR 2024) and task-vector model merging in JAX.

The public API works on any pytree of parameters and any `apply_fn(params, inputs, task_index) -> logits`.
"""

from adamerging_jax.core.coefficients import Coefficients, init_coefficients
from adamerging_jax.core.evaluate import Accuracy, PerTask, evaluate, evaluate_models
from adamerging_jax.core.merge import merge
from adamerging_jax.core.methods import (
    dare,
    dare_task_arithmetic,
    task_arithmetic,
    ties_merging,
    ties_task_vectors,
    weight_average,
)
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
    REGISTRY,
    AdaptContext,
    Merged,
    MergeMethod,
    MethodSpec,
    Parameter,
    get_method,
    method_spec,
    register,
)
from adamerging_jax.core.task_vectors import check_stacked, task_vectors
from adamerging_jax.core.transforms import disjoint_reduce, drop, elect_sign, keep_agreeing, trim
from adamerging_jax.core.trees import path_str

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "AdaMergingConfig",
    "AdaMergingResult",
    "AdaptContext",
    "Coefficients",
    "CorruptCheckpointError",
    "LambdaBoundError",
    "LoraFactors",
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
    "adamerging",
    "check_stacked",
    "dare",
    "dare_task_arithmetic",
    "data_mesh",
    "disjoint_reduce",
    "drop",
    "elect_sign",
    "entropy",
    "entropy_objective",
    "evaluate",
    "evaluate_models",
    "get_method",
    "init_coefficients",
    "keep_agreeing",
    "load_coefficients",
    "make_mesh",
    "make_step",
    "merge",
    "method_spec",
    "path_str",
    "register",
    "run_methods",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "ties_task_vectors",
    "trim",
    "weight_average",
]
