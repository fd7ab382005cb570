"""Make the small CLIP fixtures of tests/fixtures/clip/ with transformers' torch CLIP (needs torch).

    python scripts/make_clip_fixtures.py [--out tests/fixtures/clip]

Writes, from a seeded random ``CLIPModel`` of the "Ti/8" size (every tensor drawn at random, biases and
LayerNorm gains included, so a mis-mapped tensor cannot hide behind a zero or a one):

    ti8/model.safetensors, ti8/config.json   the checkpoint as ``CLIPModel.save_pretrained`` writes it
    ti8/vocab.json, ti8/merges.txt           a small byte-level BPE vocabulary (512 byte tokens, 20 merges,
                                             <|startoftext|>, <|endoftext|>) in the openai/clip-vit-* layout
    ti8/expected.npz                         inputs and torch outputs: vision tower, projections, text tower,
                                             logits, and a zero-shot head built the CLIP way in torch
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

MERGES = ["t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "d o",
          "do g</w>", "a r</w>", "c ar</w>", "i n", "in g</w>", "a n", "an d</w>", "r e", "e d</w>", "r ed</w>"]
SENTENCES = ["a photo of the cat.", "the red dog and the car!", "x", "phot photo photos of things, 123"]
HEAD_CLASSNAMES = ["cat", "dog", "red car"]
HEAD_TEMPLATES = ["a photo of a {c}.", "the {c}!", "{c}"]
CONTEXT_LENGTH = 32


def byte_tokens() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_vocab() -> dict[str, int]:
    tokens = byte_tokens()
    tokens = tokens + [t + "</w>" for t in tokens] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def random_clip(vocab_size: int) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    layer_norm_gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for tensor in model.parameters():
        tensor.copy_((1.0 if id(tensor) in layer_norm_gains else 0.0) + 0.2 * torch.randn_like(tensor))
    model.logit_scale.fill_(2.3)
    return model


def features(output: object) -> np.ndarray:
    """The projected, unnormalised embeddings of ``get_{image,text}_features`` (a tensor, or in transformers 5
    an output object whose ``pooler_output`` holds them)."""
    return getattr(output, "pooler_output", output).numpy()


def zero_shot_head(model: transformers.CLIPModel, tokenizer: transformers.CLIPTokenizer) -> np.ndarray:
    """CLIP zero-shot head: per class, mean of the L2-normalised prompt embeddings, renormalised, × exp(s)."""
    rows = []
    for classname in HEAD_CLASSNAMES:
        prompts = [t.format(c=classname) for t in HEAD_TEMPLATES]
        ids = tokenizer(prompts, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids
        embeds = torch.from_numpy(features(model.get_text_features(input_ids=ids)))
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        mean = embeds.mean(dim=0)
        rows.append(mean / mean.norm())
    return (torch.stack(rows) * model.logit_scale.exp()).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "clip"))
    out = os.path.join(parser.parse_args().out, "ti8")
    torch.set_grad_enabled(False)
    os.makedirs(out, exist_ok=True)

    vocab = tiny_vocab()
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES])

    model = random_clip(len(vocab))
    model.save_pretrained(out)
    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    input_ids = tokenizer(SENTENCES, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                          return_tensors="np").input_ids
    vision = model.vision_model(pixel_values=torch.from_numpy(pixel_values))
    text = model.text_model(input_ids=torch.from_numpy(input_ids))
    both = model(pixel_values=torch.from_numpy(pixel_values), input_ids=torch.from_numpy(input_ids))
    np.savez_compressed(
        os.path.join(out, "expected.npz"),
        pixel_values_nchw=pixel_values, input_ids=input_ids.astype(np.int32),
        vision_last_hidden_state=vision.last_hidden_state.numpy(), vision_pooled=vision.pooler_output.numpy(),
        image_embeds=features(model.get_image_features(pixel_values=torch.from_numpy(pixel_values))),
        text_last_hidden_state=text.last_hidden_state.numpy(), text_pooled=text.pooler_output.numpy(),
        text_embeds=features(model.get_text_features(input_ids=torch.from_numpy(input_ids))),
        logits_per_image=both.logits_per_image.numpy(),
        head_classnames=np.array(HEAD_CLASSNAMES), head_templates=np.array(HEAD_TEMPLATES),
        zero_shot_head=zero_shot_head(model, tokenizer),
    )
    print(f"wrote {out} (torch {torch.__version__}, transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
