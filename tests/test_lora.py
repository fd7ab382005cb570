"""LoRA task vectors: PEFT adapter folders (written here in PEFT's format), dense τ against numpy and against
torch with the adapter merged into the weights, the factored weighted sum and its λ-gradient against the dense
one, rsLoRA / rank and alpha patterns, errors naming the field or tensor."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from adamerging_jax.core.trees import named_leaves
from adamerging_jax.models import llama, lora
from adamerging_jax.models import llama_checkpoint as ck

LLAMA = os.path.join(os.path.dirname(__file__), "fixtures", "llama", "llama")
SIZES = {"q_proj": (48, 64), "k_proj": (48, 32), "v_proj": (48, 32), "o_proj": (64, 48),
         "gate_proj": (48, 80), "up_proj": (48, 80), "down_proj": (80, 48)}  # (in, out) of the fixture
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@pytest.fixture(scope="module")
def base():
    return ck.load_hf_causal_lm(LLAMA)


def write_adapter(directory, targets, seed, r=4, alpha=8, **config):
    """A PEFT LoRA folder: ``targets`` is a list of (layer or "lm_head", module name, rank); returns the
    folder and its tensors by key."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, name, rank in targets:
        module = "lm_head" if layer == "lm_head" else f"model.layers.{layer}.{PARENT[name]}.{name}"
        d_in, d_out = (48, 96) if layer == "lm_head" else SIZES[name]
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(size=(rank, d_in)).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(size=(d_out, rank)).astype(np.float32)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    adapter_config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "use_rslora": False,
                      "fan_in_fan_out": False, "target_modules": sorted({n or "lm_head" for _, n, _ in targets}),
                      "task_type": "CAUSAL_LM", **config}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f)
    return str(directory), tensors


def three_adapters(tmp_path):
    """Different targets, ranks and scales; adapter 1 adapts only layer 1 of q (layers_to_transform)."""
    return [
        write_adapter(tmp_path / "a0", [(i, n, 4) for i in (0, 1) for n in ("q_proj", "v_proj", "down_proj")]
                      + [("lm_head", None, 4)], seed=0),
        write_adapter(tmp_path / "a1", [(1, "q_proj", 2), (0, "up_proj", 2), (1, "up_proj", 2)], seed=1, r=2,
                      alpha=16, use_rslora=True),
        write_adapter(tmp_path / "a2",
                      [(i, n, 8 if n == "q_proj" else 3) for i in (0, 1) for n in ("q_proj", "o_proj")], seed=2,
                      r=3, alpha=6, rank_pattern={"q_proj": 8}, alpha_pattern={"layers.1.self_attn.o_proj": 1}),
    ]


def numpy_task_vector(base_params, tensors, scale_of):
    """τ by hand: for each lora_A key, scale · (B @ A).T at the kernel (and layer) it names."""
    tau = {path: np.zeros(leaf.shape, np.float32) for path, leaf in named_leaves(base_params)}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        delta = scale_of(module, a.shape[0]) * (b @ a).T
        if module == "lm_head":
            tau["lm_head/kernel"] += delta
        else:
            layer, name = int(module.split(".")[2]), module.split(".")[-1]
            path = f"layers/{'attn' if PARENT[name] == 'self_attn' else 'mlp'}/{name[:-5]}/kernel"
            tau[path][layer] += delta
    return tau


def test_dense_task_vector_matches_numpy(tmp_path, base):
    _, params = base
    (d0, t0), (d1, t1), (d2, t2) = three_adapters(tmp_path)
    expected = [numpy_task_vector(params, t0, lambda m, r: 8 / 4),
                numpy_task_vector(params, t1, lambda m, r: 16 / np.sqrt(2)),  # rsLoRA: α / √r
                numpy_task_vector(params, t2, lambda m, r: (1 if m.endswith("layers.1.self_attn.o_proj") else 6) / r)]
    for directory, want in zip([d0, d1, d2], expected):
        tau = lora.lora_task_vector(lora.read_lora_adapter(directory), params)
        assert jax.tree_util.tree_structure(tau) == jax.tree_util.tree_structure(params)
        got = dict(named_leaves(tau))
        assert set(got) == set(want)
        for path in want:
            np.testing.assert_allclose(np.asarray(got[path]), want[path], rtol=1e-6, atol=1e-6, err_msg=path)
    assert not np.asarray(dict(named_leaves(lora.lora_task_vector(lora.read_lora_adapter(d1), params)))[
        "layers/attn/q/kernel"])[0].any()  # adapter 1 leaves layer 0 of q alone


