"""Memory-lean modes, measured on the compiled step (XLA's buffer assignment, `memory_analysis()`).

- `accumulate="per_task"`: one task's activations alive at a time, so the step's temporary memory is close to
  one task's activations, not K tasks' (the fused step's).
- `shard_task_vectors=True`: θ0 and τ split over the mesh, each device holds 1/D of them.

A model whose activations dwarf its parameters: 4 tasks × 2048 examples through 4 residual tanh blocks of
width 256 (each task's saved activations ≈ 2048 · 256 · 4 B · 12 ≈ 24 MiB; parameters 1 MiB per copy).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import adamerging_jax as am
from adamerging_jax.core.parallel import batch_sharding, data_mesh, parameter_sharding, replicated

K, EXAMPLES, WIDTH, BLOCKS = 4, 2048, 256, 4


def apply(params, x, task):
    h = x
    for i in range(BLOCKS):
        h = h + jnp.tanh(jnp.tanh(h @ params[f"w{i}"]) @ params[f"w{i}"].T)
    return h[:, task : task + 8]


def shapes(mesh, shard):
    def place(shape, skip):
        sharding = parameter_sharding(mesh, shape, skip) if shard else replicated(mesh)
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

    pretrained = {f"w{i}": place((WIDTH, WIDTH), 0) for i in range(BLOCKS)}
    tau = {f"w{i}": place((K, WIDTH, WIDTH), 1) for i in range(BLOCKS)}
    batches = [jax.ShapeDtypeStruct((EXAMPLES, WIDTH), jnp.float32, sharding=batch_sharding(mesh)) for _ in range(K)]
    return pretrained, tau, batches


def compiled_memory(accumulate, mesh, shard=False):
    config = am.AdaMergingConfig(accumulate=accumulate, clamp=None, shard_task_vectors=shard)
    pretrained, tau, batches = shapes(mesh, shard)
    lam = am.init_coefficients({f"w{i}": np.zeros((WIDTH, WIDTH)) for i in range(BLOCKS)}, K)
    step = jax.jit(am.make_step(apply, config.make_optimizer(), config))
    return step.lower(lam, config.make_optimizer().init(lam), pretrained, tau, batches).compile().memory_analysis()


def test_per_task_accumulation_keeps_one_task_of_activations():
    mesh = data_mesh(jax.devices()[:1])
    fused = compiled_memory("fused", mesh).temp_size_in_bytes
    per_task = compiled_memory("per_task", mesh).temp_size_in_bytes
    one_task_activations = EXAMPLES * WIDTH * 4 * 3 * BLOCKS  # h, tanh, tanh per block, float32
    print(f"temp MiB: fused {fused / 2**20:.1f}, per_task {per_task / 2**20:.1f}")
    assert fused > K * one_task_activations * 0.9  # the fused step holds every task's activations
    assert per_task < fused / 2  # per-task holds about one task's (plus merged θ and its gradient)
    assert per_task < 2 * one_task_activations


def test_sharded_task_vectors_divide_the_arguments_over_devices():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = data_mesh(devices)
    replicated_args = compiled_memory("per_task", mesh).argument_size_in_bytes
    sharded_args = compiled_memory("per_task", mesh, shard=True).argument_size_in_bytes
    params = (1 + K) * BLOCKS * WIDTH * WIDTH * 4
    others = replicated_args - params  # λ, Adam's state, each device's share of the batches
    assert sharded_args == others + params // len(devices)
