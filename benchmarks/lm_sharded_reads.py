#!/usr/bin/env python3
"""Host memory and bytes read while 2 processes load θ0 of a Llama onto one 1 × 8 fsdp mesh.

Each of 2 CPU processes under `jax.distributed` (4 simulated devices each, coordinator on 127.0.0.1) loads the
same float32 checkpoint (hidden 1024, 4 layers, MLP 2816, vocabulary 32,000: 451 MB) in one of two ways:

- ``sharded``: `models.sharded_reads.read_pretrained`, each process reading only its devices' slices;
- ``whole``: `llama_checkpoint.load_hf_causal_lm`, then `core.parallel.place_tree` (the load before sharded
  reads: every process reads every tensor).

Per process it reports the bytes read from the checkpoint and the rise of the peak resident memory
(``VmHWM``) over the resident memory before loading. On CPU devices the shards are themselves host memory,
so the sharded peak is this process's shards (half the model) plus the loading buffer (module docstring of
`models.sharded_reads`: the slices of one leaf for the local devices while they are placed).

Example:
    python benchmarks/lm_sharded_reads.py            # about a minute on 2 cores
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_PER_PROCESS = 2, 4
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16,
              num_kv_heads=8, head_dim=64)


def write_model(folder: Path) -> None:
    """A random float32 Llama of `CONFIG` as an HF folder (config.json, model.safetensors)."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from adamerging_jax.models import llama
    from adamerging_jax.models.llama_checkpoint import hf_config, hf_state_dict

    config = llama.LlamaConfig(**CONFIG)
    params = jax.tree_util.tree_map(np.asarray, llama.init_params(config, jax.random.PRNGKey(0)))
    folder.mkdir()
    save_file(hf_state_dict(params, config), str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(config, [np.float32])))


def worker(mode: str, address: str, process_id: int, folder: str) -> None:
    """One process: load θ0 `mode`-wise onto the global mesh and print one JSON line of what it cost."""
    import jax

    jax.distributed.initialize(coordinator_address=address, num_processes=PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    from adamerging_jax.core.parallel import make_mesh, place_tree
    from adamerging_jax.models.llama_checkpoint import load_hf_causal_lm
    from adamerging_jax.models.sharded_reads import SliceReader, read_pretrained

    mesh = make_mesh(1, PROCESSES * DEVICES_PER_PROCESS)
    before = status_bytes("VmRSS")
    if mode == "sharded":
        reader = SliceReader(folder)
        tree = read_pretrained(reader, mesh, True)
        read = reader.bytes_read
    else:
        _, params = load_hf_causal_lm(folder)
        tree = place_tree(params, mesh, True)
        read = os.path.getsize(os.path.join(folder, "model.safetensors"))
    jax.block_until_ready(tree)
    peak = status_bytes("VmHWM")  # not ru_maxrss: after fork + exec it keeps the parent's peak
    print(json.dumps({"mode": mode, "process": process_id, "read_MB": round(read / 1e6, 1),
                      "peak_rise_MB": round((peak - before) / 1e6, 1)}), flush=True)
    jax.distributed.shutdown()


def status_bytes(field: str) -> int:
    """A memory field of this process's /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as status:
        return int(status.read().split(f"{field}:")[1].split()[0]) * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, folder: Path) -> list[dict]:
    """Both processes of one mode; their JSON lines."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"}
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, __file__, mode, address, str(i), str(folder)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(PROCESSES)]
    lines = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, lines):
        if p.returncode:
            raise RuntimeError(f"a {mode} worker exited with {p.returncode}: {out[-2000:]}")
    return [json.loads(line) for out in lines for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "model")
        write_model(folder)
        print(f"checkpoint: {os.path.getsize(folder / 'model.safetensors') / 1e6:.1f} MB of float32")
        print("| load | process | read (MB) | peak RSS rise (MB) |\n|---|---|---|---|")
        for mode in ("sharded", "whole"):
            for row in run(mode, folder):
                print(f"| {row['mode']} | {row['process']} | {row['read_MB']} | {row['peak_rise_MB']} |")


if __name__ == "__main__":
    if len(sys.argv) == 5:
        worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
