from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from capdec.config import ModelConfig
from capdec.model import (
    ClipCaptionModel,
    MLPMapping,
    TransformerMapping,
    build_tokenizer,
    caption_loss,
    caption_loss_per_sample,
    load_decoder,
)
from capdec.tokenizer import encode_captions, pad_batch

CAPTIONS = [
    f"a {color} {thing} {verb} {place}."
    for color in ("red", "blue", "green", "black")
    for thing in ("dog", "cat", "bus", "man")
    for verb in ("sits on", "walks past")
    for place in ("the grass", "a table", "the street")
]
TINY = ModelConfig(
    tiny_vocab_size=300,
    tiny_width=32,
    tiny_heads=2,
    tiny_layers=2,
    prefix_length=4,
    max_caption_tokens=12,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TINY, CAPTIONS)


def _loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return logits (2, P + T, V), tokens and a mask with padding, for P = 3, T = 4, V = 7."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3 + 4, 7, generator=generator)
    tokens = torch.tensor([[1, 2, 3, 0], [4, 0, 5, 5]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return logits, tokens, mask


def test_loss_ignores_prefix_positions() -> None:
    logits, tokens, mask = _loss_inputs()
    changed = logits.clone()
    # positions 0 and 1 only see the prefix; position 2 (= P - 1) predicts the first token
    changed[:, :2] = torch.randn(2, 2, 7)
    assert caption_loss(changed, tokens, mask, 3) == caption_loss(logits, tokens, mask, 3)
    changed[:, 2, tokens[0, 0]] += 1.0
    assert caption_loss(changed, tokens, mask, 3) != caption_loss(logits, tokens, mask, 3)


def test_loss_ignores_padding_and_last_position() -> None:
    logits, tokens, mask = _loss_inputs()
    changed = logits.clone()
    # row 1 has real tokens at t = 0, 1, so positions P - 1 + 2 on predict padding or nothing
    changed[1, 3 - 1 + 2 :] = 100 * torch.randn(3, 7)
    # the last position would predict a token after the caption
    changed[0, -1] = 100 * torch.randn(7)
    assert caption_loss(changed, tokens, mask, 3) == caption_loss(logits, tokens, mask, 3)


def test_loss_changes_with_real_token_logit() -> None:
    logits, tokens, mask = _loss_inputs()
    changed = logits.clone()
    changed[1, 3, tokens[1, 1]] += 2.0  # the logit at P - 1 + 1 predicting row 1's second token
    assert caption_loss(changed, tokens, mask, 3) < caption_loss(logits, tokens, mask, 3)


def test_loss_matches_hand_computed_cross_entropy() -> None:
    # one prefix position, V = 3; logits at positions 0, 1 predict tokens[0], tokens[1]
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    tokens = torch.tensor([[0, 2]])
    mask = torch.tensor([[True, True]])
    first = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    second = -math.log(1.0 / (2.0 + math.e))
    assert caption_loss(logits, tokens, mask, 1).item() == pytest.approx((first + second) / 2)


def test_loss_weighs_tokens_not_captions() -> None:
    logits, tokens, mask = _loss_inputs()
    per_sample = caption_loss_per_sample(logits, tokens, mask, 3)
    assert per_sample.shape == (2,)
    # 4 real tokens in row 0 and 2 in row 1
    expected = (4 * per_sample[0] + 2 * per_sample[1]) / 6
    assert caption_loss(logits, tokens, mask, 3).item() == pytest.approx(expected.item())


def test_loss_rejects_mismatched_lengths() -> None:
    logits, tokens, mask = _loss_inputs()
    with pytest.raises(ValueError, match="prefix_length 2 plus 4 tokens needs 6"):
        caption_loss(logits, tokens, mask, 2)


def test_tiny_decoder_matches_tokenizer(tokenizer) -> None:
    decoder = load_decoder(TINY, tokenizer)
    assert decoder.config.vocab_size == len(tokenizer)
    assert decoder.config.n_positions >= TINY.prefix_length + TINY.max_caption_tokens + 64
    assert decoder.config.n_embd == 32
    assert decoder.config.n_layer == 2
    assert decoder.config.pad_token_id == tokenizer.pad_token_id
    assert decoder.generation_config.eos_token_id == tokenizer.eos_token_id
    assert decoder.generation_config.pad_token_id == tokenizer.pad_token_id


def test_tiny_decoder_follows_global_seed(tokenizer) -> None:
    torch.manual_seed(3)
    first = load_decoder(TINY, tokenizer).state_dict()
    torch.manual_seed(3)
    second = load_decoder(TINY, tokenizer).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def _save_small_gpt2(folder: Path, vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return model


def test_decoder_folder_loads_same_weights(tokenizer, tmp_path: Path) -> None:
    saved = _save_small_gpt2(tmp_path, len(tokenizer))
    loaded = load_decoder(ModelConfig(decoder=str(tmp_path)), tokenizer)
    saved_state = saved.state_dict()
    loaded_state = loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name, value in saved_state.items():
        assert torch.equal(loaded_state[name], value), name
    assert loaded.config.pad_token_id == tokenizer.pad_token_id


def test_decoder_folder_grows_to_tokenizer(tokenizer, tmp_path: Path) -> None:
    # a checkpoint with fewer embeddings than the tokenizer, as GPT-2 has once PAD is added
    saved = _save_small_gpt2(tmp_path, len(tokenizer) - 3)
    loaded = load_decoder(ModelConfig(decoder=str(tmp_path)), tokenizer)
    embeddings = loaded.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer)
    assert loaded.config.vocab_size == len(tokenizer)
    assert torch.equal(embeddings[: len(tokenizer) - 3], saved.get_input_embeddings().weight)
    assert loaded.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()


def test_decoder_missing_folder_names_fix(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.*does not exist.*save_pretrained.*'tiny'"):
        load_decoder(ModelConfig(decoder=str(tmp_path / "absent")), tokenizer)


def test_decoder_folder_without_weights_names_fix(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="could not load a decoder from folder.*save_pretrained"):
        load_decoder(ModelConfig(decoder=str(tmp_path)), tokenizer)


def test_mlp_mapping_shape() -> None:
    mapping = MLPMapping(16, 32, 5)
    assert mapping(torch.randn(3, 16)).shape == (3, 5, 32)
    assert mapping.layers[0].out_features == 32 * 5 // 2


def test_mlp_mapping_caps_hidden_width() -> None:
    mapping = MLPMapping(16, 32, 5, max_hidden=20)
    assert mapping.layers[0].out_features == 20
    assert mapping(torch.randn(2, 16)).shape == (2, 5, 32)


def test_transformer_mapping_shape() -> None:
    mapping = TransformerMapping(16, 32, 5, num_layers=2)
    assert mapping(torch.randn(3, 16)).shape == (3, 5, 32)
    assert mapping.prefix_const.shape == (5, 32)


def test_transformer_mapping_uses_clip_input() -> None:
    mapping = TransformerMapping(16, 32, 5, num_layers=1, clip_length=3)
    x = torch.randn(2, 16)
    assert not torch.allclose(mapping(x)[0], mapping(x)[1])


def test_transformer_mapping_rejects_bad_heads() -> None:
    with pytest.raises(
        ValueError, match="gpt_dim \\(30\\) must be divisible by num_heads \\(8\\)"
    ):
        TransformerMapping(16, 30, 5, num_layers=1)


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_caption_model_forward_and_backward(tokenizer, mapping: str) -> None:
    model = ClipCaptionModel(
        load_decoder(TINY, tokenizer),
        clip_dim=16,
        prefix_length=4,
        mapping=mapping,
        mapping_layers=1,
    )
    token_lists, _ = encode_captions(tokenizer, CAPTIONS[:3], max_tokens=12)
    tokens, mask = pad_batch(token_lists, tokenizer.pad_token_id)
    prefix = model.prefix(torch.randn(3, 16))
    assert prefix.shape == (3, 4, 32)
    logits = model(prefix, tokens, mask)
    assert logits.shape == (3, 4 + tokens.shape[1], len(tokenizer))
    caption_loss(logits, tokens, mask, 4).backward()
    assert all(parameter.grad is not None for parameter in model.mapping.parameters())


def test_caption_model_padding_does_not_change_real_logits(tokenizer) -> None:
    model = ClipCaptionModel(load_decoder(TINY, tokenizer), clip_dim=16, prefix_length=4).eval()
    prefix = model.prefix(torch.randn(1, 16))
    tokens = torch.tensor([[10, 11, 12]])
    padded = torch.tensor([[10, 11, 12, tokenizer.pad_token_id, tokenizer.pad_token_id]])
    short = model(prefix, tokens, torch.ones(1, 3, dtype=torch.bool))
    long = model(prefix, padded, torch.tensor([[True, True, True, False, False]]))
    assert torch.allclose(short, long[:, : 4 + 3], atol=1e-5)


def test_transformer_mapping_follows_decoder_heads(tokenizer) -> None:
    config = ModelConfig(tiny_vocab_size=300, tiny_width=36, tiny_heads=3, tiny_layers=1)
    decoder = load_decoder(config, tokenizer)
    model = ClipCaptionModel(
        decoder, clip_dim=16, prefix_length=4, mapping="transformer", mapping_layers=1
    )
    assert model.mapping.transformer.layers[0].self_attn.num_heads == 3
    assert model.prefix(torch.randn(2, 16)).shape == (2, 4, 36)


def test_learned_offset_is_a_zero_parameter(tokenizer) -> None:
    decoder = load_decoder(TINY, tokenizer)
    model = ClipCaptionModel(decoder, clip_dim=16, prefix_length=4, learned_offset=True)
    assert isinstance(model.offset, torch.nn.Parameter)
    assert torch.equal(model.offset, torch.zeros(16))
    assert any(parameter is model.offset for parameter in model.parameters())
    assert ClipCaptionModel(decoder, clip_dim=16, prefix_length=4).offset is None


def test_caption_model_rejects_unknown_mapping(tokenizer) -> None:
    with pytest.raises(ValueError, match="mapping must be 'mlp' or 'transformer'; got 'lstm'"):
        ClipCaptionModel(
            load_decoder(TINY, tokenizer), clip_dim=16, prefix_length=4, mapping="lstm"
        )
