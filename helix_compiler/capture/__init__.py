"""Front ends: torch.export capture of nn.Modules and Dynamo GraphModules, model adapters."""

from .export import CapturedGraph, capture

__all__ = ["CapturedGraph", "capture"]
