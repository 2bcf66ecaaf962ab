"""The CapDec training run: text-only training with noise injection, and per-epoch validation.

``CapDecRun`` owns everything one run needs (data, tokenizer, model, optimiser, scheduler, random
generators, best-so-far tracking) and exposes it as a state dictionary, so a caller such as the
Ray Tune trainable can checkpoint after every epoch and continue from any checkpoint with the same
optimiser state and random streams.

Each training sample is a CLIP text embedding that is perturbed as the ``NoiseConfig`` specifies
(normalisation, modality offset, noise), or, for a fraction ``image_ratio`` of the samples, a real
CLIP image embedding of a paired training photo fed without noise. Validation decodes the image
embeddings of the validation photos and scores them against all their reference captions.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from capdec import metric_names as names
from capdec.config import RunConfig
from capdec.devices import resolve_device
from capdec.generation import generate_captions
from capdec.metrics import CaptionScorer
from capdec.model import ClipCaptionModel, build_tokenizer, caption_loss, load_decoder
from capdec.noise import (
    image_sample_mask,
    perturb_text_embeddings,
    prepare_image_embeddings,
)
from capdec.prepared import PreparedDataset, load_prepared
from capdec.tokenizer import encode_captions, load_tokenizer, pad_batch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
BEST_MODEL_FILE = "best_model.pt"


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite; the run cannot continue."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that model initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _linear_warmup_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - step, 0)
        return max(remaining / max(total_steps - warmup_steps, 1), 0.0)

    return factor


class CapDecRun:
    """One CapDec training run, from a prepared dataset to validated checkpoints.

    Args:
        config: the run's configuration.
        device: torch device for the model, e.g. "cpu" or "cuda".
        dataset: an already loaded prepared dataset (loaded from ``config.data`` when None).
        scorer: a ``CaptionScorer`` built on the same validation references, shared between runs
            so the references are tokenised once per process (built here when None).

    Raises:
        ValueError: when the data cannot serve the configuration (no training captions for
            ``train_text``, image mixing without paired training photos, a fixed offset without one
            stored in the dataset, an empty validation split).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        device: str | torch.device = "cpu",
        dataset: PreparedDataset | None = None,
        scorer: CaptionScorer | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        seed_everything(config.train.seed)
        self.dataset = dataset if dataset is not None else load_prepared(config.data)

        self._select_training_data()
        self._build_model()
        self._build_optimizer()
        self._select_validation_data(scorer)

        # random streams that the checkpoint carries, so a resumed run continues them
        self.numpy_rng = np.random.default_rng(config.train.seed)
        self.torch_rng = torch.Generator().manual_seed(config.train.seed)

        self.epoch = 0  # epochs completed
        self.best_cider = -math.inf
        self.best_epoch = 0
        self.best_model_state: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- set-up

    def _select_training_data(self) -> None:
        cfg, data = self.config, self.dataset
        rows = data.training_caption_indices(cfg.train.train_text)
        if cfg.train.max_train_captions and len(rows) > cfg.train.max_train_captions:
            subset_rng = np.random.default_rng(cfg.train.seed)
            rows = np.sort(subset_rng.choice(rows, cfg.train.max_train_captions, replace=False))
        self.train_rows = rows

        # (image row, caption row) pairs of paired training photos, for image mixing
        self.image_pairs = np.asarray(
            [
                (c.image, i)
                for i, c in enumerate(data.captions)
                if c.split == "train" and c.image >= 0 and c.source == "paired"
            ],
            dtype=np.int64,
        ).reshape(-1, 2)
        if cfg.noise.image_ratio > 0 and len(self.image_pairs) == 0:
            raise ValueError(
                f"image_ratio={cfg.noise.image_ratio} needs paired training photos, but prepared "
                f"dataset {data.root} has none; prepare it from a Karpathy JSON whose train split "
                "has images, or set image_ratio to 0"
            )

        self.fixed_offset = None
        if cfg.noise.modality_offset == "fixed":
            self.fixed_offset = self._load_fixed_offset()

    def _load_fixed_offset(self) -> torch.Tensor:
        source = self.dataset.manifest.get("source", {})
        key = "modality_offset" if self.config.noise.normalize_before else "modality_offset_raw"
        offset = source.get(key)
        if offset is None:
            raise ValueError(
                f"modality_offset='fixed' needs {key!r} in the manifest of {self.dataset.root}, "
                "which `prepare` computes from paired training photos; this dataset has none, so "
                "use modality_offset 'none' or 'learned'"
            )
        return torch.tensor(offset, dtype=torch.float32)

    def _build_model(self) -> None:
        cfg = self.config
        texts = [self.dataset.captions[i].text for i in self.train_rows]
        if cfg.tokenizer_dir:
            self.tokenizer = load_tokenizer(cfg.tokenizer_dir)
        else:
            self.tokenizer = build_tokenizer(cfg.model, texts)

        # token ids of every caption a training sample can use: the text-only ones and,
        # for image mixing, the captions of paired training photos
        needed = self.train_rows
        if cfg.noise.image_ratio > 0:
            needed = np.union1d(needed, self.image_pairs[:, 1])
        token_lists, truncated = encode_captions(
            self.tokenizer,
            [self.dataset.captions[i].text for i in needed],
            cfg.model.max_caption_tokens,
        )
        if truncated:
            logger.warning(
                "%d of %d training captions were longer than max_caption_tokens=%d tokens and "
                "were truncated",
                truncated,
                len(needed),
                cfg.model.max_caption_tokens,
            )
        self.tokens_by_row = dict(zip(needed.tolist(), token_lists))

        decoder = load_decoder(cfg.model, self.tokenizer)
        self.model = ClipCaptionModel(
            decoder,
            clip_dim=self.dataset.embed_dim,
            prefix_length=cfg.model.prefix_length,
            mapping=cfg.model.mapping,
            mapping_layers=cfg.model.mapping_layers,
            learned_offset=cfg.noise.modality_offset == "learned",
        ).to(self.device)
        if cfg.model.freeze_decoder:
            for parameter in self.model.decoder.parameters():
                parameter.requires_grad_(False)

    def _build_optimizer(self) -> None:
        train = self.config.train
        self.steps_per_epoch = math.ceil(len(self.train_rows) / train.batch_size)
        total_steps = self.steps_per_epoch * train.epochs
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _linear_warmup_decay(train.warmup_steps, total_steps)
        )

    def _select_validation_data(self, scorer: CaptionScorer | None) -> None:
        train = self.config.train
        rows = self.dataset.image_indices("val")
        if len(rows) == 0:
            raise ValueError(
                f"prepared dataset {self.dataset.root} has no validation images; "
                "validation CIDEr needs the 'val' split"
            )
        if train.val_max_images and len(rows) > train.val_max_images:
            # a fixed subset: the same photos every epoch and in every trial of a study
            subset_rng = np.random.default_rng(0)
            rows = np.sort(subset_rng.choice(rows, train.val_max_images, replace=False))
        self.val_rows = rows
        references = self.dataset.references("val")
        self.val_references = {int(r): references[int(r)] for r in rows}
        if scorer is not None:
            self.scorer = scorer
        elif self.config.val_references:
            # tokenised once for the whole study, because PTB tokenisation starts Java every time
            self.scorer = CaptionScorer.from_file(self.config.val_references, self.val_references)
        else:
            self.scorer = CaptionScorer(self.val_references)
        self.val_attributes = None
        if "image_attributes" in self.dataset.manifest.get("source", {}):
            from capdec.demo_data import image_attributes

            self.val_attributes = image_attributes(self.dataset)

    # ---------------------------------------------------------------- training

    def _batch_embeddings(
        self, caption_rows: np.ndarray, image_rows: np.ndarray, is_image: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Build the (B, D) CLIP embeddings of one batch: perturbed text or clean image rows.

        The perturbation runs on the CPU with the run's CPU generator, so the noise stream is
        the same on every device and is restored exactly from a checkpoint.
        """
        noise_cfg = self.config.noise
        text = torch.from_numpy(self.dataset.text_embeddings[caption_rows])
        embeddings = torch.zeros_like(text)
        stats: dict[str, float] = {}

        text_mask = ~is_image
        if text_mask.any():
            offset = self.model.offset if self.model.offset is not None else self.fixed_offset
            if offset is not None:
                offset = offset.cpu()
            noisy, stats = perturb_text_embeddings(
                text[text_mask], noise_cfg, self.torch_rng, offset=offset
            )
            embeddings = embeddings.masked_scatter(text_mask[:, None], noisy)
        if is_image.any():
            images = torch.from_numpy(self.dataset.image_embeddings[image_rows[is_image.numpy()]])
            clean = prepare_image_embeddings(images, noise_cfg)
            embeddings = embeddings.masked_scatter(is_image[:, None], clean)
        return embeddings.to(self.device), stats

    def _loss(self, embeddings: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
        prefix = self.model.prefix(embeddings)  # (B, prefix_length, gpt_dim)
        logits = self.model(prefix, tokens, mask)
        return caption_loss(logits, tokens, mask, self.config.model.prefix_length)

    def _fgsm_loss(self, embeddings, tokens, mask) -> torch.Tensor:
        """Mix the clean loss with the loss on an FGSM-perturbed copy of the CLIP embedding."""
        noise_cfg = self.config.noise
        # a learned offset makes the embeddings a non-leaf that already requires grad
        if not embeddings.requires_grad:
            embeddings = embeddings.detach().requires_grad_(True)
        clean_loss = self._loss(embeddings, tokens, mask)
        (gradient,) = torch.autograd.grad(clean_loss, embeddings, retain_graph=True)
        step = noise_cfg.fgsm_epsilon
        if noise_cfg.fgsm_random:
            # |N(0, eps^2)|: a random size, always up the gradient
            step = abs(float(torch.randn((), generator=self.torch_rng))) * noise_cfg.fgsm_epsilon
        adversarial = (embeddings + step * gradient.sign()).detach()
        adversarial_loss = self._loss(adversarial, tokens, mask)
        alpha = noise_cfg.fgsm_alpha
        return alpha * clean_loss + (1 - alpha) * adversarial_loss

    def train_epoch(self, *, progress: bool = False) -> dict[str, float]:
        """Train one epoch over the training captions and return its mean loss and diagnostics.

        Raises:
            NonFiniteLossError: when a batch's loss is NaN or infinite.
        """
        cfg = self.config
        self.model.train()
        order = self.numpy_rng.permutation(self.train_rows)
        is_image = image_sample_mask(
            len(order), cfg.noise.image_ratio, cfg.noise.image_mixing, self.torch_rng
        )
        # image samples replace their caption by a random paired (image, caption) pair
        image_rows = np.full(len(order), -1, dtype=np.int64)
        num_images = int(is_image.sum())
        if num_images:
            picks = self.numpy_rng.integers(0, len(self.image_pairs), size=num_images)
            image_rows[is_image.numpy()] = self.image_pairs[picks, 0]
            order = order.copy()
            order[is_image.numpy()] = self.image_pairs[picks, 1]

        totals: dict[str, float] = {"loss": 0.0, "noise_norm": 0.0, "clean_noisy_cosine": 0.0}
        text_batches = 0
        batches = range(0, len(order), cfg.train.batch_size)
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", disable=not progress, leave=False)
        for start in bar:
            stop = start + cfg.train.batch_size
            rows, batch_is_image = order[start:stop], is_image[start:stop]
            tokens, mask = pad_batch([self.tokens_by_row[int(r)] for r in rows], self.tokenizer.pad_token_id)
            tokens, mask = tokens.to(self.device), mask.to(self.device)

            embeddings, stats = self._batch_embeddings(rows, image_rows[start:stop], batch_is_image)
            if cfg.noise.fgsm_epsilon > 0:
                loss = self._fgsm_loss(embeddings, tokens, mask)
            else:
                loss = self._loss(embeddings, tokens, mask)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss became {loss.item()} at epoch {self.epoch + 1}, batch "
                    f"{start // cfg.train.batch_size + 1}; lower lr (now {cfg.train.lr}) or "
                    "check the noise settings"
                )

            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()

            totals["loss"] += loss.item()
            if stats:
                text_batches += 1
                totals["noise_norm"] += stats["noise_norm"]
                totals["clean_noisy_cosine"] += stats["clean_noisy_cosine"]
            bar.set_postfix(loss=f"{loss.item():.3f}")

        num_batches = len(batches)
        metrics = {names.TRAIN_LOSS: totals["loss"] / num_batches}
        metrics["train/noise_norm"] = totals["noise_norm"] / max(text_batches, 1)
        metrics["train/clean_noisy_cosine"] = totals["clean_noisy_cosine"] / max(text_batches, 1)
        metrics["train/image_fraction"] = num_images / len(order)
        if self.model.offset is not None:
            metrics["train/offset_norm"] = float(self.model.offset.detach().norm())
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    # -------------------------------------------------------------- validation

    def decode_images(self, rows: np.ndarray, *, model: ClipCaptionModel | None = None) -> list[str]:
        """Decode the CLIP image embeddings of the given image rows into captions."""
        cfg = self.config
        images = torch.from_numpy(self.dataset.image_embeddings[rows]).to(self.device)
        images = prepare_image_embeddings(images, cfg.noise)
        return generate_captions(
            model or self.model,
            self.tokenizer,
            images,
            batch_size=cfg.train.val_batch_size,
            max_new_tokens=cfg.train.max_new_tokens,
            num_beams=cfg.train.num_beams,
        )

    def validate(self) -> tuple[dict[str, float], dict[int, str]]:
        """Decode the validation images and score them; return (metrics, captions by image row)."""
        captions = self.decode_images(self.val_rows)
        predictions = {int(r): c for r, c in zip(self.val_rows, captions)}
        scores = self.scorer.score(predictions)
        metrics = {f"val/{key}": value for key, value in scores.items()}
        if self.val_attributes is not None:
            # synthetic world only: F1 of the size-colour-shape triples each caption names
            from capdec.world import mean_attribute_f1

            metrics[names.VAL_ATTRIBUTE_F1] = mean_attribute_f1(
                [predictions[int(r)] for r in self.val_rows],
                [self.val_attributes[int(r)] for r in self.val_rows],
            )
        return metrics, predictions

    def run_epoch(self, *, progress: bool = False) -> dict[str, float]:
        """Train and validate one epoch, update the best-so-far state, and return all metrics."""
        started = time.perf_counter()
        metrics = self.train_epoch(progress=progress)
        validation_started = time.perf_counter()
        val_metrics, predictions = self.validate()
        finished = time.perf_counter()
        self.epoch += 1

        metrics.update(val_metrics)
        cider = metrics[names.VAL_CIDER]
        if cider > self.best_cider:
            self.best_cider = cider
            self.best_epoch = self.epoch
            self.best_model_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
        metrics[names.EPOCH] = self.epoch
        metrics[names.VAL_CIDER_BEST] = self.best_cider
        metrics[names.BEST_EPOCH] = self.best_epoch
        metrics[names.EPOCH_SECONDS] = finished - started
        metrics[names.VAL_SECONDS] = finished - validation_started

        logger.info(
            "epoch %d: train loss %.4f | val CIDEr %.4f BLEU-4 %.4f ROUGE-L %.4f | best CIDEr %.4f "
            "(epoch %d) | %.1f s (validation %.1f s)",
            self.epoch,
            metrics[names.TRAIN_LOSS],
            cider,
            metrics["val/bleu_4"],
            metrics[names.VAL_ROUGE_L],
            self.best_cider,
            self.best_epoch,
            metrics[names.EPOCH_SECONDS],
            metrics[names.VAL_SECONDS],
        )
        for row in list(predictions)[:3]:
            logger.debug("val image %d: %r", row, predictions[row])
        return metrics

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue this run exactly: weights, optimiser, RNGs."""
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "best_cider": self.best_cider,
            "best_epoch": self.best_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "numpy_rng": self.numpy_rng.bit_generator.state,
            "torch_rng": self.torch_rng.get_state(),
            "torch_global_rng": torch.get_rng_state(),
            "dataset_hash": self.dataset.content_hash,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict``.

        Raises:
            ValueError: when the checkpoint was written for another dataset or architecture.
        """
        if state["dataset_hash"] != self.dataset.content_hash:
            raise ValueError(
                f"checkpoint was trained on prepared data {state['dataset_hash'][:12]}, "
                f"but {self.dataset.root} is {self.dataset.content_hash[:12]}; "
                "resume with the same prepared dataset"
            )
        saved, current = state["config"], self.config.to_dict()
        for key in ("decoder", "mapping", "prefix_length", "mapping_layers", "tiny_layers",
                    "tiny_width", "tiny_heads", "modality_offset"):
            if saved.get(key) != current.get(key):
                raise ValueError(
                    f"checkpoint has {key}={saved.get(key)!r} but the run config has "
                    f"{key}={current.get(key)!r}; the architecture must match to resume"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.numpy_rng.bit_generator.state = state["numpy_rng"]
        self.torch_rng.set_state(state["torch_rng"])
        torch.set_rng_state(state["torch_global_rng"])
        self.epoch = state["epoch"]
        self.best_cider = state["best_cider"]
        self.best_epoch = state["best_epoch"]

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write the run state and the best epoch's weights into ``folder``.

        Files are written under temporary names and renamed, so a crash mid-write leaves the
        previous files intact.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.state_dict(), folder / CHECKPOINT_FILE)
        if self.best_model_state is not None:
            best = {"model": self.best_model_state, "epoch": self.best_epoch, "cider": self.best_cider}
            _atomic_save(best, folder / BEST_MODEL_FILE)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        return folder

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Continue from a folder written by ``save_checkpoint``."""
        folder = Path(folder)
        state = torch.load(folder / CHECKPOINT_FILE, map_location=self.device, weights_only=True)
        self.load_state_dict(state)
        best_path = folder / BEST_MODEL_FILE
        if best_path.exists():
            best = torch.load(best_path, map_location="cpu", weights_only=True)
            self.best_model_state = best["model"]

    def best_model(self) -> ClipCaptionModel:
        """Return a copy of the model with the best epoch's weights (the current ones if none)."""
        model = copy.deepcopy(self.model)
        if self.best_model_state is not None:
            model.load_state_dict(self.best_model_state)
        return model


def _atomic_save(obj: Any, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

