"""Two CPU processes (gloo) give the same adapter and the same synthetic data as one process."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import tiny_model, tiny_tokenizer

from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
from recover_lora.config import AdapterConfig, DistillConfig
from recover_lora.distill import attach_adapters, train
from recover_lora.training.parallel import init_distributed
from recover_lora.synth import SynthConfig, generate_shard, load_synthetic, synthesize

WORLD = 2
# global batch 8 = 2 ranks x 4; grad_accum 2 exercises DDP's no_sync on the first micro-batch
CFG = dict(steps=4, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=0, checkpoint_every=2)
SYNTH = dict(num_sequences=10, seq_len=10, shard_size=3, batch_size=4)


def _setup():
    torch.manual_seed(0)
    ref = tiny_model("llama", seed=0, initializer_range=0.2)
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0))
    ids = generate_shard(ref, tiny_tokenizer(), SynthConfig(seq_len=16, batch_size=32), 0, 32, bos=False).long()
    student = attach_adapters(deg, AdapterConfig(rank=4), seed=0)
    return ref, student, ids


def _adapter(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, tmp: str, fsdp: bool = False, stop_after: int | None = None,
            hidden_weight: float = 0.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert init_distributed() == (rank, WORLD)
    try:
        ref, student, ids = _setup()
        if rank == 1:
            torch.manual_seed(123)  # a different RNG state must not matter: DDP syncs rank 0's init
            for p in student.parameters():
                if p.requires_grad:
                    p.data.add_(torch.randn_like(p))
        state = train(student, ref, ids, DistillConfig(**CFG, fsdp=fsdp, hidden_weight=hidden_weight),
                      checkpoint=os.path.join(tmp, "ck.pt"),
                      progress=False, stop_after=stop_after)
        if not fsdp:
            synthesize(ref, tiny_tokenizer(), SynthConfig(**SYNTH), os.path.join(tmp, "synth"), progress=False)
        plain = all(type(p) is torch.nn.Parameter for m in (student, ref) for p in m.parameters())
        torch.save({"adapter": _adapter(student), "loss": [h["loss"] for h in state.history], "plain": plain},
                   os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])  # 0.5: the layer loss's gradients are averaged too
def test_two_process_ddp_equals_one_process(tmp_path, hidden_weight):
    torch.set_num_threads(1)
    ref, student, ids = _setup()
    single = train(student, ref, ids, DistillConfig(**CFG, hidden_weight=hidden_weight), progress=False)
    want = _adapter(student)
    one = load_synthetic(synthesize(ref, tiny_tokenizer(), SynthConfig(**SYNTH), tmp_path / "one", progress=False))

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), False, None, hidden_weight), nprocs=WORLD, join=True)

    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["adapter"].keys() == want.keys()
        for n, p in want.items():
            assert torch.allclose(got["adapter"][n], p, atol=1e-5, rtol=0), (r, n, (got["adapter"][n] - p).abs().max())
        # the logged loss is the mean over ranks, i.e. the global batch's loss
        assert got["loss"] == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    assert (tmp_path / "ck.pt").exists()  # written by rank 0
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert ck["state"]["step"] == CFG["steps"]
    # sharded synthesis: same shards, one manifest, same data as one process
    assert torch.equal(load_synthetic(tmp_path / "synth"), one)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_recover_cli_under_torchrun_equals_one_process(tmp_path, parallel):
    """`torchrun --nproc_per_node 2 -m recover_lora.cli recover ...` writes the one-process adapter."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from recover_lora.load import save_model_dir

    ref = tiny_model("llama", seed=0, initializer_range=0.2)
    save_model_dir(ref, tmp_path / "ref", tiny_tokenizer())
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0))
    save_model_dir(deg, tmp_path / "deg")
    args = ["recover", "--reference", str(tmp_path / "ref"), "--degraded", str(tmp_path / "deg"),
            "--distill.steps", "4", "--distill.batch-size", "8", "--distill.lr", "1e-2",
            "--distill.warmup-steps", "1", "--synth.num-sequences", "32", "--synth.seq-len", "12",
            "--heldout-sequences", "4", "--adapter.rank", "4", "--load.device", "cpu", "--distill.eval-every",
            "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "recover_lora.cli", *args, "--out-dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "recover_lora.cli", *args,
                          "--out-dir", str(tmp_path / "two"), *(["--distill.fsdp"] if parallel == "fsdp" else [])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    import json
    assert json.loads((tmp_path / "two" / "report.json").read_text())["processes"] == 2


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_process_fsdp_equals_one_process_and_resumes(tmp_path):
    """FSDP2 over the decoder layers: the one-process adapter, whole parameters again afterwards,
    and a checkpoint that a single process resumes to the same end."""
    torch.set_num_threads(1)
    ref, student, ids = _setup()
    single = train(student, ref, ids, DistillConfig(**CFG), progress=False)
    want = _adapter(student)

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), True), nprocs=WORLD, join=True)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["plain"], "the models still hold FSDP shards after train()"
        for n, p in want.items():
            assert torch.allclose(got["adapter"][n], p, atol=1e-5, rtol=0), (r, n, (got["adapter"][n] - p).abs().max())
        assert got["loss"] == pytest.approx([h["loss"] for h in single.history], rel=1e-5)

    # interrupted FSDP run (2 of 4 steps; checkpoint of whole tensors) -> resumed by one process
    part = tmp_path / "part"
    part.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(part), True, 2), nprocs=WORLD, join=True)
    ref, student, ids = _setup()
    state = train(student, ref, ids, DistillConfig(**CFG), checkpoint=part / "ck.pt", progress=False)
    assert state.step == CFG["steps"]
    for n, p in _adapter(student).items():
        assert torch.allclose(p, want[n], atol=1e-5, rtol=0), (n, (p - want[n]).abs().max())
