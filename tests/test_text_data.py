"""Prompt files, tokenization with a checkpoint's tokenizer, buckets, and the resumable per-step text batches."""
import json

import numpy as np
import pytest

from adamerging_jax.data import text

WORDS = "the a cat dog sat on mat red blue big small ran fast slow".split()


def write_tokenizer(directory):
    """A whitespace word-level tokenizer saved as an HF fast tokenizer (tokenizer.json + tokenizer_config.json):
    ids 0 <pad>, 1 <s> (prepended to every prompt), 2 </s>, 3 <unk>, then WORDS in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return str(directory)


def word_ids(prompt):
    """The ids the tokenizer above must give, computed from WORDS directly."""
    return [1] + [4 + WORDS.index(w) if w in WORDS else 3 for w in prompt.split()]


def test_read_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("the cat\n\n   \nsat on the mat\r\nred\n", encoding="utf-8")
    assert text.read_prompts(path) == ["the cat", "sat on the mat", "red"]


def test_read_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "the cat", "x": 1}), "", json.dumps({"prompt": "a dog"})]))
    assert text.read_prompts(path, field="prompt") == ["the cat", "a dog"]
    with pytest.raises(ValueError, match="field"):
        text.read_prompts(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'prompt'"):
        text.read_prompts(bad, field="prompt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        text.read_prompts(empty)


def test_bucket_lengths():
    assert text.bucket_lengths(100) == (16, 32, 64, 100)
    assert text.bucket_lengths(64, 8) == (8, 16, 32, 64)
    assert text.bucket_lengths(5, 5) == (5,)
    assert text.bucket_lengths(20, 3) == (4, 8, 16, 20)
    with pytest.raises(ValueError):
        text.bucket_lengths(4, 8)


def test_tokenize_with_the_checkpoint_tokenizer_and_truncation_warning(tmp_path):
    tokenizer = text.load_tokenizer(write_tokenizer(tmp_path / "tok"))
    prompts = ["the cat sat", "a big red dog ran fast on the mat", "zebra"]
    with pytest.warns(UserWarning, match="1 of 3 prompts are longer than 6 tokens"):
        ids = text.tokenize_prompts(prompts, tokenizer, max_length=6)
    assert [list(i) for i in ids] == [word_ids(p)[:6] for p in prompts]
    assert all(i.dtype == np.int32 for i in ids)


def test_pad_sequences_both_sides():
    sequences = [np.array([5, 6, 7]), np.array([8])]
    right = text.pad_sequences(sequences, 4, pad_id=0)
    np.testing.assert_array_equal(right["input_ids"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    left = text.pad_sequences(sequences, 4, pad_id=9, padding_side="left")
    np.testing.assert_array_equal(left["input_ids"], [[9, 5, 6, 7], [9, 9, 9, 8]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert right["input_ids"].dtype == np.int32 and right["attention_mask"].dtype == np.int32


def make_tasks():
    rng = np.random.default_rng(0)
    return [[rng.integers(4, 18, size=rng.integers(1, 30)).astype(np.int32) for _ in range(n)] for n in (7, 23)]


def test_batches_shapes_buckets_and_content():
    tasks = make_tasks()
    source = text.TextBatches(tasks, batch_size=4, n_batches=2, seed=3, buckets=(8, 16, 32), pad_id=0)
    lengths = set()
    for step in range(6):
        batches = source(step)
        assert len(batches) == 2
        indices = source.indices(step)
        longest = max(len(tasks[t][i]) for t in range(2) for i in indices[t])
        for t, batch in enumerate(batches):
            n, length = batch["input_ids"].shape
            assert n == 8 and batch["attention_mask"].shape == (n, length)
            assert length == min(b for b in (8, 16, 32) if b >= longest)
            for row, i in enumerate(indices[t]):  # each row is the chosen prompt, right-padded
                k = len(tasks[t][i])
                np.testing.assert_array_equal(batch["input_ids"][row, :k], tasks[t][i])
                assert batch["attention_mask"][row].sum() == k and (batch["input_ids"][row, k:] == 0).all()
            lengths.add(length)
    assert lengths <= {8, 16, 32}


def test_batches_are_a_pure_function_of_seed_and_step():
    tasks = make_tasks()
    a = text.TextBatches(tasks, batch_size=4, seed=1, buckets=(32,))
    b = text.TextBatches(tasks, batch_size=4, seed=1, buckets=(32,))
    later = [a(s) for s in range(5)]
    resumed = b(3)  # a fresh source asked for step 3 directly gives what the run saw at step 3
    for x, y in zip(later[3], resumed):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    other_seed = text.TextBatches(tasks, batch_size=4, seed=2, buckets=(32,))
    assert not np.array_equal(other_seed.indices(0), a.indices(0))


def test_every_prompt_seen_once_per_epoch():
    tasks = make_tasks()
    source = text.TextBatches(tasks, batch_size=1, seed=0, buckets=(32,))
    seen = np.concatenate([source.indices(s)[1] for s in range(23)])  # task 1 has 23 prompts
    assert sorted(seen) == list(range(23))


def test_batches_errors():
    tasks = make_tasks()
    with pytest.raises(ValueError, match="task 1: a prompt has 28 tokens, more than the largest bucket 27"):
        text.TextBatches([[np.ones(5)], tasks[1]], buckets=(16, 27))
    with pytest.raises(ValueError, match="task 0: no prompts"):
        text.TextBatches([[]], buckets=(16,))


def test_from_files(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("the cat sat\nred dog\n\nbig blue mat\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"q": p}) for p in ["a cat ran", "slow", "fast dog"]))
    with pytest.raises(ValueError, match="field"):
        text.TextBatches.from_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer)
    source = text.TextBatches.from_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer, field="q",
                                         max_length=16, min_length=4, batch_size=2, seed=5, padding_side="left")
    assert source.buckets == (4, 8, 16) and source.pad_id == 0
    assert [list(s) for s in source.tasks[0]] == [word_ids(p) for p in ["the cat sat", "red dog", "big blue mat"]]
    batches = source(0)
    assert batches[1]["input_ids"].shape == (2, 4)
    assert (batches[1]["attention_mask"][:, -1] == 1).all()  # left padding: the last token is real
