"""Make the tiny decoder-LM fixtures of tests/fixtures/llama/ with transformers' torch models (needs torch).

    python scripts/make_llama_fixtures.py [--out tests/fixtures/llama]

Writes two seeded random checkpoints in which every tensor is drawn at random (RMSNorm gains around 1,
biases and weights around 0), so a mis-mapped tensor cannot hide behind a zero or a one:

    llama/   ``LlamaForCausalLM``: GQA (4 query heads, 2 key/value heads), head_dim 16 ≠ hidden/heads,
             Llama 3.1 RoPE scaling (θ = 500000, the three frequency regimes all present), attention and
             MLP biases, untied LM head
    qwen2/   ``Qwen2ForCausalLM``: GQA (4 query heads, 1 key/value head), q/k/v biases, tied embeddings

each as ``save_pretrained`` writes it (config.json, model.safetensors) plus ``expected.npz``: a batch of
token ids with full, left-padded and right-padded rows, its attention mask, the position ids given to torch
(the count of attended tokens before each token) and torch's float32 logits (eager attention).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import transformers

LENGTH = 12


def llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 2.0,
                         "high_freq_factor": 16.0, "original_max_position_embeddings": 128})


def qwen2_config() -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=3)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn: RMSNorm gains 1 + 0.2 N(0, 1), everything else 0.2 N(0, 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            offset = 1.0 if "norm" in name else 0.0
            tensor.copy_(offset + 0.2 * torch.randn_like(tensor))
    return model.eval()


def batch(vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four rows of LENGTH tokens: full, left-padded by 4, right-padded by 5, left-padded by 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab_size, size=(4, LENGTH)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, LENGTH - 5:] = 0
    mask[3, :1] = 0
    ids[mask == 0] = 0  # the pad id
    return ids, mask


def write(model: transformers.PreTrainedModel, directory: str, seed: int) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    ids, mask = batch(model.config.vocab_size, seed)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(positions)).logits.numpy()
    np.savez(os.path.join(directory, "expected.npz"), input_ids=ids.astype(np.int32),
             attention_mask=mask.astype(np.int32), position_ids=positions.astype(np.int32), logits=logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "llama"))
    args = parser.parse_args()
    makers = {"llama": (transformers.LlamaForCausalLM, llama_config),
              "qwen2": (transformers.Qwen2ForCausalLM, qwen2_config)}
    for seed, (name, (model_class, make_config)) in enumerate(makers.items()):
        config = make_config()
        config._attn_implementation = "eager"
        model = randomised(model_class(config), seed)
        write(model, os.path.join(args.out, name), seed)
        print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
