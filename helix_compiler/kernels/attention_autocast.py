"""Autocast rule for ``helix::attention``: like ``scaled_dot_product_attention`` (which it
replaces in the captured graph), q, k and v run in the autocast dtype, so a pipeline under
``torch.autocast`` computes what the model's SDPA computes there. Registered on import."""

from __future__ import annotations

import torch

from . import attention as _attention  # noqa: F401  (defines helix::attention)

_lib = torch.library.Library("helix", "IMPL")
_OP = torch.ops.helix.attention.default


def autocast_inputs(*tensors):
    """``tensors`` as the autocast rule casts them (unchanged outside autocast): what the
    attention replay of recomputation hands the backward op."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type in ("cpu", "cuda") \
                and torch.is_autocast_enabled(t.device.type):
            t = t.to(torch.get_autocast_dtype(t.device.type))
        out.append(t)
    return out


def _register(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == device_type
                else a for a in args[:3]]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return _OP(*cast, *args[3:], **kwargs)

    _lib.impl("attention", kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register(_device_type)
