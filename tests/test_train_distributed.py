"""`xdlm.train.distributed` in one process: a world-size-1 gloo group is real enough for DDP and
FSDP2 to wrap, shard, skip gradient sync and clip DTensor gradients on the CPU; the decisions
that depend on the world size take a `DistContext` naming it. What only several processes show
(gradients averaged across ranks, resharded resumes) is tests/test_distributed.py (torchrun)."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from xdlm.collectives import DistContext
from xdlm.config import DistConfig
from xdlm.train import distributed as D

CPU = torch.device("cpu")


def _ctx(rank=0, world_size=1, local_rank=0) -> DistContext:
    return DistContext(rank, world_size, local_rank, CPU)


@pytest.fixture
def one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class Blocks(nn.Module):
    """Two linear blocks and a head: the `blocks` layout FSDP and checkpointing need."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in "ab"])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
            for n, p in model.named_parameters()}  # fmt: skip


# ---------------------------------------------------------------- devices and the process group


def test_resolve_device_gives_cuda_its_local_rank(monkeypatch):
    assert D.resolve_device("cpu") == CPU and D.resolve_device("cpu", 3) == CPU
    monkeypatch.setattr(D, "build_device", lambda name: "cuda")
    assert D.resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert D.resolve_device("auto") == torch.device("cuda", 0)


