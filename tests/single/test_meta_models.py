"""Meta-device models in one process: device-neutral stage graphs, per-rank materialization
(only owned tensors allocated, initialized equal to ``init_model`` of the whole model,
rotary buffers recomputed), and the pipeline module's state by the user's names."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helix_compiler import HelixError, compile_program, init_model  # noqa: E402
from helix_compiler.lowering.device_neutral import make_device_neutral  # noqa: E402
from helix_compiler.lowering.stage_program import lower_program  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, hf_model  # noqa: E402
from helix_compiler.runtime.materialize import materialize_stage  # noqa: E402

SEQ = 16


def _build(arch: str):
    if arch == "llama":
        return Llama(LlamaConfig(num_layers=4))
    if arch == "gpt":
        return GPT(GPTConfig(num_layers=4, max_seq_len=64))
    return hf_model(arch.removeprefix("hf_"), num_layers=4)


def _meta(arch: str):
    with torch.device("meta"):
        return _build(arch)


def _stages(model, p: int = 2):
    return lower_program(compile_program(model, pp_size=p, seq_len=SEQ, num_microbatches=2 * p, num_folds=2))


def test_device_neutral_pass_replaces_capture_device():
    class M(torch.nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)

    with torch.device("meta"):
        x = torch.randn(2, 5)
    gm = torch.export.export(M(), (x,), strict=False).module()
    assert "device(type='meta')" in gm.code
    assert make_device_neutral(gm) >= 1
    assert "device(type='meta')" not in gm.code and "= x.device" in gm.code
    gm.graph.lint()
    y = torch.randn(2, 5, dtype=torch.float64)
    out = gm(y)
    assert out.device.type == "cpu" and torch.equal(out, y + torch.arange(5, dtype=torch.float64))


@pytest.mark.parametrize("arch", ["llama", "hf_llama", "hf_gpt2"])
def test_stage_graphs_have_no_baked_device(arch):
    for st in _stages(_meta(arch)):
        for seg in st.segments.values():
            for gm in (seg.gm, seg.eval_gm):
                assert "device(type='meta')" not in gm.code, f"{arch} {seg.name}:\n{gm.code}"
        if st.token_count is not None:
            assert "device(type='meta')" not in st.token_count.gm.code


@pytest.mark.parametrize("arch", ["llama", "gpt", "hf_llama", "hf_gpt2"])
def test_per_rank_materialization_equals_full_init(arch):
    """Each rank, from its own meta model, allocates only what it owns; the values equal
    init_model over the whole model (per-module seeds), buffers included."""
    full = init_model(_meta(arch), seed=3, device="cpu")
    full_state = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    owners: dict[str, int] = {}
    p = 2
    for rank in range(p):
        model = _meta(arch)
        stage = materialize_stage(_stages(model, p)[rank], model, device=torch.device("cpu"), seed=3)
        mine = {**stage.params, **stage.owned_state.buffers}
        assert mine, f"rank {rank} owns nothing"
        for name, t in mine.items():
            assert t.device.type == "cpu", name
            assert torch.equal(t, full_state[name]), f"{arch} rank {rank}: {name} differs from init_model"
            owners.setdefault(name, rank)
        allocated = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}
        assert allocated == set(mine), f"rank {rank} allocated {sorted(allocated - set(mine))} it does not own"
        # the segment graphs read the new tensors, never a meta one
        for seg in stage.segments.values():
            for n in seg.gm.graph.nodes:
                if n.op == "get_attr":
                    path, _, leaf = n.target.rpartition(".")
                    assert not getattr(seg.gm.get_submodule(path) if path else seg.gm, leaf).is_meta, n.target
    assert set(n for n, _ in full.named_parameters()) <= set(owners)


def test_rotary_buffers_recomputed_as_built():
    """inv_freq of a meta-built model is recomputed to the value a real build computes."""
    for arch, name in (("llama", "inv_freq"), ("hf_llama", "model.rotary_emb.inv_freq")):
        real = dict(_build(arch).named_buffers())[name]
        meta = init_model(_meta(arch), device="cpu")
        assert torch.equal(dict(meta.named_buffers())[name], real), arch


def test_init_model_seeds_by_name():
    a = init_model(_meta("llama"), seed=0, device="cpu")
    b = init_model(_meta("llama"), seed=0, device="cpu")
    c = init_model(_meta("llama"), seed=1, device="cpu")
    for (n, x), y, z in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(x, y), n
        if "layernorm" not in n and n != "norm.weight":  # ones whatever the seed
            assert not torch.equal(x, z), n


def test_module_without_init_is_rejected():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale()

    with torch.device("meta"):
        net = Net()
    with pytest.raises(HelixError, match=r"scale \(Scale\) owns \['w'\].*reset_parameters"):
        init_model(net, device="cpu")


def _pipe(model, rank: int = 0):
    """Rank ``rank``'s pipeline module in this process (no messages are sent: only its state
    is used)."""
    from types import SimpleNamespace

    from helix_compiler import HelixPipeline
    from helix_compiler.runtime.materialize import materialize_rank

    stages = materialize_rank(_stages(model), rank, model, device=torch.device("cpu"))
    transport = SimpleNamespace(device=torch.device("cpu"), world_size=len(stages), rank=rank)
    return HelixPipeline(stages, rank=rank, transport=transport)


def _graph_tensors(pipe):
    for seg in pipe.stage.segments.values():
        for gm in (seg.gm, seg.eval_gm):
            for n in gm.graph.nodes:
                if n.op == "get_attr":
                    path, _, leaf = n.target.rpartition(".")
                    yield n.target, getattr(gm.get_submodule(path) if path else gm, leaf)


def test_pipeline_is_a_module_of_the_owned_state():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = _meta("llama")
    pipe = _pipe(model)
    names = {n for n, _ in pipe.named_parameters()}
    assert names == set(pipe.stage.params) and "embed_tokens.weight" in names
    assert set(pipe.state_dict()) == names  # inv_freq is a non-persistent buffer
    assert set(dict(pipe.named_buffers())) == {"inv_freq"}
    assert getattr(pipe.layers, "0").self_attn.q_proj.weight is pipe.stage.params["layers.0.self_attn.q_proj.weight"]
    opt = torch.optim.AdamW(pipe.parameters())
    msd, osd = get_state_dict(pipe, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert set(msd) == names
    assert {k.rsplit(".", 1)[0] for k in osd if k.startswith("state.")} == {f"state.{n}" for n in names}
    # to(): buffers become new objects (and parameters with swapping on): the graphs follow
    pipe.to(torch.float64)
    held = [*pipe.parameters(), *pipe.buffers()]
    for target, t in _graph_tensors(pipe):
        assert t.dtype == torch.float64 and any(t is h for h in held), target
    assert all(p.dtype == torch.float64 for p in pipe.stage.params.values())


def test_load_state_dict_names_missing_and_unexpected_keys():
    full = init_model(_meta("llama"), device="cpu").state_dict()
    pipe = _pipe(_meta("llama"), rank=1)
    mine = sorted(pipe.state_dict())
    assert "embed_tokens.weight" not in mine  # rank 0's
    pipe.load_state_dict(full)  # the whole model's: other ranks' keys ignored
    pipe.load_state_dict({k: full[k] for k in mine})  # or exactly this rank's
    with pytest.raises(HelixError, match=rf"missing this rank's key\(s\) \['{mine[0]}'\]"):
        pipe.load_state_dict({k: full[k] for k in mine[1:]})
    with pytest.raises(HelixError, match=r"unexpected key\(s\) \['layers\.9\.bogus'\]"):
        pipe.load_state_dict({**full, "layers.9.bogus": torch.zeros(1)})
    result = pipe.load_state_dict({k: full[k] for k in mine[1:]}, strict=False)
    assert result.missing_keys == [mine[0]]
    new = {k: torch.randn_like(v) for k, v in full.items()}
    pipe.load_state_dict(new, assign=True)
    checked = 0
    for target, t in _graph_tensors(pipe):  # the graphs read the assigned tensors (own names here)
        if target in new:
            assert torch.equal(t, new[target]), target
            checked += 1
    assert checked >= len(mine)
