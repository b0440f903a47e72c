"""Pass: make a segment graph device-neutral.

torch.export bakes the capture device into every factory call and device move
(``aten.arange(..., device=meta)``, ``aten.to.device(x, meta, ...)``,
``aten.to.dtype_layout(..., device=cpu)``): a model built under ``torch.device("meta")``
would produce meta tensors at run time, and a model captured on CPU would make CPU
tensors on a CUDA rank. This pass replaces every ``torch.device`` argument that names the
capture device (or ``meta``) with the device of the segment's first tensor input, read at
run time, so one stage graph runs on whatever device its rank computes on. Devices other
than the capture device are left alone (a deliberate move, e.g. an offload, stays).

Before::

    arange = torch.ops.aten.arange.default(sym_size_int_5, dtype = torch.float32, device = device(type='meta'), pin_memory = False)

After::

    device = input_ids.device
    ...
    arange = torch.ops.aten.arange.default(sym_size_int_5, dtype = torch.float32, device = device, pin_memory = False)
"""

from __future__ import annotations

import torch
import torch.fx as fx

META = torch.device("meta")


def capture_device(gm: fx.GraphModule) -> torch.device | None:
    """The device the graph was captured on: that of its placeholders' example values."""
    for n in gm.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            return val.device
    return None


def make_device_neutral(gm: fx.GraphModule, *, captured_on: torch.device | None = None) -> int:
    """Pass: replace the capture device (and ``meta``) in every node's arguments with the
    run-time device of the graph's first tensor placeholder. Returns how many arguments
    were replaced (0 leaves the graph untouched)."""
    captured_on = captured_on if captured_on is not None else capture_device(gm)
    baked = {META} | ({torch.device(captured_on)} if captured_on is not None else set())
    anchor = next((n for n in gm.graph.nodes if n.op == "placeholder"
                   and isinstance(n.meta.get("val", torch.empty(0)), torch.Tensor)), None)
    device_node: fx.Node | None = None
    count = 0

    def swap(a):
        nonlocal device_node, count
        if isinstance(a, torch.device) and a in baked:
            if device_node is None:
                assert anchor is not None, "device_neutral: a graph with a device constant has no tensor input"
                last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
                with gm.graph.inserting_after(last_placeholder):
                    device_node = gm.graph.call_function(getattr, (anchor, "device"))
                device_node.name = "device"
            count += 1
            return device_node
        return a

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node is device_node:
            continue
        before = count
        args = fx.node.map_aggregate(node.args, swap)
        kwargs = fx.node.map_aggregate(node.kwargs, swap)
        if count != before:
            node.args, node.kwargs = tuple(args), dict(kwargs)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def neutral_token_count(token_count):
    """The token counter (``ir.stage_program.TokenCount``) over a device-neutral copy of its
    graph (the original program's graph stays as captured); None stays None."""
    if token_count is None:
        return None
    import copy
    import dataclasses

    gm = copy.deepcopy(token_count.gm)  # a small graph over the user inputs only
    make_device_neutral(gm)
    return dataclasses.replace(token_count, gm=gm)
