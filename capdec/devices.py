"""Checked selection of the torch device a run or an encoder uses."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a torch.device, after checking that this machine has it.

    Raises:
        ValueError: for an unknown device string, or a CUDA device on a machine without CUDA
            or with fewer GPUs than the index names.
    """
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"invalid torch device {device!r}: use cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} requested but CUDA is not available on this machine; "
                "use --device cpu, or --gpus-per-trial 0 for a study"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} requested but this machine has "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    return resolved