def test_scales_read_from_the_config(tmp_path):
    (d0, _), (d1, _), (d2, _) = three_adapters(tmp_path)
    assert lora.read_lora_adapter(d0).modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    assert lora.read_lora_adapter(d1).modules["model.layers.1.self_attn.q_proj"].scale == pytest.approx(16 / 2**0.5)
    a2 = lora.read_lora_adapter(d2).modules
    assert a2["model.layers.0.self_attn.q_proj"].scale == pytest.approx(6 / 8)  # rank_pattern r = 8
    assert a2["model.layers.0.self_attn.o_proj"].scale == pytest.approx(6 / 3)
    assert a2["model.layers.1.self_attn.o_proj"].scale == pytest.approx(1 / 3)  # alpha_pattern α = 1
    assert a2["model.layers.1.self_attn.o_proj"].path == "layers/attn/o/kernel"
    assert a2["model.layers.1.self_attn.o_proj"].layer == 1


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_factored_sum_equals_dense(tmp_path, base, granularity):
    _, params = base
    adapters = [lora.read_lora_adapter(d) for d, _ in three_adapters(tmp_path)]
    taus = [dict(named_leaves(lora.lora_task_vector(a, params))) for a in adapters]
    factors = lora.lora_factors(adapters, params)
    assert set(factors) == {"layers/attn/q/kernel", "layers/attn/v/kernel", "layers/attn/o/kernel",
                            "layers/mlp/up/kernel", "layers/mlp/down/kernel", "lm_head/kernel"}
    assert factors["layers/attn/q/kernel"].a.shape == (3, 2, 8, 48)  # padded to the largest rank
    rng = np.random.default_rng(0)
    weighted = jax.jit(lora.low_rank_weighted_sum)
    for path, f in factors.items():
        lam_shape = (3, 2) if granularity == "layer" and llama.stacked(path) else (3,)
        lam = rng.uniform(-1, 1, size=lam_shape).astype(np.float32)
        lam_b = lam.reshape(lam.shape + (1,) * (taus[0][path].ndim + 1 - lam.ndim))
        dense = sum(lam_b[k] * np.asarray(taus[k][path]) for k in range(3))
        got = np.asarray(weighted(jnp.asarray(lam), f))
        assert got.shape == taus[0][path].shape
        np.testing.assert_allclose(got, dense, atol=1e-5, rtol=1e-5, err_msg=path)
        # the λ-gradient of ⟨G, Σ_k λ_k τ_k⟩ is ⟨G, τ_k⟩ (per layer for [K, L])
        g = rng.normal(size=dense.shape).astype(np.float32)
        grad = np.asarray(jax.grad(lambda x, g=g, f=f: jnp.sum(g * lora.low_rank_weighted_sum(x, f)))(jnp.asarray(lam)))
        axes = tuple(range(lam.ndim - 1, g.ndim))  # keep the layer axis of a [K, L] λ
        want = np.stack([(g * np.asarray(taus[k][path])).sum(axis=axes) for k in range(3)])
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-3, err_msg=path)


def test_factored_sizes(tmp_path, base):
    _, params = base
    adapters = [lora.read_lora_adapter(d) for d, _ in three_adapters(tmp_path)]
    factors = lora.lora_factors(adapters, params)
    held, dense = lora.factored_sizes(factors)
    q = 3 * 2 * 8 * (48 + 64)  # K · L · r_max · (in + out) for q
    assert held == q + sum(f.a.size + f.b.size for p, f in factors.items() if p != "layers/attn/q/kernel")
    assert dense == sum(3 * np.prod(dict(named_leaves(params))[p].shape) for p in factors)
    assert held < dense


