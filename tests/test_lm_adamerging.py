"""The causal-LM binding: its entropy against a numpy computation of the masked mean next-token entropy, padding
(left, right, longer rows) changing nothing, the candidate-token reading, and layer-wise AdaMerging of a tiny
Llama through the protocol (the entropy falls, λ moves)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamerging_jax.core.objective import Predictions, task_entropy
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
