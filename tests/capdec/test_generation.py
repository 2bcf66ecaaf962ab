from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from capdec.config import ModelConfig
from capdec.generation import (
    decode_captions,
    generate_captions,
    generate_captions_reference,
    generate_token_ids,
    generate_token_ids_reference,
)
from capdec.model import ClipCaptionModel, build_tokenizer, load_decoder

CAPTIONS = [
    f"a {color} {thing} {verb} {place}."
    for color in ("red", "blue", "green", "black", "white", "small", "large")
    for thing in ("dog", "cat", "bus", "train", "man", "woman", "bird")
    for verb in ("sits on", "stands near", "walks past", "looks at")
    for place in ("the grass", "a table", "the street", "a beach", "the snow")
]
CONFIG = ModelConfig(
    tiny_vocab_size=300,
    tiny_width=32,
    tiny_heads=2,
    tiny_layers=2,
    prefix_length=4,
    max_caption_tokens=12,
)
CLIP_DIM = 16
NUM_IMAGES = 9
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CONFIG, CAPTIONS)


@pytest.fixture(scope="module")
def model(tokenizer) -> ClipCaptionModel:
    """A random float64 model whose greedy captions vary in length and content.

    At the default init scale a random GPT-2 repeats one token, so the weights are scaled up.
    The eos embedding is doubled so that eos wins at some steps. With this seed 6 of the 9
    greedy captions end early (after 0 to 11 tokens) and 3 run to MAX_NEW_TOKENS. float64 keeps the
    cached and uncached paths from flipping a near-tie argmax.
    """
    torch.manual_seed(0)
    model = ClipCaptionModel(load_decoder(CONFIG, tokenizer), clip_dim=CLIP_DIM, prefix_length=4)
    model = model.double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(5)
        model.decoder.get_input_embeddings().weight[tokenizer.eos_token_id] *= 2
    return model


