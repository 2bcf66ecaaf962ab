"""Benchmark caption generation: batched with a key-value cache against batch-1 without one.

Both paths decode the same random captioning model on the same random CLIP embeddings. Its
decoder has GPT-2 small's shape: 12 layers, width 768, 12 heads, and GPT-2's 50,257 tokens plus
the pad token the project adds. An MLP maps a 512-d CLIP embedding to a prefix of 10 positions.
The two paths are:

* batched: ``capdec.generation.generate_token_ids``, transformers' ``generate`` on batches of
  prefixes with a key-value cache;
* reference: ``capdec.generation.generate_token_ids_reference``, one image at a time, re-running
  the decoder over the prefix and the whole caption at every step.

The eos row of the tied token embedding is zeroed, so the eos logit is exactly 0 while the
top logits of a random GPT-2 lie far above 0. No caption ends early, every caption on both paths
is ``max_new_tokens`` tokens long, and the script checks this. Timings exclude detokenisation.
Each case runs ``--repeats`` times, interleaved across the cases, and the script reports medians
of wall and CPU seconds with the load average read before each run. On a shared machine the
speedup from CPU seconds, and the median of the speedups of the back-to-back runs of each repeat,
vary less than the ratio of wall-time medians.

Usage:
    python benchmarks/generation_speed.py --threads 2 --repeats 3 --out /tmp/generation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from capdec.generation import generate_token_ids, generate_token_ids_reference
from capdec.model import ClipCaptionModel

logger = logging.getLogger("benchmarks.generation_speed")

GPT2_VOCAB_SIZE = 50257  # GPT-2's vocabulary, end-of-text token (id 50256) included
CLIP_DIM = 512  # CLIP ViT-B/32 embedding width
PREFIX_LENGTH = 10  # ClipCap's and CapDec's prefix length for GPT-2


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer with GPT-2's vocabulary size and ids of eos and pad.

    The benchmark needs no downloaded files, and generation only needs the eos and pad ids, so
    placeholder words stand in for GPT-2's 50,256 ordinary tokens.

    Returns:
        A tokenizer of 50,258 tokens: words 0..50255, eos 50256, pad 50257 (as
        ``capdec.tokenizer`` adds a pad token to GPT-2's tokenizer).
    """
    vocab = {f"w{i}": i for i in range(GPT2_VOCAB_SIZE - 1)}
    vocab["<|endoftext|>"] = GPT2_VOCAB_SIZE - 1
    vocab["<|pad|>"] = GPT2_VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


def build_gpt2_small_model(tokenizer: PreTrainedTokenizerFast, *, seed: int) -> ClipCaptionModel:
    """Build a random-initialised ClipCap model with a GPT-2-small-shaped decoder.

    Args:
        tokenizer: from ``build_word_tokenizer``; sets the vocabulary and the special ids.
        seed: torch seed of the initialisation.

    Returns:
        The model in eval mode, float32, with the eos embedding row zeroed so that greedy and
        beam search never emit eos.
    """
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    decoder = GPT2LMHeadModel(config)
    with torch.no_grad():
        # the token embedding is tied to the output layer, so this makes the eos logit exactly 0
        decoder.get_input_embeddings().weight[tokenizer.eos_token_id] = 0.0
    model = ClipCaptionModel(decoder, clip_dim=CLIP_DIM, prefix_length=PREFIX_LENGTH)
    return model.eval()


def _check_lengths(token_ids: list[list[int]], max_new_tokens: int, case: str) -> None:
    lengths = sorted({len(ids) for ids in token_ids})
    if lengths != [max_new_tokens]:
        raise RuntimeError(
            f"{case}: caption lengths {lengths}, expected all {max_new_tokens}; a caption ended "
            "early, so the two paths would not decode the same number of tokens"
        )


def _time_once(
    generate: Callable[[], list[list[int]]],
) -> tuple[dict[str, float], list[list[int]]]:
    """Run ``generate`` once and return its wall and CPU seconds, the load average and its ids.

    CPU seconds count every thread of this process. They grow less than wall seconds when other
    processes share the cores, so their ratio is the steadier speedup on a loaded machine.
    """
    load = os.getloadavg()[0]
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    token_ids = generate()
    timing = {
        "wall_s": time.perf_counter() - wall_started,
        "cpu_s": time.process_time() - cpu_started,
        "load_average_1min": load,
    }
    return timing, token_ids


