"""``torch.compile(model, backend="helix", dynamic=True, options={...})``.

Registered on import of ``helix_compiler`` and through the ``torch_dynamo_backends`` entry
point. Options are ``helix_compile``'s keywords (``pp_size`` defaults to the process group
size, ``seq_len`` and ``num_microbatches * micro_batch_size`` come from the example batch).
The compiled function returns the pipelined loss; ``loss.backward()`` runs the backward half.
A Hugging Face model may be called its own way, ``compiled(input_ids=..., labels=...,
position_ids=...)``: its extra inputs become the pipeline's, its loss is the token mean over
the step (``loss_reduction="tokens"``), and its output object carries that loss; the logits,
which a pipeline never gathers (they exist per micro batch on the head rank), come back as a
``meta`` tensor of their shape, so any read of their values fails loudly instead of seeing
made-up numbers.
"""

from __future__ import annotations

import sympy
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
    slots = [_input_slot(sources, name) for name in module.input_names]
    ids, labels = (example_inputs[k] for k in slots[:2])
    transport = opts.pop("transport", None) or Transport(timeout=opts.pop("timeout", 60.0))
    pp_size = opts.pop("pp_size", transport.world_size)
    micro_batch_size = opts.pop("micro_batch_size", 1)
    if ids.shape[0] % micro_batch_size:
        raise HelixError(f"batch size {ids.shape[0]} is not a multiple of micro_batch_size={micro_batch_size}")
    opts.setdefault("num_microbatches", ids.shape[0] // micro_batch_size)
    if module.hf_loss:
        opts.setdefault("loss_reduction", "tokens")
    example = dict(zip(module.input_names, (example_inputs[k] for k in slots), strict=True))
    # Our own torch.export runs outside Dynamo's tracing context: its shape guards name the
    # export's inputs (L['input_ids']), not this frame's (L['kwargs']['input_ids']), and
    # must not be installed on the user's frame.
    with torch._guards.tracing(None):
        pipe = helix_compile(module, pp_size, int(ids.shape[1]), micro_batch_size=micro_batch_size,
                             transport=transport, example_inputs=example, inputs=module.extra_inputs, **opts)
    sizes = {example_inputs[k].node.expr: k for k, src in enumerate(sources)
             if ".size()[" in src and isinstance(example_inputs[k], torch.SymInt)}

    def run(*args):
        loss = pipe(args[slots[0]], args[slots[1]],
                    **{name: args[k] for name, k in zip(module.extra_inputs, slots[2:], strict=True)})
        outs = [loss if k == module.loss_index else _unmaterialized(v, sizes, args)
                for k, v in enumerate(module.output_values)]
        return tuple(outs)

    run.pipeline = pipe
    return run


def _input_slot(sources: list[str], name: str) -> int:
    for form in (f"L['{name}']", f"L['kwargs']['{name}']"):
        if form in sources:
            return sources.index(form)
    raise HelixError(f"backend 'helix': the graph has no input {name!r} (inputs: {sources})")


def _unmaterialized(value, sizes: dict, args) -> torch.Tensor:
    """A meta tensor with the run-time shape of an output the pipeline does not compute."""
    if not isinstance(value, torch.Tensor):
        return value
    env = {sym: int(args[k]) for sym, k in sizes.items()}
    shape = []
    for d in value.shape:
        if isinstance(d, torch.SymInt):
            expr = sympy.sympify(d.node.expr.xreplace(env))
            if not expr.is_number:
                raise HelixError(f"backend 'helix': cannot size the output of shape {tuple(value.shape)} at run time")
            d = int(expr)
        shape.append(int(d))
    return torch.empty(shape, dtype=value.dtype, device="meta")


def register() -> None:
    from torch._dynamo import list_backends, register_backend

    if "helix" not in list_backends(exclude_tags=()):
        register_backend(name="helix")(helix_backend)
