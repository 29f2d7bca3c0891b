"""Tests marked ``cuda`` need a CUDA GPU: where none is visible they are skipped, and the reason says so."""

import pytest


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if "cuda" in item.keywords]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                                   "(scripts/gpu_check.sh runs these where a GPU is lent)")
    for item in cuda_items:
        item.add_marker(skip)
