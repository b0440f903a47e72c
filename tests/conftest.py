"""Shared pytest hooks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Test helpers (models_for_tests, interp_child) live in tests/; the gpu tests reuse the
# helpers of their CPU twins in tests/single.
_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE / "single"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


# --- gpu marker: tests marked ``@pytest.mark.gpu`` are skipped without CUDA ---------------------
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_forced_backend(monkeypatch):
    """Automatic attention backend choice for the test (no env var, nothing forced)."""
    from helix_compiler.kernels import attention as A

    monkeypatch.delenv(A.ENV_VAR, raising=False)
    A.set_attention_backend(None)
    yield
    A.set_attention_backend(None)
