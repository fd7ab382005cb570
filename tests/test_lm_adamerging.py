"""The causal-LM binding: its entropy against a numpy computation of the masked mean next-token entropy, padding
(left, right, longer rows) changing nothing, the candidate-token reading; layer-wise AdaMerging of a tiny
Llama through the protocol (the entropy falls, λ moves); factored LoRA τ giving the dense-τ run.

The tiny problem (`lm_problem`) is shared with tests/test_lm_mesh.py and tests/test_lm_multihost.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.core.low_rank import LoraFactors, zero_task_vector
from adamerging_jax.core.objective import Predictions, task_entropy
from adamerging_jax.core.protocol import MergeSettings, build_models
from adamerging_jax.merging.lm_binding import causal_lm_binding
from adamerging_jax.models import llama

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CONFIG, jax.random.PRNGKey(0))


def numpy_entropy(logits, mask):
    """Σ_{n,i} w H(softmax z[n, i]) / Σ w with w = m[n, i] m[n, i + 1] over positions i < T − 1 (float64)."""
    z = np.asarray(logits, np.float64)[:, :-1]
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    h = -(np.exp(log_p) * log_p).sum(-1)
    m = np.asarray(mask, np.float64)
    w = m[:, 1:] * m[:, :-1]
    return (w * h).sum() / w.sum()


def batch_of(rows, length, left=False):
    """Token rows padded with 0 to ``length`` on the right (or left), with their attention mask."""
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for n, row in enumerate(rows):
        where = slice(length - len(row), length) if left else slice(0, len(row))
        ids[n, where], mask[n, where] = row, 1
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


ROWS = [list(np.random.default_rng(n).integers(1, 64, size=size)) for n, size in enumerate([9, 12, 5, 12])]


def test_entropy_is_the_masked_mean_of_numpy(params):
    binding = causal_lm_binding(CONFIG)
    batch = batch_of(ROWS, 12)
    output = binding.apply_fn(params, batch, 0)
    assert isinstance(output, Predictions) and output.logits.shape == (4, 11, 64)
    logits = llama.forward(params, batch["input_ids"], batch["attention_mask"], CONFIG)
    expected = numpy_entropy(logits, batch["attention_mask"])
    np.testing.assert_allclose(float(task_entropy(binding.apply_fn, params, batch, 0)), expected, rtol=1e-5)


def test_padding_changes_nothing(params):
    binding = causal_lm_binding(CONFIG)
    reference = float(task_entropy(binding.apply_fn, params, batch_of(ROWS, 12), 0))
    for batch in (batch_of(ROWS, 16), batch_of(ROWS, 16, left=True), batch_of(ROWS, 12, left=True)):
        assert float(task_entropy(binding.apply_fn, params, batch, 0)) == pytest.approx(reference, rel=2e-5)


def test_candidates_read_the_last_real_position(params):
    candidates = [[3, 7], [5, 11, 13]]
    binding = causal_lm_binding(CONFIG, candidates=candidates)
    right, left = batch_of(ROWS, 16), batch_of(ROWS, 16, left=True)
    for task, ids in enumerate(candidates):
        got = np.asarray(binding.apply_fn(params, right, task))
        assert got.shape == (4, len(ids))
        for n, row in enumerate(ROWS):
            alone = llama.forward(params, jnp.asarray([row], jnp.int32), None, CONFIG)[0, -1]
            np.testing.assert_allclose(got[n], np.asarray(alone)[ids], atol=2e-5)
        np.testing.assert_allclose(np.asarray(binding.apply_fn(params, left, task)), got, atol=2e-5)


@pytest.mark.parametrize("candidates, message", [
    ([[3]], "task 0: [3] has fewer than 2"),
    ([[3, 4], [5, 64]], "task 1: token ids [64] outside the vocabulary of 64"),
])
def test_bad_candidates_are_named(candidates, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        causal_lm_binding(CONFIG, candidates=candidates)


def test_binding_names_every_entry():
    binding = causal_lm_binding(CONFIG)
    assert binding.stacked("layers/attn/q/kernel") and not binding.stacked("embed")
    assert binding.tensor_names[("layers/attn/q/kernel", 1)] == "model.layers.1.self_attn.q_proj.weight"
    assert binding.tensor_order[0] == "model.embed_tokens.weight"


# ------------------------------------------------------------------------------------ AdaMerging a tiny Llama

TASKS, BATCH, LENGTH, RANK = 3, 8, 16, 4
ADAPTED = ("layers/attn/q/kernel", "layers/attn/v/kernel", "layers/mlp/down/kernel", "lm_head/kernel")


@dataclasses.dataclass
class LmProblem:
    """θ0 of the tiny Llama, K random LoRA task vectors (factored and the same τ dense) and per-step batches."""

    pretrained: dict
    factored: dict
    dense: dict

    @staticmethod
    def batches(step):
        """K task batches of BATCH rows of LENGTH tokens, task t drawing from its own quarter of the vocabulary,
        the rows right-padded to random lengths ≥ 4."""
        rng = np.random.default_rng(1000 + step)
        out = []
        for task in range(TASKS):
            ids = rng.integers(16 * task, 16 * task + 16, size=(BATCH, LENGTH))
            lengths = rng.integers(4, LENGTH + 1, size=BATCH)
            mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
            out.append({"input_ids": (ids * mask).astype(np.int32), "attention_mask": mask})
        return out


def dense_of(factors):
    """Σ-free dense τ_k = s_k (B_k A_k)ᵀ of each factor leaf, in numpy (float64, cast back to float32)."""
    a, b, s = (np.asarray(x, np.float64) for x in (factors.a, factors.b, factors.scale))
    return (s[..., None, None] * np.einsum("...ri,...or->...io", a, b)).astype(np.float32)


def lm_problem(seed=0, std=1.0):
    """The tiny problem: random factors of rank RANK on ADAPTED (std ``std``), zero τ elsewhere."""
    pretrained = llama.init_params(CONFIG, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    def factored(path, x):
        if path not in ADAPTED:
            return zero_task_vector(x.shape, TASKS, int(llama.stacked(path)))
        lead = x.shape[:-2]
        a = rng.normal(0, std, size=(TASKS, *lead, RANK, x.shape[-2])) / np.sqrt(x.shape[-2])
        b = rng.normal(0, std, size=(TASKS, *lead, x.shape[-1], RANK)) / np.sqrt(RANK)
        scale = rng.uniform(0.5, 2.0, size=(TASKS, *lead))
        return LoraFactors(*(jnp.asarray(v, jnp.float32) for v in (a, b, scale)))

    factored_tree = am.core.trees.map_with_path(factored, pretrained)
    dense = jax.tree_util.tree_map(
        lambda f: jnp.asarray(dense_of(f)) if isinstance(f, LoraFactors) else f, factored_tree,
        is_leaf=lambda f: isinstance(f, LoraFactors))
    return LmProblem(pretrained, factored_tree, dense)


@pytest.fixture(scope="module")
def lm():
    return lm_problem()


def lm_config(**changes):
    return am.AdaMergingConfig(**{**dict(steps=4, lr=0.05, batches_per_task=1, batch_size=BATCH, quiet=True,
                                         stacked=llama.stacked), **changes})


def one_device():
    return am.data_mesh(jax.devices()[:1])


def test_layerwise_adamerging_through_the_protocol_lowers_the_entropy(lm):
    binding = causal_lm_binding(CONFIG)
    settings = binding.merge_settings(MergeSettings(["task_arithmetic", "adamerging"], lm_config(steps=6)))
    _, records = build_models(settings, lm.pretrained, lm.dense, apply_fn=binding.apply_fn,
                                   adaptation=lm.batches, probe=lm.batches(0), mesh=one_device(), log=lambda _: None)
    record = records["adamerging"]
    assert record.entropy[-1] < record.entropy[0] - 1e-3
    before, after = record.probe_entropy
    assert after < before
    q = np.asarray(record.coefficients["layers/attn/q/kernel"])
    assert q.shape == (TASKS, CONFIG.num_layers) and np.abs(q - 0.3).max() > 1e-3
    np.testing.assert_array_equal(record.coefficients["embed"], np.float32(0.3))  # a zero τ gets no gradient


@pytest.mark.parametrize("accumulate", ["fused", "per_task"])
def test_factored_lora_gives_the_dense_trajectory(lm, accumulate):
    config = lm_config(accumulate=accumulate)
    dense = am.adamerging(causal_lm_binding(CONFIG).apply_fn, lm.pretrained, lm.dense, lm.batches, config,
                          mesh=one_device())
    factored = am.adamerging(causal_lm_binding(CONFIG).apply_fn, lm.pretrained, lm.factored, lm.batches, config,
                             mesh=one_device())
    np.testing.assert_allclose(factored.history["loss"], dense.history["loss"], atol=1e-5, rtol=1e-5)
    for group, value in dense.coefficients.values.items():
        np.testing.assert_allclose(factored.coefficients.values[group], value, atol=1e-5, err_msg=group)
    assert np.abs(np.asarray(dense.coefficients.values["layers/attn/q/kernel"]) - 0.3).max() > 1e-3
    for path, leaf in am.core.trees.named_leaves(dense.params):
        np.testing.assert_allclose(dict(am.core.trees.named_leaves(factored.params))[path], leaf, atol=1e-5,
                                   err_msg=path)
