"""Caption generation from CLIP embeddings: batched with a key-value cache, and a naive reference.

``generate_captions`` is what validation and evaluation use. It runs transformers' ``generate``
on batches of prefixes, reusing the key-value cache, so each new token costs one decoder step on
one position. ``generate_captions_reference`` decodes one image at a time and re-runs the whole
prefix and caption at every step. It exists as the baseline of the generation benchmark and as
the ground truth in tests: greedy decoding must give the same tokens on both paths.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from capdec.model import ClipCaptionModel

logger = logging.getLogger(__name__)


def generate_captions(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerFast,
    clip_embeddings: torch.Tensor,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 30,
    num_beams: int = 1,
) -> list[str]:
    """Caption CLIP embeddings with batched greedy or beam-search decoding.

    All prefixes of a batch have the same length, so no padding is needed and the result does
    not depend on ``batch_size`` beyond floating-point rounding.

    Args:
        model: the trained captioning model; it is run in eval mode and its previous mode is
            restored afterwards.
        tokenizer: the tokenizer the decoder was trained with; its eos and pad ids are used.
        clip_embeddings: (N, D) embeddings already prepared for decoding
            (``capdec.noise.prepare_image_embeddings``); moved to the model's device.
        batch_size: prefixes decoded at once; >= 1.
        max_new_tokens: maximum caption length in tokens, eos excluded; >= 1.
        num_beams: 1 for greedy decoding, more for beam search.

    Returns:
        N captions, each decoded up to its first eos, special tokens skipped, stripped.

    Raises:
        ValueError: on a batch_size, max_new_tokens or num_beams below 1, or when the prefix
            plus max_new_tokens exceeds the decoder's position limit.
    """
    token_ids = generate_token_ids(
        model,
        tokenizer,
        clip_embeddings,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )
    return decode_captions(tokenizer, token_ids)


def generate_token_ids(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerFast,
    clip_embeddings: torch.Tensor,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 30,
    num_beams: int = 1,
) -> list[list[int]]:
    """Run ``generate_captions`` up to the token ids: one list per row, cut before the first eos.

    Takes the same arguments and raises the same errors as ``generate_captions``.
    """
    _check_generation_args(model, max_new_tokens=max_new_tokens, num_beams=num_beams)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    token_ids: list[list[int]] = []
    with _eval_mode(model), torch.no_grad(), _without_padding_warning():
        embeddings = _to_model(model, clip_embeddings)
        for start in range(0, embeddings.shape[0], batch_size):
            prefix = model.prefix(embeddings[start : start + batch_size])  # (b, P, H)
            attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
            # with inputs_embeds and no input_ids, generate returns only the new tokens
            output = model.decoder.generate(
                inputs_embeds=prefix, attention_mask=attention_mask, generation_config=config
            )
            token_ids.extend(_cut_at_eos(row, tokenizer.eos_token_id) for row in output.tolist())
    logger.debug(
        "generated %d captions, %d per batch, %d beams", len(token_ids), batch_size, num_beams
    )
    return token_ids


def generate_captions_reference(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerFast,
    clip_embeddings: torch.Tensor,
    *,
    max_new_tokens: int = 30,
    num_beams: int = 1,
) -> list[str]:
    """Caption CLIP embeddings one at a time, re-running the decoder on the full sequence.

    No key-value cache and no batching across images: the slow baseline that the batched path
    is measured against. Greedy decoding gives the same tokens as ``generate_captions`` up to
    floating-point rounding. Beam search scores a finished caption by its summed log-probability
    divided by its length (eos counted) and stops as transformers (5.x) does with
    length_penalty 1.0 and early_stopping=False. The tests compare the two beam searches on a few
    random models only, so rare disagreements (near-ties, floating-point rounding) stay possible.

    Args:
        model, tokenizer, clip_embeddings, max_new_tokens, num_beams: as in
            ``generate_captions``.

    Returns:
        N captions, decoded as ``generate_captions`` decodes them.

    Raises:
        ValueError: as ``generate_captions``.
    """
    token_ids = generate_token_ids_reference(
        model, tokenizer, clip_embeddings, max_new_tokens=max_new_tokens, num_beams=num_beams
    )
    return decode_captions(tokenizer, token_ids)


def generate_token_ids_reference(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerFast,
    clip_embeddings: torch.Tensor,
    *,
    max_new_tokens: int = 30,
    num_beams: int = 1,
) -> list[list[int]]:
    """Run ``generate_captions_reference`` up to the token ids, cut before the first eos."""
    _check_generation_args(model, max_new_tokens=max_new_tokens, num_beams=num_beams)
    eos_id = tokenizer.eos_token_id
    token_ids = []
    with _eval_mode(model), torch.no_grad():
        embeddings = _to_model(model, clip_embeddings)
        for row in range(embeddings.shape[0]):
            prefix = model.prefix(embeddings[row : row + 1])  # (1, P, H)
            if num_beams == 1:
                token_ids.append(_greedy_reference(model, prefix, eos_id, max_new_tokens))
            else:
                token_ids.append(_beam_reference(model, prefix, eos_id, max_new_tokens, num_beams))
    return token_ids


def decode_captions(tokenizer: PreTrainedTokenizerFast, token_ids: list[list[int]]) -> list[str]:
    """Decode token id lists to stripped text, skipping special tokens."""
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return [text.strip() for text in texts]


def _greedy_reference(
    model: ClipCaptionModel, prefix: torch.Tensor, eos_id: int, max_new_tokens: int
) -> list[int]:
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = _last_logits(model, prefix, torch.tensor([tokens], dtype=torch.long))  # (1, V)
        next_token = int(logits[0].argmax())
        if next_token == eos_id:
            break
        tokens.append(next_token)
    return tokens


def _beam_reference(
    model: ClipCaptionModel, prefix: torch.Tensor, eos_id: int, max_new_tokens: int, num_beams: int
) -> list[int]:
    # live beams: token lists and their summed log-probabilities; finished: (score, tokens)
    beams: list[list[int]] = [[]]
    beam_scores = torch.zeros(1)
    finished: list[tuple[float, list[int]]] = []

    for step in range(1, max_new_tokens + 1):
        logits = _last_logits(
            model, prefix.expand(len(beams), -1, -1), torch.tensor(beams, dtype=torch.long)
        )
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (beams, V)
        totals = (beam_scores.unsqueeze(1) + log_probs).flatten()
        top_scores, top_index = totals.topk(min(2 * num_beams, totals.numel()))

        next_beams, next_scores = [], []
        for rank, (score, index) in enumerate(
            zip(top_scores.tolist(), top_index.tolist(), strict=True)
        ):
            beam, token = divmod(index, log_probs.shape[1])
            if token == eos_id:
                # as in transformers, only the top num_beams candidates may finish; the others
                # are spares that keep num_beams beams alive
                if rank < num_beams:
                    finished.append((score / step, beams[beam]))
            else:
                next_beams.append([*beams[beam], token])
                next_scores.append(score)
            if len(next_beams) == num_beams:
                break
        beams, beam_scores = next_beams, torch.tensor(next_scores)

        # stop once num_beams captions are finished and the best live beam's summed log-probability
        # over its current length does not beat the worst of them; transformers' heuristic for
        # early_stopping=False (a longer caption could still score higher after normalisation)
        finished = sorted(finished, key=lambda item: item[0], reverse=True)[:num_beams]
        best_live = float(beam_scores.max()) / step
        if len(finished) == num_beams and finished[-1][0] >= best_live:
            break
    else:
        # max_new_tokens reached: the live beams end here and compete with the finished ones
        finished.extend(
            (score / max_new_tokens, tokens)
            for score, tokens in zip(beam_scores.tolist(), beams, strict=True)
        )
    return max(finished, key=lambda item: item[0])[1]


def _last_logits(
    model: ClipCaptionModel, prefix: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Return the (B, V) next-token logits after the prefix and the tokens, without a cache."""
    tokens = tokens.to(prefix.device)
    embeds = torch.cat([prefix, model.decoder.get_input_embeddings()(tokens)], dim=1)
    attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    output = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    return output.logits[:, -1]


