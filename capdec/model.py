"""The captioning model: a mapping network from a CLIP embedding to a GPT-2 prefix, and GPT-2.

The architecture follows ClipCap ("ClipCap: CLIP Prefix for Image Captioning", Mokady et al.,
2021), which CapDec reuses: a CLIP embedding becomes ``prefix_length`` vectors in the decoder's
embedding space, the caption tokens follow them, and the decoder is trained with cross-entropy on
the caption tokens alone. The decoder is either a small randomly initialised GPT-2 ("tiny") with
a BPE vocabulary trained on the captions, or a pretrained GPT-2 loaded by hub name or folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from capdec.config import ModelConfig
from capdec.tokenizer import load_pretrained, load_tokenizer, train_caption_tokenizer

logger = logging.getLogger(__name__)

TINY = "tiny"
# positions beyond prefix + caption, so generation may run somewhat longer than training captions
_EXTRA_POSITIONS = 64
# widest hidden layer of the MLP mapping; ClipCap's GPT-2 setting (768 * 10 / 2 = 3840) fits
# under it, while a long prefix (768 * 40 / 2) would otherwise need a 15360-wide layer
MAX_MLP_HIDDEN = 4096


def build_tokenizer(
    model_cfg: ModelConfig, training_captions: Sequence[str]
) -> PreTrainedTokenizerFast:
    """Return the tokenizer of the configured decoder.

    Args:
        model_cfg: decoder choice; "tiny" trains a BPE of ``tiny_vocab_size`` tokens.
        training_captions: captions the tiny tokenizer is trained on; unused otherwise.

    Raises:
        FileNotFoundError, OSError: when a pretrained tokenizer cannot be loaded.
    """
    if model_cfg.decoder == TINY:
        return train_caption_tokenizer(training_captions, model_cfg.tiny_vocab_size)
    return load_tokenizer(model_cfg.decoder)


def load_decoder(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """Create the tiny GPT-2 decoder or load a pretrained one.

    A tiny decoder is initialised from torch's global random state, so the caller seeds it with
    ``torch.manual_seed``. A pretrained decoder gets its token embeddings resized when the
    tokenizer has more tokens than the checkpoint (the added pad token).

    Args:
        model_cfg: decoder choice and the tiny decoder's size.
        tokenizer: the tokenizer from ``build_tokenizer``; it sets the vocabulary size and the
            eos and pad ids.

    Returns:
        The decoder, with ``config`` and ``generation_config`` carrying the tokenizer's
        bos, eos and pad ids.

    Raises:
        FileNotFoundError: when ``model_cfg.decoder`` looks like a folder that does not exist.
        OSError: when a folder or hub name cannot be loaded.
        ValueError: when the tokenizer lacks an eos or a pad token.
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(
            "tokenizer needs eos and pad tokens; build it with build_tokenizer or load_tokenizer"
        )

    if model_cfg.decoder == TINY:
        decoder = GPT2LMHeadModel(_tiny_config(model_cfg, tokenizer))
    else:
        decoder = load_pretrained(
            GPT2LMHeadModel.from_pretrained, model_cfg.decoder, kind="decoder"
        )
        vocab_size = decoder.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab_size:
            logger.info(
                "resizing decoder token embeddings from %d to %d", vocab_size, len(tokenizer)
            )
            decoder.resize_token_embeddings(len(tokenizer))

    for config in (decoder.config, decoder.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return decoder


def _tiny_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=model_cfg.prefix_length + model_cfg.max_caption_tokens + _EXTRA_POSITIONS,
        n_embd=model_cfg.tiny_width,
        n_layer=model_cfg.tiny_layers,
        n_head=model_cfg.tiny_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


class MLPMapping(nn.Module):
    """ClipCap's MLP mapping: one CLIP embedding to a flat prefix, with a Tanh hidden layer.

    Layers: clip_dim -> hidden -> gpt_dim * prefix_length, where hidden is
    (gpt_dim * prefix_length) // 2 capped at ``max_hidden``.
    """

    def __init__(
        self, clip_dim: int, gpt_dim: int, prefix_length: int, *, max_hidden: int = MAX_MLP_HIDDEN
    ) -> None:
        super().__init__()
        _check_sizes(clip_dim=clip_dim, gpt_dim=gpt_dim, prefix_length=prefix_length)
        out_dim = gpt_dim * prefix_length
        hidden = max(1, min(out_dim // 2, max_hidden))
        self.gpt_dim = gpt_dim
        self.prefix_length = prefix_length
        self.layers = nn.Sequential(
            nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim)
        )

    def forward(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        """Map (B, clip_dim) embeddings to (B, prefix_length, gpt_dim) prefixes."""
        return self.layers(clip_embeddings).view(-1, self.prefix_length, self.gpt_dim)


class TransformerMapping(nn.Module):
    """ClipCap's transformer mapping: CLIP tokens plus learned prefix constants, self-attended.

    The CLIP embedding is projected to ``clip_length`` vectors, ``prefix_length`` learned
    constants are appended, and a pre-norm transformer encoder runs over both. The outputs at
    the constants' positions are the prefix. As in ClipCap, the feed-forward width is twice the
    model width and there is no dropout.
    """

    def __init__(
        self,
        clip_dim: int,
        gpt_dim: int,
        prefix_length: int,
        num_layers: int,
        *,
        clip_length: int | None = None,
        num_heads: int = 8,
    ) -> None:
        super().__init__()
        clip_length = prefix_length if clip_length is None else clip_length
        _check_sizes(
            clip_dim=clip_dim,
            gpt_dim=gpt_dim,
            prefix_length=prefix_length,
            num_layers=num_layers,
            clip_length=clip_length,
            num_heads=num_heads,
        )
        if gpt_dim % num_heads != 0:
            raise ValueError(f"gpt_dim ({gpt_dim}) must be divisible by num_heads ({num_heads})")
        self.clip_length = clip_length
        self.gpt_dim = gpt_dim
        self.project = nn.Linear(clip_dim, clip_length * gpt_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, gpt_dim))
        layer = nn.TransformerEncoderLayer(
            d_model=gpt_dim,
            nhead=num_heads,
            dim_feedforward=2 * gpt_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=num_layers, enable_nested_tensor=False
        )

    def forward(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        """Map (B, clip_dim) embeddings to (B, prefix_length, gpt_dim) prefixes."""
        batch = clip_embeddings.shape[0]
        clip_tokens = self.project(clip_embeddings).view(batch, self.clip_length, self.gpt_dim)
        constants = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        hidden = self.transformer(torch.cat([clip_tokens, constants], dim=1))
        return hidden[:, self.clip_length :]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")


class ClipCaptionModel(nn.Module):
    """A mapping network that turns CLIP embeddings into a prefix for a GPT-2 decoder.

    Attributes:
        decoder: the GPT-2 language model.
        mapping: MLPMapping or TransformerMapping.
        prefix_length: number of prefix positions P.
        offset: learned (clip_dim,) modality offset, zero-initialised, or None. The training loop
            adds it to text embeddings before the noise; image embeddings are decoded without it.
    """

    def __init__(
        self,
        decoder: GPT2LMHeadModel,
        *,
        clip_dim: int,
        prefix_length: int,
        mapping: str = "mlp",
        mapping_layers: int = 8,
        learned_offset: bool = False,
    ) -> None:
        super().__init__()
        gpt_dim = decoder.get_input_embeddings().embedding_dim
        if mapping == "mlp":
            self.mapping: nn.Module = MLPMapping(clip_dim, gpt_dim, prefix_length)
        elif mapping == "transformer":
            # ClipCap's 8 heads, or the decoder's head count for widths that 8 does not divide
            num_heads = 8 if gpt_dim % 8 == 0 else decoder.config.n_head
            self.mapping = TransformerMapping(
                clip_dim, gpt_dim, prefix_length, mapping_layers, num_heads=num_heads
            )
        else:
            raise ValueError(f"mapping must be 'mlp' or 'transformer'; got {mapping!r}")
        self.decoder = decoder
        self.prefix_length = prefix_length
        self.offset = nn.Parameter(torch.zeros(clip_dim)) if learned_offset else None

    def prefix(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        """Map (B, clip_dim) embeddings, already prepared, to (B, P, gpt_dim) prefix embeddings."""
        return self.mapping(clip_embeddings)

    def forward(
        self, prefix_embeds: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Run the decoder on a prefix followed by caption tokens.

        Args:
            prefix_embeds: (B, P, H) output of ``prefix``.
            tokens: (B, T) caption token ids, right-padded.
            mask: (B, T) True (or 1) at real tokens.

        Returns:
            (B, P + T, V) logits. The logit at position P - 1 + t predicts ``tokens[:, t]``.
        """
        token_embeds = self.decoder.get_input_embeddings()(tokens)  # (B, T, H)
        inputs = torch.cat([prefix_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        prefix_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=tokens.device)
        attention_mask = torch.cat([prefix_mask, mask.long()], dim=1)
        return self.decoder(inputs_embeds=inputs, attention_mask=attention_mask).logits


def caption_loss_per_sample(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, prefix_length: int
) -> torch.Tensor:
    """Return each caption's mean cross-entropy over its real tokens, final eos included.

    Args:
        logits: (B, P + T, V) output of ``ClipCaptionModel.forward``.
        tokens: (B, T) caption token ids.
        mask: (B, T) True at real tokens; every row needs at least one.
        prefix_length: P.

    Returns:
        (B,) losses in nats per token, float32 or wider.
    """
    token_losses = _token_losses(logits, tokens, mask, prefix_length)
    return token_losses.sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def caption_loss(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, prefix_length: int
) -> torch.Tensor:
    """Return the mean cross-entropy over all real caption tokens of the batch, final eos included.

    Prefix positions and padding carry no loss. Each token weighs the same, so long captions
    weigh more than short ones (ClipCap's convention).

    Args:
        logits: (B, P + T, V) output of ``ClipCaptionModel.forward``.
        tokens: (B, T) caption token ids.
        mask: (B, T) True at real tokens.
        prefix_length: P.

    Returns:
        A scalar in nats per token, float32 or wider.
    """
    token_losses = _token_losses(logits, tokens, mask, prefix_length)
    return token_losses.sum() / mask.sum().clamp_min(1)


def _token_losses(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, prefix_length: int
) -> torch.Tensor:
    """Return the (B, T) cross-entropy of each caption token, 0 at padding."""
    if prefix_length < 1:
        raise ValueError(f"prefix_length must be >= 1; got {prefix_length}")
    num_tokens = tokens.shape[1]
    expected = prefix_length + num_tokens
    if logits.shape[1] != expected:
        raise ValueError(
            f"logits have {logits.shape[1]} positions but prefix_length {prefix_length} plus "
            f"{num_tokens} tokens needs {expected}"
        )
    predicting = logits[:, prefix_length - 1 : prefix_length - 1 + num_tokens]
    predicting = predicting.to(torch.promote_types(predicting.dtype, torch.float32))
    losses = F.cross_entropy(predicting.transpose(1, 2), tokens, reduction="none")
    return torch.where(mask.bool(), losses, torch.zeros_like(losses))
