"""CapDec: text-only training of a ClipCap-style captioner with noise-injected CLIP embeddings.

This package is the method alone. It imports neither Ray, Optuna nor MLflow, so one run can be
trained from a test or a short script.
"""

from capdec.config import ModelConfig, NoiseConfig, RunConfig, TrainConfig
from capdec.prepared import PreparedDataset, load_prepared, write_prepared

__all__ = [
    "ModelConfig",
    "NoiseConfig",
    "PreparedDataset",
    "RunConfig",
    "TrainConfig",
    "load_prepared",
    "write_prepared",
]
