"""Metric names shared by the training loop, the Tune report, the searcher, MLflow and reports.

Defined once so that a renamed metric cannot silently desynchronise the scheduler (which, in Ray
Tune's ASHA, quietly continues when its metric key is missing) from what the trainable reports.
"""

EPOCH = "epoch"
TRAIN_LOSS = "train/loss"
VAL_CIDER = "val/cider"
VAL_CIDER_BEST = "val/cider_best"  # best validation CIDEr so far; what the study optimises
BEST_EPOCH = "val/best_epoch"
VAL_BLEU = tuple(f"val/bleu_{n}" for n in range(1, 5))
VAL_ROUGE_L = "val/rouge_l"
VAL_ATTRIBUTE_F1 = "val/attribute_f1"  # synthetic demo world only
EPOCH_SECONDS = "time/epoch_s"
VAL_SECONDS = "time/val_s"

# scorer keys returned by capdec.metrics, without a split prefix
SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")
FINAL_SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
