"""helix_compiler: HelixPipe attention-parallel pipeline parallelism as a compiler over torch.fx."""

from __future__ import annotations

from .backend import register as _register_backend
from .compile import helix_compile
from .config import HelixConfig
from .errors import CaptureError, HelixError, RuntimeFailure, ScheduleError, UnsupportedModelError
from .kernels import attention as _attention  # noqa: F401  (registers torch.ops.helix.attention)
from .load import load_pretrained
from .program import HelixProgram, compile_program
from .runtime.master_weights import master_weight_optimizer
from .runtime.materialize import init_model
from .runtime.pipeline import HelixPipeline
from .runtime.zero import sharded_optimizer

_register_backend()

__all__ = ["CaptureError", "HelixConfig", "HelixError", "HelixPipeline", "HelixProgram", "RuntimeFailure",
           "ScheduleError", "UnsupportedModelError", "compile_program", "helix_compile", "init_model",
           "load_pretrained", "master_weight_optimizer", "sharded_optimizer"]
