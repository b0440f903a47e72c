"""Front end for ``torch.compile``: turn the GraphModule Dynamo hands a backend back into an
``nn.Module`` called as ``(input_ids, labels, **inputs) -> loss``, so it takes the same
export route.

Dynamo lifts parameters, buffers and size symbols to graph inputs; their sources
(``L['self']._modules['layers']._modules['0']._parameters['weight']``,
``L['input_ids'].size()[1]``) say what each input is. A Hugging Face model called the Hugging
Face way, ``compiled(input_ids=..., labels=..., position_ids=...)``, is traced from its forward
wrapper: the model is ``L['args'][0]`` and the inputs are ``L['kwargs']['input_ids']`` & co.
Its graph returns the loss and the logits; the loss is the one 0-dim floating output. The wrapper registers the user's own
parameters under their original names and replays the graph through ``fx.Interpreter`` with
node meta preserved, so the exported ATen nodes keep Dynamo's module stacks (which the layer
analysis reads).
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.fx import traceback as fx_traceback

from ..errors import CaptureError

_TOKEN = re.compile(r"\['([^']+)'\]|\.([A-Za-z_]\w*)")
_ROOT = re.compile(r"^L\['self'\]|^L\['args'\]\[0\](?=\.)")  # the model (self, or a wrapper's args[0])
_SIZE = re.compile(r"^L(?:\['kwargs'\])?\['(\w+)'\]\.size\(\)\[(\d+)\]$")
_INPUT = re.compile(r"^L(?:\['kwargs'\])?\['(\w+)'\]$")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def graph_sources(gm: fx.GraphModule) -> list[str]:
    """The Dynamo source name of every placeholder (read before Dynamo drops the meta)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            arg = n.meta.get("grapharg")
            if arg is None:
                raise CaptureError(f"placeholder {n.name} has no Dynamo source: pass the GraphModule a "
                                   f"torch.compile backend receives, unchanged")
            out.append(arg.source.name)
    return out


def is_model_attribute(source: str) -> bool:
    return _ROOT.match(source) is not None


def attribute_path(source: str) -> str:
    """``L['self']._modules['norm']._parameters['weight']`` -> ``norm.weight`` (also from
    ``L['args'][0]...``, the model as a forward wrapper's first argument)."""
    tokens = [a or b for a, b in _TOKEN.findall(_ROOT.sub("", source))]
    return ".".join(t for t in tokens if t not in _CONTAINERS)


def _inline_wrapped_scalars(gm: fx.GraphModule, example_inputs, sources: list[str]) -> fx.GraphModule:
    """Under ``dynamic=True`` Dynamo passes float module attributes (``eps``, ``norm_type``) as
    0-d tensors read back with ``.item()``; an export would see a data-dependent scalar. Such
    attributes are constants of the model: put their values back into the graph."""
    gm = fx.GraphModule(gm, gm.graph)  # a copy: Dynamo keeps the original
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, src, ex in zip(phs, sources, example_inputs, strict=True):
        wrapped = is_model_attribute(src) and not re.search(r"\._(parameters|buffers)\[", src)
        if wrapped and isinstance(ex, torch.Tensor) and ex.dim() == 0:
            for user in list(node.users):
                if user.op == "call_method" and user.target == "item":
                    user.replace_all_uses_with(ex.item())
                    gm.graph.erase_node(user)
    gm.recompile()
    return gm


def _type_module(t) -> str:
    """The module of an ``nn_module_stack`` entry's type (a class, or its qualified name)."""
    return t if isinstance(t, str) else getattr(t, "__module__", "")


class DynamoModule(torch.nn.Module):
    def __init__(self, gm: fx.GraphModule, example_inputs, sources: list[str]):
        super().__init__()
        gm = _inline_wrapped_scalars(gm, example_inputs, sources)
        object.__setattr__(self, "_graph", gm)  # not a submodule: its state is ours
        self.model = torch.nn.Module()
        self._slots: list[tuple[str, object]] = []  # per placeholder: (kind, what)
        names: list[str] = []
        for src, ex in zip(sources, example_inputs, strict=True):
            if is_model_attribute(src):
                path = attribute_path(src)
                self._register(path, ex)
                self._slots.append(("attr", "model." + path))
            elif (m := _SIZE.match(src)) is not None:
                self._slots.append(("size", (m.group(1), int(m.group(2)))))
            elif (m := _INPUT.match(src)) is not None:
                names.append(m.group(1))
                self._slots.append(("input", m.group(1)))
            else:
                raise CaptureError(f"torch.compile backend 'helix': graph input {src} is neither a model "
                                   f"attribute, a model input nor an input size")
        if "input_ids" in names and "labels" in names:
            extra = [n for n in names if n not in ("input_ids", "labels")]
            self.input_names = ["input_ids", "labels", *extra]
        elif len(names) == 2:  # forward(x, y): token ids and labels by position
            self.input_names = names
        else:
            raise CaptureError(
                f"torch.compile backend 'helix' needs the model called with input_ids and labels (and any "
                f"extra per-token inputs by keyword); the captured graph takes inputs {names}")
        self.extra_inputs = tuple(self.input_names[2:])
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaves = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        vals = [x.meta.get("example_value") if isinstance(x, fx.Node) else x for x in leaves]
        losses = [k for k, v in enumerate(vals) if isinstance(v, torch.Tensor) and v.dim() == 0
                  and v.is_floating_point()]
        if len(vals) > 1 and len(losses) != 1:
            raise CaptureError(f"torch.compile backend 'helix': the model returns {len(vals)} values of which "
                               f"{len(losses)} are scalar losses; it must return the loss (one 0-dim tensor), "
                               f"e.g. call a Hugging Face model with labels")
        self.loss_index = losses[0] if losses else 0
        self.output_values = vals  # example values: the shapes of the outputs a pipeline does not make
        # a Hugging Face model scored by its own loss (a token mean): loss_reduction "tokens"
        self.hf_loss = any(_type_module(t).startswith("transformers.") for n in gm.graph.nodes
                           for _, t in n.meta.get("nn_module_stack", {}).values())

    def _register(self, path: str, value) -> None:
        *parents, leaf = path.split(".")
        mod = self.model
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if isinstance(value, torch.nn.Parameter):
            mod.register_parameter(leaf, value)
        elif isinstance(value, torch.Tensor):
            mod.register_buffer(leaf, value, persistent=False)
        else:
            raise CaptureError(f"torch.compile backend 'helix': model attribute {path} is a "
                               f"{type(value).__name__}, not a tensor")

    def forward(self, input_ids, labels, **extra):
        given = dict(zip(self.input_names, (input_ids, labels), strict=False)) | extra
        args = []
        for kind, what in self._slots:
            if kind == "input":
                args.append(given[what])
            elif kind == "size":
                args.append(given[what[0]].shape[what[1]])
            else:
                args.append(self.get_parameter(what) if what in dict(self.named_parameters(remove_duplicate=False))
                            else self.get_buffer(what))
        with fx_traceback.preserve_node_meta():
            out = fx.Interpreter(self._graph).run(*args)
        if isinstance(out, (tuple, list)):
            out = out[self.loss_index]
        return out
