"""λ by checkpoint tensor name: CLIP's naming and order against transformers' torch model, exact round trips
through named files, FusionBench's [K, n] and the official [n, 1 + K] layouts, and merges in those layouts
computed the way FusionBench and the official code compute them."""
import json
import os

import jax
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax import coefficient_formats as cf
from adamerging_jax.models import clip
from adamerging_jax.models import clip_checkpoint as ck

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")
K = 3


@pytest.fixture(scope="module")
def tower():
    config, params = ck.load_hf_clip(FIXTURE)
    return config, params["vision"], ck.coefficient_tensor_names(config)


def random_coefficients(theta0, granularity, seed=0):
    like = am.init_coefficients(theta0, K, granularity=granularity, stacked=clip.stacked)
    rng = np.random.default_rng(seed)
    values = {g: rng.uniform(-0.5, 1.5, np.shape(v)).astype(np.float32) for g, v in like.values.items()}
    return am.Coefficients({g: jax.numpy.asarray(v) for g, v in values.items()}, like.leaf_groups)


def per_block(path):
    """One λ per top-level module: every stacked leaf of the blocks shares one [K, L]."""
    return "blocks" if path.startswith("layers/") else path


def assert_same(a, b):
    assert a.leaf_groups == b.leaf_groups and set(a.values) == set(b.values)
    for group in a.values:
        np.testing.assert_array_equal(np.asarray(a.values[group]), np.asarray(b.values[group]))


