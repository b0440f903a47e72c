"""helix_compiler: HelixPipe attention-parallel pipeline parallelism as a compiler over torch.fx."""

from __future__ import annotations

from .backend import register as _register_backend
from .compile import helix_compile
from .config import HelixConfig
from .errors import CaptureError, HelixError, RuntimeFailure, ScheduleError, UnsupportedModelError
from .kernels import attention as _attention  # noqa: F401  (registers torch.ops.helix.attention)
from .program import HelixProgram, compile_program
from .runtime.pipeline import HelixPipeline

_register_backend()

__all__ = ["CaptureError", "HelixConfig", "HelixError", "HelixPipeline", "HelixProgram", "RuntimeFailure",
           "ScheduleError", "UnsupportedModelError", "compile_program", "helix_compile"]