@pytest.fixture(scope="module")
def embeddings() -> torch.Tensor:
    return torch.randn(
        NUM_IMAGES, CLIP_DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


@pytest.fixture(scope="module")
def reference_ids(model, tokenizer, embeddings) -> list[list[int]]:
    return generate_token_ids_reference(
        model, tokenizer, embeddings, max_new_tokens=MAX_NEW_TOKENS
    )


def test_reference_captions_vary_and_stop_at_eos(reference_ids) -> None:
    lengths = [len(ids) for ids in reference_ids]
    assert any(length < MAX_NEW_TOKENS for length in lengths)
    assert any(length == MAX_NEW_TOKENS for length in lengths)
    assert len({tuple(ids) for ids in reference_ids}) > NUM_IMAGES // 2


@pytest.mark.parametrize("batch_size", [1, 4, NUM_IMAGES, 64])
def test_batched_greedy_equals_reference(
    model, tokenizer, embeddings, reference_ids, batch_size: int
) -> None:
    batched = generate_token_ids(
        model, tokenizer, embeddings, batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS
    )
    assert batched == reference_ids


def test_generated_ids_exclude_special_tokens(model, tokenizer, embeddings) -> None:
    batched = generate_token_ids(
        model, tokenizer, embeddings, batch_size=4, max_new_tokens=MAX_NEW_TOKENS
    )
    used = {token for ids in batched for token in ids}
    assert tokenizer.eos_token_id not in used
    assert tokenizer.pad_token_id not in used


def test_captions_decode_token_ids(model, tokenizer, embeddings, reference_ids) -> None:
    captions = generate_captions(
        model, tokenizer, embeddings, batch_size=4, max_new_tokens=MAX_NEW_TOKENS
    )
    assert captions == decode_captions(tokenizer, reference_ids)
    assert captions == generate_captions_reference(
        model, tokenizer, embeddings, max_new_tokens=MAX_NEW_TOKENS
    )
    assert all(caption == caption.strip() for caption in captions)


def test_decode_skips_special_tokens(tokenizer) -> None:
    ids = tokenizer("a red dog", add_special_tokens=False)["input_ids"]
    assert decode_captions(
        tokenizer, [[*ids, tokenizer.pad_token_id], [tokenizer.eos_token_id]]
    ) == ["a red dog", ""]


def test_batched_beam_search_equals_reference(model, tokenizer, embeddings) -> None:
    rows = embeddings[:4]
    batched = generate_token_ids(
        model, tokenizer, rows, batch_size=3, max_new_tokens=MAX_NEW_TOKENS, num_beams=3
    )
    reference = generate_token_ids_reference(
        model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS, num_beams=3
    )
    assert len(batched) == 4
    assert len(reference) == 4
    assert all(len(ids) <= MAX_NEW_TOKENS for ids in batched + reference)
    assert all(tokenizer.eos_token_id not in ids for ids in batched + reference)
    assert batched == reference


def test_beam_captions_are_strings(model, tokenizer, embeddings) -> None:
    captions = generate_captions(
        model, tokenizer, embeddings, max_new_tokens=MAX_NEW_TOKENS, num_beams=2
    )
    assert len(captions) == NUM_IMAGES
    assert all(isinstance(caption, str) for caption in captions)


def test_generation_restores_training_mode(model, tokenizer, embeddings) -> None:
    model.train()
    model.decoder.eval()  # a frozen decoder kept in eval mode by the training loop
    generate_captions(model, tokenizer, embeddings[:2], max_new_tokens=3)
    assert model.training
    assert model.mapping.training
    assert not model.decoder.training
    model.eval()


def test_generation_rejects_too_many_tokens(model, tokenizer, embeddings) -> None:
    limit = model.decoder.config.n_positions
    with pytest.raises(
        ValueError, match="exceeds the decoder's .* positions; lower max_new_tokens"
    ):
        generate_captions(model, tokenizer, embeddings, max_new_tokens=limit)
    with pytest.raises(ValueError, match="exceeds the decoder's"):
        generate_captions_reference(model, tokenizer, embeddings, max_new_tokens=limit)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"num_beams": 0}, "num_beams must be >= 1"),
    ],
)
def test_generation_rejects_bad_arguments(
    model, tokenizer, embeddings, arguments: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_captions(model, tokenizer, embeddings, **arguments)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_batched_generation_logs_no_padding_warning(model, tokenizer, embeddings) -> None:
    # transformers logs the attention-mask warning once per process; forget earlier emissions
    logging.Logger.warning_once.cache_clear()
    handler = _ListHandler()
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    transformers_logger.addHandler(handler)
    try:
        generate_captions(
            model, tokenizer, embeddings, batch_size=NUM_IMAGES, max_new_tokens=MAX_NEW_TOKENS
        )
    finally:
        transformers_logger.removeHandler(handler)
    assert not [message for message in handler.messages if "attention_mask" in message]


def test_float32_embeddings_follow_model_dtype(model, tokenizer, embeddings) -> None:
    captions = generate_captions(
        model, tokenizer, embeddings.float(), max_new_tokens=MAX_NEW_TOKENS
    )
    assert len(captions) == NUM_IMAGES


def test_gpt2_small_shape_greedy_equals_reference(tokenizer) -> None:
    # GPT-2 small's width, heads and vocabulary (50,257 plus pad), and ClipCap's prefix of 10
    # from a 512-d CLIP embedding. It has 2 of GPT-2's 12 layers, so the uncached reference
    # stays fast, and it runs in float32, the dtype of training and validation.
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50258,
        n_positions=1024,
        n_embd=768,
        n_layer=2,
        n_head=12,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = ClipCaptionModel(GPT2LMHeadModel(config), clip_dim=512, prefix_length=10)
    rows = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))

    reference = generate_token_ids_reference(model, tokenizer, rows, max_new_tokens=10)

    assert len({tuple(ids) for ids in reference}) > 1
    for batch_size in (1, 3, 4):
        batched = generate_token_ids(
            model, tokenizer, rows, batch_size=batch_size, max_new_tokens=10
        )
        assert batched == reference, f"batch_size={batch_size}"
