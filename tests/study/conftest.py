"""A local Ray instance shared by the study tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def local_ray():
    """Start a 2-CPU local Ray once for all study tests and shut it down at the end."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
