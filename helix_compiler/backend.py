"""``torch.compile(model, backend="helix", dynamic=True, options={...})``.

Registered on import of ``helix_compiler`` and through the ``torch_dynamo_backends`` entry
point. Options are ``helix_compile``'s keywords (``pp_size`` defaults to the process group
size, ``seq_len`` and ``num_microbatches * micro_batch_size`` come from the example batch).
The compiled function returns the pipelined loss; ``loss.backward()`` runs the backward half.
"""

from __future__ import annotations

import torch

from .capture.dynamo import DynamoModule, graph_sources
from .errors import HelixError


def helix_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    from .compile import helix_compile
    from .runtime.transport import Transport

    opts = dict(options or {})
    if kwargs.get("mode") is not None:
        raise HelixError(f"torch.compile(mode={kwargs['mode']!r}) has no meaning for backend 'helix'; "
                         f"pass settings through options={{...}}")
    sources = graph_sources(gm)
    if not any(".size()[" in src for src in sources):
        raise HelixError("backend 'helix' needs the sequence length symbolic: call "
                         "torch.compile(model, backend='helix', dynamic=True, options={...})")
    module = DynamoModule(gm, example_inputs, sources)
    slots = [sources.index(f"L['{name}']") for name in module.input_names]
    ids, labels = (example_inputs[k] for k in slots)
    transport = opts.pop("transport", None) or Transport(timeout=opts.pop("timeout", 60.0))
    pp_size = opts.pop("pp_size", transport.world_size)
    micro_batch_size = opts.pop("micro_batch_size", 1)
    if ids.shape[0] % micro_batch_size:
        raise HelixError(f"batch size {ids.shape[0]} is not a multiple of micro_batch_size={micro_batch_size}")
    opts.setdefault("num_microbatches", ids.shape[0] // micro_batch_size)
    pipe = helix_compile(module, pp_size, int(ids.shape[1]), micro_batch_size=micro_batch_size,
                         transport=transport, example_inputs=(ids, labels), **opts)

    def run(*args):
        return (pipe(args[slots[0]], args[slots[1]]),)

    run.pipeline = pipe
    return run


def register() -> None:
    from torch._dynamo import list_backends, register_backend

    if "helix" not in list_backends(exclude_tags=()):
        register_backend(name="helix")(helix_backend)
