from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2TokenizerFast

from capdec.tokenizer import (
    END_OF_TEXT,
    PAD,
    encode_captions,
    load_tokenizer,
    pad_batch,
    train_caption_tokenizer,
)

CAPTIONS = [
    f"A {color} {thing} {verb} {place}."
    for color in ("red", "blue", "green", "black", "white")
    for thing in ("dog", "cat", "bus", "man", "bird")
    for verb in ("sits on", "walks past", "looks at")
    for place in ("the grass", "a table", "the street")
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_caption_tokenizer(CAPTIONS, vocab_size=320)


def test_special_ids_differ_and_never_encode(tokenizer) -> None:
    assert tokenizer.eos_token == END_OF_TEXT
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token == PAD
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    encoded = tokenizer(CAPTIONS + ["an unseen zebra, 42 times!"], add_special_tokens=False)
    used = {token for ids in encoded["input_ids"] for token in ids}
    assert tokenizer.eos_token_id not in used
    assert tokenizer.pad_token_id not in used


def test_trained_tokenizer_decodes_readable_text(tokenizer) -> None:
    ids = tokenizer("A black dog looks at the street.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "a black dog looks at the street."
    # merges learned from the captions make common words single tokens
    assert len(ids) < len("a black dog looks at the street.") / 2


def test_trained_tokenizer_is_deterministic(tokenizer) -> None:
    again = train_caption_tokenizer(CAPTIONS, vocab_size=320)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) <= 320


def test_trained_tokenizer_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        train_caption_tokenizer(CAPTIONS, vocab_size=100)


def test_encode_appends_eos(tokenizer) -> None:
    token_lists, num_truncated = encode_captions(tokenizer, ["a dog", "a red cat"], max_tokens=40)
    plain = tokenizer(["a dog", "a red cat"], add_special_tokens=False)["input_ids"]
    assert token_lists == [
        [*plain[0], tokenizer.eos_token_id],
        [*plain[1], tokenizer.eos_token_id],
    ]
    assert num_truncated == 0


def test_encode_truncates_and_counts(tokenizer) -> None:
    long_caption = "a red dog sits on the grass near a blue bus on the street"
    token_lists, num_truncated = encode_captions(tokenizer, [long_caption, "a dog"], max_tokens=4)
    plain = tokenizer(long_caption, add_special_tokens=False)["input_ids"]
    assert num_truncated == 1
    assert token_lists[0] == [*plain[:3], tokenizer.eos_token_id]
    assert token_lists[1][-1] == tokenizer.eos_token_id


def test_encode_keeps_caption_that_fits_exactly(tokenizer) -> None:
    plain = tokenizer("a dog", add_special_tokens=False)["input_ids"]
    token_lists, num_truncated = encode_captions(tokenizer, ["a dog"], max_tokens=len(plain) + 1)
    assert token_lists == [[*plain, tokenizer.eos_token_id]]
    assert num_truncated == 0


def test_encode_rejects_max_tokens_below_two(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        encode_captions(tokenizer, ["a dog"], max_tokens=1)


def test_encode_empty_list(tokenizer) -> None:
    assert encode_captions(tokenizer, [], max_tokens=8) == ([], 0)


def test_pad_batch_pads_to_batch_max() -> None:
    tokens, mask = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=1)
    assert tokens.dtype == torch.long
    assert mask.dtype == torch.bool
    assert torch.equal(tokens, torch.tensor([[5, 6, 7], [8, 1, 1], [9, 10, 1]]))
    assert mask.sum(dim=1).tolist() == [3, 1, 2]
    assert torch.equal(tokens[~mask], torch.ones(3, dtype=torch.long))


def test_pad_batch_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="at least one token list"):
        pad_batch([], pad_id=1)
    with pytest.raises(ValueError, match="token list 1 is empty"):
        pad_batch([[3], []], pad_id=1)


def _saved_gpt2_tokenizer(folder: Path) -> Path:
    """Save a GPT-2 style tokenizer (byte-level BPE, eos only, no pad), built without network."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CAPTIONS, trainer)
    gpt2 = GPT2TokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )
    gpt2.save_pretrained(folder)
    return folder


def test_load_tokenizer_adds_pad_to_gpt2_tokenizer(tmp_path: Path) -> None:
    folder = _saved_gpt2_tokenizer(tmp_path / "gpt2-like")
    size_on_disk = len(GPT2TokenizerFast.from_pretrained(folder))
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token == PAD
    assert len(loaded) == size_on_disk + 1
    assert loaded.pad_token_id == size_on_disk
    assert loaded.pad_token_id != loaded.eos_token_id
    ids = loaded("a red dog sits on the grass.", add_special_tokens=False)["input_ids"]
    assert loaded.pad_token_id not in ids
    assert loaded.decode(ids) == "a red dog sits on the grass."
    assert (
        loaded.decode([*ids, loaded.pad_token_id], skip_special_tokens=True)
        == "a red dog sits on the grass."
    )


def test_load_tokenizer_keeps_existing_pad(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert len(loaded) == len(tokenizer)
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert encode_captions(loaded, CAPTIONS, 40) == encode_captions(tokenizer, CAPTIONS, 40)


def test_load_tokenizer_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*save_pretrained"):
        load_tokenizer(str(tmp_path / "absent"))