def test_merged_adapter_matches_torch(tmp_path, base):
    """θ0 + τ through our forward = transformers' model with W += s · B A merged into its torch weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = base
    adapter = lora.read_lora_adapter(three_adapters(tmp_path)[2][0])
    merged = jax.tree_util.tree_map(jnp.add, params, lora.lora_task_vector(adapter, params))
    model = transformers.AutoModelForCausalLM.from_pretrained(LLAMA, attn_implementation="eager").float()
    with torch.no_grad():
        for module, m in adapter.modules.items():
            weight = model.get_submodule(module).weight
            weight += torch.from_numpy(m.scale * (m.b @ m.a))
    expected = dict(np.load(os.path.join(LLAMA, "expected.npz")))
    ids, mask, positions = (torch.from_numpy(expected[k]).long()
                            for k in ["input_ids", "attention_mask", "position_ids"])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    ours = np.asarray(jax.jit(llama.forward, static_argnums=3)(merged, expected["input_ids"],
                                                              expected["attention_mask"], config))
    assert np.abs(ours - theirs)[expected["attention_mask"] == 1].max() <= 1e-5
    assert np.abs(theirs - expected["logits"]).max() > 1e-2  # the adapter moved the logits


def test_peft_adapter_read(tmp_path, base):
    """With peft installed: an adapter peft itself saved gives PEFT's own merged delta."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config, params = base
    model = transformers.AutoModelForCausalLM.from_pretrained(LLAMA)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                            init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tau = dict(named_leaves(lora.lora_task_vector(lora.read_lora_adapter(tmp_path / "adapter"), params)))
    layers = peft_model.base_model.model.model.layers
    with torch.no_grad():
        for i in range(config.num_layers):
            for path, module in [("layers/attn/q/kernel", layers[i].self_attn.q_proj),
                                 ("layers/mlp/down/kernel", layers[i].mlp.down_proj)]:
                np.testing.assert_allclose(np.asarray(tau[path][i]), module.get_delta_weight("default").numpy().T,
                                           rtol=1e-5, atol=1e-6, err_msg=f"{path} layer {i}")
    assert not np.asarray(tau["layers/attn/k/kernel"]).any()


def test_errors_name_the_field_or_tensor(tmp_path, base):
    _, params = base
    directory, _ = write_adapter(tmp_path / "dora", [(0, "q_proj", 4)], seed=0, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        lora.read_lora_adapter(directory)
    directory, _ = write_adapter(tmp_path / "rank", [(0, "q_proj", 4)], seed=0, r=8)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*r = 8"):
        lora.read_lora_adapter(directory)
    directory, tensors = write_adapter(tmp_path / "odd", [(0, "q_proj", 4)], seed=0)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(64, np.float32)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        lora.read_lora_adapter(directory)
    directory, _ = write_adapter(tmp_path / "embed", [(0, "q_proj", 4)], seed=0)
    os.rename(os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory, "x"))
    save_file({"base_model.model.model.embed_tokens.lora_A.weight": np.ones((4, 96), np.float32),
               "base_model.model.model.embed_tokens.lora_B.weight": np.ones((48, 4), np.float32)},
              os.path.join(directory, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="model.embed_tokens"):
        lora.read_lora_adapter(directory)
    directory, _ = write_adapter(tmp_path / "deep", [(5, "q_proj", 4)], seed=0)
    with pytest.raises(ValueError, match="layer 5"):
        lora.lora_task_vector(lora.read_lora_adapter(directory), params)
    _, qwen2 = ck.load_hf_causal_lm(os.path.join(os.path.dirname(LLAMA), "qwen2"))
    directory, _ = write_adapter(tmp_path / "shape", [(0, "q_proj", 4)], seed=0)
    with pytest.raises(ValueError, match=r"q_proj.*do not fit the base kernel \(32, 32\)"):
        lora.lora_task_vector(lora.read_lora_adapter(directory), qwen2)
    directory, _ = write_adapter(tmp_path / "head", [("lm_head", None, 4)], seed=0)
    with pytest.raises(ValueError, match="tied"):
        lora.lora_factors([lora.read_lora_adapter(directory)], qwen2)
    with pytest.raises(ValueError, match="λ of shape"):
        f = lora.lora_factors([lora.read_lora_adapter(d) for d, _ in three_adapters(tmp_path)], params)
        lora.low_rank_weighted_sum(jnp.ones((3, 5)), f["layers/attn/q/kernel"])


def test_factored_tree_merges_like_the_dense_task_vectors(tmp_path, base):
    """merge(θ0, factored_task_vectors, λ) = θ0 + Σ_k λ_k τ_k with the dense τ_k of each adapter (layer-wise λ)."""
    import adamerging_jax as am

    _, params = base
    adapters = [lora.read_lora_adapter(d) for d, _ in three_adapters(tmp_path)]
    factored = lora.factored_task_vectors(adapters, params)
    assert isinstance(factored["embed"], lora.LoraFactors) and factored["embed"].a.shape[-2] == 0  # nothing stored
    assert factored["layers"]["attn_norm"]["scale"].shape == (3, *params["layers"]["attn_norm"]["scale"].shape)
    dense = am.task_vectors(params, [am.core.task_vectors.add_to_pretrained(params, lora.lora_task_vector(a, params))
                                     for a in adapters])
    lam = am.init_coefficients(params, 3, "layer", np.asarray([0.7, -0.4, 1.3]), llama.stacked)
    got, want = am.merge(params, factored, lam), am.merge(params, dense, lam)
    for (path, x), (_, y) in zip(named_leaves(got), named_leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-5, err_msg=path)
