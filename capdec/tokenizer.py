"""Caption tokenizers: a byte-level BPE trained on the captions, or a pretrained GPT-2 tokenizer.

The decoder reads one CLIP prefix followed by caption tokens and learns to end each caption with
the end-of-text token. Padding gets its own token that no text encodes to, so a padded position
can never be mistaken for a real token. This matters for GPT-2, whose tokenizer has no pad token
and whose end-of-text token is the one the decoder must learn to emit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
_MIN_VOCAB_SIZE = 258  # the 256 byte symbols plus the two special tokens


def load_pretrained(load: Callable[..., Any], name_or_path: str, *, kind: str) -> Any:
    """Call a ``from_pretrained`` loader on the local cache first, then on the hub.

    Trying the cache first keeps a cached hub name (and every folder) off the network, so a
    machine without network loads them at once instead of waiting for download retries.

    Args:
        load: a ``from_pretrained`` class method such as ``AutoTokenizer.from_pretrained``.
        name_or_path: a hub name such as "gpt2" or a folder written by ``save_pretrained``.
        kind: what is loaded ("tokenizer", "decoder"), used in error messages.

    Returns:
        Whatever ``load`` returns.

    Raises:
        FileNotFoundError: when name_or_path looks like a path and no such folder exists.
        OSError: when the folder cannot be loaded, or the hub name is neither cached nor
            downloadable.
    """
    fix = "pass a folder saved with save_pretrained, a cached hub name such as 'gpt2', or 'tiny'"
    folder = Path(name_or_path).expanduser()
    # hub ids are "name" or "owner/name"; anything else that is not a folder is a missing folder
    looks_like_path = (
        folder.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    )
    if looks_like_path and not folder.is_dir():
        raise FileNotFoundError(f"{kind} folder {name_or_path!r} does not exist; {fix}")

    try:
        return load(str(folder) if folder.is_dir() else name_or_path, local_files_only=True)
    except OSError as error:
        if folder.is_dir():
            raise OSError(
                f"could not load a {kind} from folder {name_or_path!r}: {error}; {fix}"
            ) from error
    try:
        return load(name_or_path)
    except OSError as error:
        raise OSError(
            f"could not load {kind} {name_or_path!r}: it is not in the local cache and could not "
            f"be downloaded; {fix}"
        ) from error


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on captions.

    Text is NFKC-normalised and lowercased, then split as GPT-2 does (byte-level, no prefix
    space). Training with the same captions in the same order gives the same vocabulary.

    Args:
        captions: training captions; an iterable that is read once.
        vocab_size: total vocabulary size including the 256 byte symbols and the two special
            tokens; at least 258. The result can be smaller when the captions hold fewer merges.

    Returns:
        A tokenizer whose end-of-text token (id 0) is both bos and eos. Its pad token (id 1) is
        separate, and encoding ordinary text produces neither.

    Raises:
        ValueError: when vocab_size is below 258.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {_MIN_VOCAB_SIZE} (256 bytes and 2 special tokens); "
            f"got {vocab_size}"
        )

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, pad_token=PAD
    )
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(tokenizer))
    return tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Load a pretrained tokenizer and give it a pad token of its own.

    Args:
        name_or_path: a hub name such as "gpt2" or a folder written by ``save_pretrained``.

    Returns:
        The tokenizer. When it had no pad token, ``PAD`` is added as a new special token, so
        ``len(tokenizer)`` grows by one and the decoder's embeddings must be resized to match.

    Raises:
        FileNotFoundError: when name_or_path looks like a path and no such folder exists.
        OSError: when the tokenizer cannot be loaded from the folder, or the hub name is neither
            cached nor downloadable.
        ValueError: when the tokenizer has no end-of-text (eos) token.
    """
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, kind="tokenizer")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no eos token; captions need one to mark their end"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
        logger.info(
            "added pad token %s to tokenizer %s (id %d)", PAD, name_or_path, tokenizer.pad_token_id
        )
    return tokenizer


def encode_captions(
    tokenizer: PreTrainedTokenizerFast, captions: list[str], max_tokens: int
) -> tuple[list[list[int]], int]:
    """Encode captions as token ids that end with the eos token.

    Args:
        tokenizer: a tokenizer with an eos token.
        captions: caption texts.
        max_tokens: maximum length of one encoded caption, eos included; >= 2. Longer captions
            keep their first ``max_tokens - 1`` tokens followed by eos.

    Returns:
        The token ids of each caption, and how many captions were truncated.

    Raises:
        ValueError: when max_tokens is below 2.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one token plus eos); got {max_tokens}")
    if not captions:
        return [], 0

    eos_id = tokenizer.eos_token_id
    # the Rust tokenizer encodes the batch in parallel, without the Python wrapper's overhead
    batch = tokenizer.backend_tokenizer.encode_batch(list(captions), add_special_tokens=False)
    encoded = [item.ids for item in batch]
    token_lists = []
    num_truncated = 0
    for ids in encoded:
        if len(ids) >= max_tokens:
            num_truncated += 1
            ids = ids[: max_tokens - 1]
        token_lists.append([*ids, eos_id])
    return token_lists, num_truncated


def pad_batch(
    token_lists: list[list[int]], pad_id: int
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Right-pad token lists to the longest list of this batch.

    Args:
        token_lists: one or more non-empty lists of token ids.
        pad_id: id written into the padded positions.

    Returns:
        ``tokens`` (B, T) int64 and ``mask`` (B, T) bool, True at real tokens.

    Raises:
        ValueError: when token_lists is empty or contains an empty list.
    """
    if not token_lists:
        raise ValueError("pad_batch needs at least one token list; got none")
    lengths = [len(ids) for ids in token_lists]
    if min(lengths) == 0:
        raise ValueError(f"token list {lengths.index(0)} is empty; every caption ends with eos")

    tokens = torch.full((len(token_lists), max(lengths)), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.arange(tokens.shape[1]) < torch.tensor(lengths).unsqueeze(1)
    return tokens, mask
