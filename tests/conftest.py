"""Shared pytest hooks."""

from __future__ import annotations

import pytest
import torch


# --- gpu marker: tests marked ``@pytest.mark.gpu`` are skipped without CUDA ---------------------
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