def test_one_process_needs_no_group_and_names_its_device(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.setup_distributed(DistConfig(), "cpu") == _ctx()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert D.setup_distributed(DistConfig(strategy="ddp"), "cpu") == _ctx()
    assert not dist.is_initialized()


def test_setup_refuses_an_unknown_strategy_and_torchrun_without_one(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"unknown dist.strategy 'zero'; choose one of \("):
        D.setup_distributed(DistConfig(strategy="zero"), "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    want = r"^launched with WORLD_SIZE=2 but dist.strategy=none; pass --set dist.strategy=ddp"
    with pytest.raises(ValueError, match=want):
        D.setup_distributed(DistConfig(), "cpu")


def test_under_torchrun_the_group_is_gloo_on_cpu_with_the_timeout(monkeypatch, tmp_path):
    """torchrun's environment: the group is joined once, with gloo on the CPU and the
    collective timeout of XDLM_DIST_TIMEOUT_S; rank and size come from the group."""
    calls = []

    real = dist.init_process_group

    def init(backend, timeout):  # the real group, of one process (torchrun would give two)
        calls.append((backend, timeout))
        real(backend, init_method=f"file://{tmp_path / 's'}", rank=0, world_size=1,
             timeout=timeout)  # fmt: skip

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(D.TIMEOUT_ENV, "7.5")
    try:
        ctx = D.setup_distributed(DistConfig(strategy="ddp"), "cpu")
        assert calls == [("gloo", timedelta(seconds=7.5))]
        assert ctx == _ctx(0, 1, 1)  # rank and world size are the group's
        monkeypatch.delenv(D.TIMEOUT_ENV)
        assert D.setup_distributed(DistConfig(strategy="fsdp"), "cpu") == ctx
        assert len(calls) == 1  # joined once
    finally:
        dist.destroy_process_group()
    calls.clear()
    (tmp_path / "s").unlink(missing_ok=True)
    try:
        D.setup_distributed(DistConfig(strategy="ddp"), "cpu")
        assert calls == [("gloo", timedelta(seconds=600))]
    finally:
        dist.destroy_process_group()


def test_cleanup_leaves_only_a_group_of_several_processes(one_process):
    D.cleanup(_ctx())
    assert dist.is_initialized()
    D.cleanup(_ctx(world_size=2))
    assert not dist.is_initialized()
    D.cleanup(_ctx(world_size=2))  # already gone: nothing to do


# ---------------------------------------------------------------- wrapping


def test_wrap_refuses_unknown_strategies_and_fsdp_policies_elsewhere():
    with pytest.raises(ValueError, match=r"unknown dist.strategy 'zero'; choose one of \("):
        D.wrap_model(Blocks(), DistConfig(strategy="zero"), _ctx())
    for policy in ("mixed_precision", "cpu_offload"):
        for strategy in ("none", "ddp"):
            cfg = DistConfig(strategy=strategy, **{policy: True})
            with pytest.raises(
                ValueError,
                match=r"^dist.mixed_precision / dist.cpu_offload are "
                r"FSDP2 policies; set dist.strategy=fsdp \(for bf16 autocast without FSDP use "
                r"train.precision=bf16\)$",
            ):
                D.wrap_model(Blocks(), cfg, _ctx(world_size=2))


def test_a_model_without_blocks_is_named():
    with pytest.raises(ValueError, match=r"^Linear has no `blocks` ModuleList; FSDP and "
                       r"activation checkpointing wrap one transformer block at a time \(DiT / "
                       r"HFDenoiser have it\)$"):  # fmt: skip
        D.wrap_model(nn.Linear(2, 2), DistConfig(activation_checkpointing=True), _ctx())


@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp"])
def test_one_process_trains_the_model_itself(strategy):
    model = Blocks()
    assert D.wrap_model(model, DistConfig(strategy=strategy), _ctx()) is model
    assert not D.is_sharded(model)


def test_strategy_none_trains_the_model_itself_whatever_the_world():
    model = Blocks()
    assert D.wrap_model(model, DistConfig(strategy="none"), _ctx(world_size=2)) is model


def test_ddp_on_a_gpu_rank_is_given_its_device(monkeypatch):
    """What DDP is asked for on cuda:1 (recorded here: this machine has no GPU)."""
    import torch.nn.parallel

    asked = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: asked.append(device_ids) or model)  # fmt: skip
    ctx = DistContext(1, 2, 1, torch.device("cuda", 1))
    D.wrap_model(Blocks(), DistConfig(strategy="ddp"), ctx)
    assert asked == [[1]]


def test_activation_checkpointing_recomputes_each_block_in_backward():
    """Same output, gradients and parameter names; each block runs again in backward."""
    plain, ckpt = Blocks(), Blocks()
    wrapped = D.wrap_model(ckpt, DistConfig(activation_checkpointing=True), _ctx())
    assert wrapped is ckpt
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    runs = []
    for block in ckpt.blocks:  # the block's modules run again in backward, not the block
        block[0].register_forward_hook(lambda m, a, out: runs.append(m))
    x = torch.randn(3, 4)
    out = ckpt(x)
    assert torch.equal(out, plain(x)) and len(runs) == 2
    out.sum().backward()
    plain(x).sum().backward()
    assert len(runs) == 4  # each block recomputed once
    assert all(torch.equal(a, b) for a, b in zip(_grads(ckpt).values(), _grads(plain).values(),
                                                 strict=True))  # fmt: skip


def test_ddp_wraps_the_model_without_device_ids_on_the_cpu(one_process):
    model = Blocks()
    ddp = D.wrap_model(model, DistConfig(strategy="ddp"), _ctx(world_size=2))
    assert isinstance(ddp, DistributedDataParallel) and ddp.module is model
    assert ddp.device_ids is None and not D.is_sharded(ddp)
    with D.no_sync(ddp, True):
        assert not ddp.require_backward_grad_sync
    assert ddp.require_backward_grad_sync
    with D.no_sync(ddp, False):
        assert ddp.require_backward_grad_sync


def test_fsdp_shards_every_block_then_the_root(one_process):
    model = Blocks()
    x = torch.randn(3, 4)
    want = Blocks()(x)
    wrapped = D.wrap_model(model, DistConfig(strategy="fsdp"), _ctx(world_size=2))
    assert wrapped is model and D.is_sharded(model)
    assert all(isinstance(b, FSDPModule) for b in model.blocks)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert not isinstance(model.head, FSDPModule)  # the head belongs to the root
    assert torch.allclose(model(x), want)
    dtypes = []
    model.blocks[0][0].register_forward_pre_hook(lambda m, a: dtypes.append(m.weight.dtype))
    model(x)
    assert dtypes == [torch.float32]  # no mixed precision unless asked


def test_fsdp_mixed_precision_computes_blocks_in_bf16(one_process):
    model = Blocks()
    cfg = DistConfig(strategy="fsdp", mixed_precision=True, activation_checkpointing=True)
    D.wrap_model(model, cfg, _ctx(world_size=2))
    dtypes = []
    for module in (model.blocks[0][0], model.blocks[1][0], model.head):
        module.register_forward_pre_hook(lambda m, a: dtypes.append(m.weight.dtype))
    model(torch.randn(3, 4)).float().sum().backward()
    assert dtypes[:3] == [torch.bfloat16] * 3  # then the blocks' recomputation in backward
    assert dtypes[3:] == [torch.bfloat16] * 2
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_fsdp_is_given_the_configured_policies(one_process, monkeypatch):
    """What `fully_shard` is asked for: each block, then the root; the last block stays
    unsharded after forward (backward needs it first); bf16 parameters with fp32 reduction;
    CPU offload. (Offload pins memory, which needs an accelerator: the real call here gets the
    other arguments only.)"""
    import torch.distributed.fsdp as fsdp

    real, calls = fsdp.fully_shard, []

    def fully_shard(module, **kwargs):
        calls.append((module, dict(kwargs)))
        kwargs.pop("offload_policy", None)
        return real(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", fully_shard)
    model = Blocks()
    cfg = DistConfig(strategy="fsdp", mixed_precision=True, cpu_offload=True)
    D.wrap_model(model, cfg, _ctx(world_size=2))
    assert [m for m, _ in calls] == [*model.blocks, model]
    assert [kw.get("reshard_after_forward") for _, kw in calls] == [True, False, None]
    for _, kw in calls:
        assert (kw["mp_policy"].param_dtype, kw["mp_policy"].reduce_dtype) == (
            torch.bfloat16, torch.float32,
        )  # fmt: skip
        assert isinstance(kw["offload_policy"], fsdp.CPUOffloadPolicy)
    calls.clear()
    D.wrap_model(Blocks(), DistConfig(strategy="fsdp"), _ctx(world_size=2))
    assert [sorted(kw) for _, kw in calls] == [["reshard_after_forward"]] * 2 + [[]]


def test_fsdp_no_sync_accumulates_until_the_last_micro_batch(one_process):
    """Skipping sync leaves the sharded gradients unset; the syncing backward adds both
    micro-batches: the gradient of the two together."""
    model, ref = Blocks(), Blocks()
    D.wrap_model(model, DistConfig(strategy="fsdp"), _ctx(world_size=2))
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    with D.no_sync(model, True):
        model(x1).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    with D.no_sync(model, False):
        model(x2).sum().backward()
    (ref(x1).sum() + ref(x2).sum()).backward()
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_no_sync_of_a_plain_model_changes_nothing():
    model = Blocks()
    with D.no_sync(model, True):
        model(torch.ones(1, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- clipping


def test_clip_returns_the_norm_before_clipping_and_skips_missing_grads():
    model = nn.Linear(2, 2)
    model.weight.grad = torch.full((2, 2), 3.0)  # norm 6; the bias has no gradient
    norm = D.clip_grad_norm_(model.parameters(), 1.5)
    assert norm.item() == pytest.approx(6.0) and model.bias.grad is None
    assert torch.allclose(model.weight.grad, torch.full((2, 2), 0.75), atol=1e-5)
    assert D.clip_grad_norm_(model.parameters(), 100.0).item() == pytest.approx(1.5, abs=1e-5)
    assert torch.allclose(model.weight.grad, torch.full((2, 2), 0.75), atol=1e-5)


def test_clip_of_dtensor_gradients_gives_a_plain_norm(one_process):
    model, ref = Blocks(), Blocks()
    D.wrap_model(model, DistConfig(strategy="fsdp"), _ctx(world_size=2))
    x = torch.randn(3, 4)
    model(x).sum().backward()
    ref(x).sum().backward()
    norm = D.clip_grad_norm_(model.parameters(), 0.5)
    want = D.clip_grad_norm_(ref.parameters(), 0.5)
    assert type(norm) is torch.Tensor and norm.dim() == 0
    assert norm.item() == pytest.approx(want.item(), rel=1e-5)
    assert norm.item() > 0.5  # clipped: the sharded gradients now have norm 0.5
    got = _grads(model)
    assert all(torch.allclose(got[n], p.grad, atol=1e-6) for n, p in ref.named_parameters())
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in got.values()])).item() == (
        pytest.approx(0.5, rel=1e-4)
    )


# ---------------------------------------------------------------- resume state and the batch line


def test_rank_state_same_world_is_the_rank_own():
    states = [{"loader": {"position": 8}, "noise_rng": 0}, {"loader": {"position": 9}}]
    assert D.rank_state(states, _ctx(rank=1, world_size=2)) is states[1]
    assert D.rank_state(states, _ctx(rank=0, world_size=2)) is states[0]


def test_rank_state_of_another_world_rescales_rank_0_loader(capsys):
    states = [{"loader": {"position": 10 + r, "epoch": 3}, "noise_rng": "a"} for r in (0, 5, 9)]
    got = D.rank_state(states, _ctx(rank=1, world_size=2))
    assert got == {"loader": {"position": 15, "epoch": 3}}  # rank 0's 10 × 3 // 2
    assert states[0]["loader"]["position"] == 10  # the saved state is not modified
    assert capsys.readouterr().out == ""  # only rank 0 says it
    got = D.rank_state(states[:2], _ctx(rank=0, world_size=4))
    assert got == {"loader": {"position": 5, "epoch": 3}}  # 10 × 2 // 4
    assert capsys.readouterr().out == (
        "resuming a 2-process checkpoint on 4 processes: data order continues by rows "
        "consumed; noise RNG streams restart\n"
    )
    assert D.rank_state(states[:2], _ctx(rank=0, world_size=3))["loader"]["position"] == 6


def test_describe_batch_multiplies_micro_accum_and_world():
    ctx = DistContext(1, 4, 1, CPU)
    assert D.describe_batch(8, 2, "ddp", ctx) == (
        "global batch 64 sequences = micro 8 x accum 2 x world 4 (dist.strategy=ddp, device cpu)"
    )


def test_a_gpu_rank_uses_its_local_gpu_and_nccl(monkeypatch, tmp_path):
    """Under torchrun on GPUs (asked here of a CPU machine: the device is named, set and the
    backend chosen; the group itself is gloo over one process)."""
    real, calls = dist.init_process_group, []

    def init(backend, timeout):
        calls.append(backend)
        real("gloo", init_method=f"file://{tmp_path / 's'}", rank=0, world_size=1)

    monkeypatch.setattr(D, "build_device", lambda name: "cuda")
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(dev))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.setup_distributed(DistConfig(), "auto").device == torch.device("cuda", 3)
    assert calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        ctx = D.setup_distributed(DistConfig(strategy="ddp"), "cuda")
    finally:
        dist.destroy_process_group()
    assert ctx == DistContext(0, 1, 3, torch.device("cuda", 3))
    assert calls == [torch.device("cuda", 3), "nccl"]