def test_names_and_order_match_transformers(tower):
    """Order = torch CLIPVisionModel.named_parameters(); each (leaf, layer) names the torch tensor holding the
    same numbers (compared as sorted values, so no layout code of ours is involved)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, vision, names = tower
    hf_config = transformers.CLIPConfig.from_pretrained(FIXTURE).vision_config
    model = transformers.CLIPVisionModel(hf_config)
    state = ck.read_safetensors(os.path.join(FIXTURE, "model.safetensors"))
    own = model.state_dict()
    prefix = "" if next(iter(own)).startswith("vision_model.") else "vision_model."
    model.load_state_dict({k: torch.from_numpy(state[prefix + k].copy()) for k in own}, strict=True)
    torch_order = [prefix + name for name, _ in model.named_parameters()]
    assert list(names.order) == torch_order
    assert sorted(names.values()) == sorted(torch_order)
    params = {prefix + k: v.detach().numpy() for k, v in model.named_parameters()}
    for (path, layer), name in names.items():
        leaf = np.asarray(ck._get(vision, path))
        ours = leaf if layer is None else leaf[layer]
        np.testing.assert_array_equal(np.sort(ours, axis=None), np.sort(params[name], axis=None), err_msg=name)


@pytest.mark.parametrize("granularity", ["layer", "task", per_block])
def test_named_round_trip(tower, granularity):
    _, vision, names = tower
    lam = random_coefficients(vision, granularity)
    named = cf.named_coefficients(lam, names)
    assert sorted(named) == sorted(names.order) and all(len(v) == K for v in named.values())
    q1 = named["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    if granularity == "task":
        assert all(v == q1 for v in named.values())
    else:
        key = "layers/attn/q/kernel" if granularity == "layer" else "blocks"
        assert q1 == [float(x) for x in np.asarray(lam.values[key])[:, 1]]
    assert_same(cf.coefficients_from_named(named, lam, names), lam)


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_fusionbench_and_official_round_trips(tower, granularity):
    _, vision, names = tower
    lam = random_coefficients(vision, granularity, seed=1)
    fb = cf.to_fusionbench(lam, names.order, names)
    assert fb.shape == (K, len(names.order)) and fb.dtype == np.float32
    assert_same(cf.from_fusionbench(fb, lam, names.order, names), lam)
    official = cf.to_official(lam, names.order, names)
    assert official.shape == (len(names.order), 1 + K) and (official[:, 0] == 1).all()
    np.testing.assert_array_equal(official[:, 1:], fb.T)
    assert_same(cf.from_official(official, lam, names.order, names), lam)


def test_official_task_wise_row_and_leftover_rows(tower):
    """Task-wise: the official single row [1, λ_1..λ_K]; layer-wise with rows outside the tree (the official
    checkpoints' text-side leftovers) filled on export, checked as never trained on import and ignored; a row
    that names no tensor of the tree and is not declared is refused, not skipped."""
    _, vision, names = tower
    task = random_coefficients(vision, "task", seed=2)
    row = cf.to_official(task, None, names)
    np.testing.assert_array_equal(row, [[1.0, *np.asarray(task.values["*"])]])
    assert_same(cf.from_official(row, task, None, names), task)
    layer = random_coefficients(vision, "layer", seed=3)
    rows = ["model.positional_embedding", *names.order, "model.logit_scale"]
    official = cf.to_official(layer, rows, names, fill=0.3)
    np.testing.assert_array_equal(official[0], np.float32([1.0, 0.3, 0.3, 0.3]))
    leftovers = cf.OfficialRows(tuple(rows), untrained={rows[0], rows[-1]})
    assert_same(cf.from_official(official, layer, leftovers, names), layer)
    with pytest.raises(ValueError, match="tensors the tree does not have: .'model.logit_scale'"):
        cf.from_official(official, layer, rows, names)
    trained = official.copy()
    trained[-1, 2] = 0.31
    with pytest.raises(ValueError, match="row 'model.logit_scale', which the official code never trains, holds"):
        cf.from_official(trained, layer, leftovers, names)
    with pytest.raises(KeyError, match="model.positional_embedding"):
        cf.to_official(layer, rows, names)
    with pytest.raises(ValueError, match="one λ shared by every tensor"):
        cf.to_official(layer, None, names)
    bad = official.copy()
    bad[5, 0] = 0.5
    with pytest.raises(ValueError, match=rf"row {rows[5]!r} has pretrained coefficient 0.5, not 1"):
        cf.from_official(bad, layer, leftovers, names)


def hf_tensors(tree):
    return ck.hf_state_dict(tree, None, "vision")


def merged_tree(theta0, tau, coefficients):
    return jax.tree_util.tree_map(np.asarray, am.merge(theta0, tau, coefficients))


def test_layouts_merge_as_their_codes_do(tower):
    """θ from our merge with λ read from each layout equals, tensor by tensor in HF names, FusionBench's
    θ0[j] + Σ_k w[k, j] τ_k[j] and the official Σ_i lambdas[j, i] · paramslist_i[j] (θ0, then τ_1..τ_K)."""
    _, vision, names = tower
    rng = np.random.default_rng(4)
    finetuned = [jax.tree_util.tree_map(lambda a: a + rng.normal(0, 0.1, a.shape).astype(np.float32), vision)
                 for _ in range(K)]
    tau = am.task_vectors(vision, finetuned)
    like = am.init_coefficients(vision, K, granularity="layer", stacked=clip.stacked)
    w = rng.uniform(0, 1, (K, len(names.order))).astype(np.float32)
    theta0_hf = hf_tensors(vision)
    tau_hf = [hf_tensors(jax.tree_util.tree_map(lambda t, k=k: np.asarray(t[k]), tau)) for k in range(K)]

    merged = hf_tensors(merged_tree(vision, tau, cf.from_fusionbench(w, like, names.order, names)))
    for j, name in enumerate(names.order):
        want = theta0_hf[name] + sum(w[k, j] * tau_hf[k][name] for k in range(K))
        np.testing.assert_allclose(merged[name], want, rtol=0, atol=1e-6, err_msg=name)

    official = np.concatenate([np.ones((len(names.order), 1), np.float32), w.T], axis=1)
    merged = hf_tensors(merged_tree(vision, tau, cf.from_official(official, like, names.order, names)))
    params_hf = [theta0_hf, *tau_hf]  # the official paramslist: θ0, then the task vectors
    for j, name in enumerate(names.order):
        want = sum(official[j, i] * params_hf[i][name] for i in range(1 + K))
        np.testing.assert_allclose(merged[name], want, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("suffix", ["json", "safetensors"])
def test_named_files_round_trip_exactly(tmp_path, tower, suffix):
    _, vision, names = tower
    lam = random_coefficients(vision, "layer", seed=5)
    named = cf.named_coefficients(lam, names)
    write, read = {"json": (cf.write_named_json, cf.read_named_json),
                   "safetensors": (cf.write_named_safetensors, cf.read_named_safetensors)}[suffix]
    path = tmp_path / f"lambdas.{suffix}"
    write(path, named)
    assert os.listdir(tmp_path) == [path.name]
    assert read(path) == named
    assert_same(cf.coefficients_from_named(read(path), lam, names), lam)


def test_fusionbench_torch_file_reads_without_torch_load(tmp_path, tower):
    """A file written as FusionBench's save_merging_weights writes it (torch.save of the tensor) reads back
    through the restricted reader; a .npy too."""
    torch = pytest.importorskip("torch")
    _, vision, names = tower
    lam = random_coefficients(vision, "layer", seed=6)
    weights = torch.nn.Parameter(torch.from_numpy(cf.to_fusionbench(lam, names.order, names)))
    torch.save(weights.detach().cpu(), tmp_path / "merging_weights.pt")
    read = cf.read_fusionbench(tmp_path / "merging_weights.pt")
    np.testing.assert_array_equal(read, weights.detach().numpy())
    assert_same(cf.from_fusionbench(read, lam, names.order, names), lam)
    np.save(tmp_path / "w.npy", read)
    np.testing.assert_array_equal(cf.read_fusionbench(tmp_path / "w.npy"), read)
    torch.save({"not": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="dict.pt"):
        cf.read_fusionbench(tmp_path / "dict.pt")


def test_errors_name_the_tensor(tmp_path, tower):
    _, vision, names = tower
    lam = random_coefficients(vision, "layer", seed=7)
    named = cf.named_coefficients(lam, names)
    missing = dict(named)
    del missing["vision_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match="layers.1.mlp.fc2.bias"):
        cf.coefficients_from_named(missing, lam, names)
    with pytest.raises(ValueError, match="vision_model.typo"):
        cf.coefficients_from_named({**named, "vision_model.typo": [0.0] * K}, lam, names)
    short = {**named, "vision_model.pre_layrnorm.bias": [0.1, 0.2]}
    with pytest.raises(ValueError, match="pre_layrnorm.bias.*K = 3"):
        cf.coefficients_from_named(short, lam, names)
    task = am.init_coefficients(vision, K, granularity="task")
    with pytest.raises(ValueError, match="shares its coefficient"):
        cf.coefficients_from_named(named, task, names)
    with pytest.raises(ValueError, match=r"expected \[K, n\] = \(3, 39\)"):
        cf.from_fusionbench(np.zeros((K + 1, 39)), lam, names.order, names)
    with pytest.raises(ValueError, match="pre_layrnorm.bias"):
        cf.write_named_json(tmp_path / "x.json", short)
    (tmp_path / "bad.json").write_text('{"a": [1, "x"]}')
    with pytest.raises(ValueError, match="tensor 'a'"):
        cf.read_named_json(tmp_path / "bad.json")
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]
    without_leaf = {e: n for e, n in names.items() if e[0] != "post_ln/bias"}
    with pytest.raises(KeyError, match="post_ln/bias"):
        cf.named_coefficients(lam, cf.TensorNames(without_leaf, names.order))
    without_layer = {e: n for e, n in names.items() if e != ("layers/attn/k/kernel", 0)}
    with pytest.raises(ValueError, match=r"layers/attn/k/kernel.*layers 0\.\.1"):
        cf.named_coefficients(lam, cf.TensorNames(without_layer, names.order))


def test_fused_tensor_names_need_agreeing_lambdas(tower):
    """Two leaves named as one tensor (a fused checkpoint tensor): allowed when their λ agree."""
    _, vision, names = tower
    fused = cf.TensorNames({**dict(names.items()), ("post_ln/bias", None): "vision_model.post_layernorm.weight"},
                           names.order)
    tied = random_coefficients(vision, lambda p: "post_ln" if p.startswith("post_ln") else p, seed=8)
    named = cf.named_coefficients(tied, fused)
    assert "vision_model.post_layernorm.bias" not in named
    assert_same(cf.coefficients_from_named(named, tied, fused), tied)
    with pytest.raises(ValueError, match="post_layernorm.weight.*several entries"):
        cf.named_coefficients(random_coefficients(vision, "layer", seed=8), fused)


def test_written_lambdas_are_finite_and_read_lambdas_checked(tmp_path, tower):
    """A λ file is valid JSON (never NaN / Infinity): a non-finite λ is refused, naming the tensor and task,
    before anything is written; read back, every format refuses one the same way, and one past the bound."""
    _, vision, names = tower
    lam = random_coefficients(vision, "layer", seed=9)
    named = cf.named_coefficients(lam, names)
    bad = {**named, "vision_model.post_layernorm.bias": [0.1, float("nan"), 0.2]}
    for write in (cf.write_named_json, cf.write_named_safetensors):
        with pytest.raises(ValueError, match=r"tensor 'vision_model.post_layernorm.bias': λ of task 1 is nan"):
            write(tmp_path / "lambdas", bad)
    assert os.listdir(tmp_path) == []
    (tmp_path / "nan.json").write_text(json.dumps(bad))  # Python's json writes NaN, which is not JSON
    with pytest.raises(ValueError, match=r"post_layernorm.bias': λ of task 'b' is nan"):
        cf.coefficients_from_named(cf.read_named_json(tmp_path / "nan.json"), lam, names, tasks=["a", "b", "c"])
    far = np.full((K, len(names.order)), 0.3)
    far[2, 5] = -2000.0
    with pytest.raises(ValueError, match=rf"tensor {names.order[5]!r}: λ of task 'c' is -2000.0, beyond ±1000"):
        cf.from_fusionbench(far, lam, names.order, names, tasks="abc", bound=1000.0)
    written = cf.named_coefficients(lam, names)
    cf.write_named_json(tmp_path / "ok.json", written)
    assert "NaN" not in (tmp_path / "ok.json").read_text() and "Infinity" not in (tmp_path / "ok.json").read_text()


# ------------------------------------------------------------------------ the official open_clip λ layout

# The task_vectors ImageEncoder's state dict as the official scripts enumerate it (open_clip's CLIP with its
# text transformer deleted): the CLIP's own text-side parameters, the visual tower (its own parameters
# before its modules), the text-side modules left.
OPEN_CLIP_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                   "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias"]
TEXT_SIDE = {"model.positional_embedding": (77, 24), "model.text_projection": (24, 16), "model.logit_scale": (),
             "model.token_embedding.weight": (50, 24), "model.ln_final.weight": (24,), "model.ln_final.bias": (24,)}


def open_clip_order(layers):
    visual = ["class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight", "ln_pre.bias",
              *[f"transformer.resblocks.{i}.{name}" for i in range(layers) for name in OPEN_CLIP_BLOCK],
              "ln_post.weight", "ln_post.bias"]
    return [*list(TEXT_SIDE)[:3], *[f"model.visual.{name}" for name in visual], *list(TEXT_SIDE)[3:]]


def image_encoder_state(vision_state, rng, noise=0.0):
    """An ImageEncoder state dict (names model.*) from the fixture's open_clip visual tensors, with a
    projection and text-side tensors; ``noise`` perturbs every tensor (a fine-tuned model)."""
    state = {f"model.{name}": value for name, value in vision_state.items()}
    state["model.visual.proj"] = np.random.default_rng(0).normal(0, 0.1, (32, 16)).astype(np.float32)
    state.update({name: np.random.default_rng(1).normal(0, 0.1, shape).astype(np.float32)
                  for name, shape in TEXT_SIDE.items()})
    return {name: (value + rng.normal(0, noise, np.shape(value))).astype(np.float32) for name, value in state.items()}


def test_official_open_clip_lambdas_merge_as_the_official_code(tower):
    """An official layer-wise λ file in the ImageEncoder's state-dict order (rows 0-2 and the last 3 the
    never-trained text side at 0.3) read by the rows `official_coefficient_rows` declares, merged by us, equals the
    official merge Σ_i lambdas[j, i] · paramslist_i[j] (θ0, then τ_1..τ_K) written out in numpy, tensor by
    tensor of the image tower (the fused in_proj row scaling q, k and v); the projection, outside the merged
    tower, stays θ0's. A trained text-side row or a short file is refused."""
    from test_bad_inputs_clip import open_clip_state

    config, _, names = tower
    rng = np.random.default_rng(10)
    theta0 = image_encoder_state(open_clip_state(), rng)
    finetuned = [image_encoder_state(open_clip_state(), rng, noise=0.05) for _ in range(K)]
    order = open_clip_order(config.vision.layers)
    rows = ck.official_coefficient_rows(config)
    assert list(rows.names) == order and len(order) == 6 + 8 + 12 * config.vision.layers
    official = np.concatenate([np.ones((len(order), 1)), rng.uniform(0, 1, (len(order), K))], 1).astype(np.float32)
    for j, name in enumerate(order):
        if name in TEXT_SIDE:
            official[j, 1:] = 0.3

    paramslist = [theta0, *[{n: ft[n] - theta0[n] for n in order} for ft in finetuned]]
    official_merged = {name: sum(official[j, i] * paramslist[i][name] for i in range(1 + K))
                       for j, name in enumerate(order)}

    load = lambda state: ck.params_from_open_clip({n.removeprefix("model."): v for n, v in state.items()},
                                                  head_width=16)
    _, pretrained = load(theta0)
    tau = am.task_vectors(pretrained["vision"], [load(ft)[1]["vision"] for ft in finetuned])
    like = am.init_coefficients(pretrained["vision"], K, "layer", stacked=clip.stacked)
    ours = merged_tree(pretrained["vision"], tau, cf.from_official(official, like, rows, names, tasks="abc"))
    _, want = load(official_merged)
    for (path, a), (_, b) in zip(am.core.trees.named_leaves(ours), am.core.trees.named_leaves(want["vision"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=path)
    assert "visual_projection" not in ours

    trained = official.copy()
    trained[order.index("model.ln_final.bias"), 3] = 0.5
    with pytest.raises(ValueError, match="row 'model.ln_final.bias', which the official code never trains"):
        cf.from_official(trained, like, rows, names)
    nan = official.copy()
    nan[order.index("model.visual.proj"), 2] = np.nan
    with pytest.raises(ValueError, match="official λ: row 'model.visual.proj': λ of task 'b' is nan"):
        cf.from_official(nan, like, rows, names, tasks="abc")
    with pytest.raises(ValueError, match=r"expected \[n, 1 \+ K\]"):
        cf.from_official(official[:-1], like, rows, names)