def _cases(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerFast,
    embeddings: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, tuple[int, Callable[[], list[list[int]]]]]:
    """Return case name -> (number of captions, function that generates them)."""
    cases: dict[str, tuple[int, Callable[[], list[list[int]]]]] = {}
    for beams in args.beams:
        label = "greedy" if beams == 1 else f"beam-{beams}"
        batched_rows = embeddings[: args.batched_images]
        reference_count = args.reference_images if beams == 1 else args.beam_reference_images
        reference_rows = embeddings[:reference_count]
        cases[f"{label} batched"] = (
            len(batched_rows),
            lambda rows=batched_rows, beams=beams: generate_token_ids(
                model,
                tokenizer,
                rows,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                num_beams=beams,
            ),
        )
        cases[f"{label} reference"] = (
            len(reference_rows),
            lambda rows=reference_rows, beams=beams: generate_token_ids_reference(
                model, tokenizer, rows, max_new_tokens=args.max_new_tokens, num_beams=beams
            ),
        )
    return cases


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Time every case ``args.repeats`` times and return the machine, settings and results."""
    torch.set_num_threads(args.threads)
    tokenizer = build_word_tokenizer()
    model = build_gpt2_small_model(tokenizer, seed=args.seed)
    count = max(args.batched_images, args.reference_images, args.beam_reference_images)
    embeddings = torch.randn(count, CLIP_DIM, generator=torch.Generator().manual_seed(args.seed))
    cases = _cases(model, tokenizer, embeddings, args)

    # one short untimed call per path, so one-time set-up is not charged to the first case
    generate_token_ids(model, tokenizer, embeddings[:2], max_new_tokens=2)
    generate_token_ids_reference(model, tokenizer, embeddings[:1], max_new_tokens=2)

    timings: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    outputs: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats):
        for name, (captions, generate) in cases.items():
            timing, token_ids = _time_once(generate)
            _check_lengths(token_ids, args.max_new_tokens, name)
            timings[name].append(timing)
            outputs[name] = token_ids
            logger.info(
                "repeat %d %-18s %3d captions in %7.2f s, %7.2f CPU s (%.3f captions/s, "
                "load %.2f)",
                repeat + 1, name, captions, timing["wall_s"], timing["cpu_s"],
                captions / timing["wall_s"], timing["load_average_1min"],
            )
    return _summarise(args, cases, timings, outputs)


def _summarise(
    args: argparse.Namespace,
    cases: dict[str, tuple[int, Callable[[], list[list[int]]]]],
    timings: dict[str, list[dict[str, float]]],
    outputs: dict[str, list[list[int]]],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (captions, _) in cases.items():
        wall = statistics.median(timing["wall_s"] for timing in timings[name])
        cpu = statistics.median(timing["cpu_s"] for timing in timings[name])
        results[name] = {
            "captions": captions,
            "timings": timings[name],
            "median_wall_s": wall,
            "median_cpu_s": cpu,
            "captions_per_second": captions / wall,
            "captions_per_cpu_second": captions / cpu,
        }

    speedups: dict[str, Any] = {}
    for beams in args.beams:
        label = "greedy" if beams == 1 else f"beam-{beams}"
        batched, reference = results[f"{label} batched"], results[f"{label} reference"]
        # each repeat runs the two paths back to back, so their ratio shares most of the load
        per_repeat = [
            (batched["captions"] / fast["wall_s"]) / (reference["captions"] / slow["wall_s"])
            for fast, slow in zip(batched["timings"], reference["timings"], strict=True)
        ]
        shared = reference["captions"]
        speedups[label] = {
            "speedup": batched["captions_per_second"] / reference["captions_per_second"],
            "speedup_per_repeat": per_repeat,
            "median_speedup_per_repeat": statistics.median(per_repeat),
            "speedup_cpu": (
                batched["captions_per_cpu_second"] / reference["captions_per_cpu_second"]
            ),
            # the reference decodes the first rows of the batched input, so their ids must agree
            "same_tokens_on_shared_images": (
                outputs[f"{label} batched"][:shared] == outputs[f"{label} reference"]
            ),
        }
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()}
    return {"machine": _machine(args.threads), "settings": settings, "results": results,
            "speedups": speedups}


def _machine(threads: int) -> dict[str, Any]:
    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per case; the median is reported"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per batch on the batched path"
    )
    parser.add_argument("--batched-images", type=int, default=64, help="captions per batched run")
    parser.add_argument(
        "--reference-images", type=int, default=8, help="captions per reference greedy run"
    )
    parser.add_argument(
        "--beam-reference-images", type=int, default=4, help="captions per reference beam run"
    )
    parser.add_argument("--max-new-tokens", type=int, default=30, help="tokens per caption")
    parser.add_argument(
        "--beams", type=int, nargs="+", default=[1, 5], help="beam widths to measure; 1 is greedy"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and embeddings")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("threads", "repeats", "batch_size", "batched_images", "reference_images",
                 "beam_reference_images", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if min(args.beams) < 1:
        parser.error(f"--beams must be >= 1; got {args.beams}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark from the command line and log one summary line per decoding mode."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse_args(argv)
    report = run_benchmark(args)
    for label, summary in report["speedups"].items():
        batched = report["results"][f"{label} batched"]
        reference = report["results"][f"{label} reference"]
        logger.info(
            "%s: batched %.3f captions/s, reference %.3f captions/s, speedup %.1fx "
            "(per repeat median %.1fx, CPU time %.1fx), same tokens on shared images: %s",
            label, batched["captions_per_second"], reference["captions_per_second"],
            summary["speedup"], summary["median_speedup_per_repeat"], summary["speedup_cpu"],
            summary["same_tokens_on_shared_images"],
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