def _cut_at_eos(token_ids: list[int], eos_id: int) -> list[int]:
    return token_ids[: token_ids.index(eos_id)] if eos_id in token_ids else token_ids


def _to_model(model: ClipCaptionModel, clip_embeddings: torch.Tensor) -> torch.Tensor:
    parameter = next(model.mapping.parameters())
    return clip_embeddings.to(device=parameter.device, dtype=parameter.dtype)


def _check_generation_args(
    model: ClipCaptionModel, *, max_new_tokens: int, num_beams: int
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1; got {num_beams}")
    limit = getattr(model.decoder.config, "n_positions", None) or math.inf
    if model.prefix_length + max_new_tokens > limit:
        raise ValueError(
            f"prefix_length ({model.prefix_length}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the decoder's {limit} positions; lower max_new_tokens"
        )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for a block, then restore each one's own mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _PaddingWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_PADDING_WARNING)


# transformers (5.x) logs this when batched generation feeds the pad token to a finished caption.
# Those positions are discarded, so the warning is noise here.
_PADDING_WARNING = "We strongly recommend passing in an `attention_mask`"


@contextlib.contextmanager
def _without_padding_warning() -> Iterator[None]:
    """Drop transformers' attention-mask warning, which batched generation triggers by design."""
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    padding_filter = _PaddingWarningFilter()
    transformers_logger.addFilter(padding_filter)
    try:
        yield
    finally:
        transformers_logger.removeFilter(padding_filter)
