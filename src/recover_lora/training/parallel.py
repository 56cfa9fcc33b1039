"""Data parallel (DDP) and sharded (FSDP2) training around the one loop, under torchrun /
accelerate launch: joining the process group, the DDP-wrapped student, sharded decoder layers."""

from __future__ import annotations

import copy
import os

import torch

from ..forward import base_model_of, decoder_of, hidden_states
from ..utils import RecoverLoraError
from .checkpoint import full_tensor


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed job; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def init_distributed() -> tuple[int, int]:
    """Join the process group that torchrun / accelerate launch describe in the environment.

    Does nothing (returns (0, 1)) for a single process. On GPU each rank uses ``cuda:LOCAL_RANK``
    (set as the current device, so models loaded with device "cuda" land there) and NCCL;
    on CPU, gloo. Returns (rank, world size).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def mean_over_ranks(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    t = torch.stack([torch.as_tensor(v, device=device).to(dtype) for v in values])
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class HiddenStates(torch.nn.Module):
    """The student as DDP sees it: token ids -> final hidden states (the loss applies the head), or
    every layer's with ``all_layers`` (the layer loss)."""

    def __init__(self, student: torch.nn.Module, all_layers: bool = False):
        super().__init__()
        self.student, self.all_layers = student, all_layers

    def forward(self, ids: torch.Tensor):
        return hidden_states(self.student, ids, self.all_layers)


def ddp(student: torch.nn.Module, device: torch.device, all_layers: bool) -> torch.nn.Module:
    """The student under DistributedDataParallel (which broadcasts rank 0's parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(HiddenStates(student, all_layers),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, gradient_as_bucket_view=True)


class ShardedLayers:
    """FSDP2 (``fully_shard``) on every decoder layer of the given models, for the training loop.

    Only the decoder layers are sharded (the bulk of the weights); embeddings, final norm and
    head stay whole on every rank, so the chunked loss can apply the head outside the decoder's
    forward. :meth:`restore` gathers each layer and puts back an ordinary module with the same
    values (from a meta-device copy made before sharding), so saving, merging and evaluating
    afterwards see plain tensors.
    """

    def __init__(self, models: list[torch.nn.Module], device: torch.device, world: int):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import torch.distributed as dist

        mesh = init_device_mesh(device.type, (world,))
        self.device = device
        with torch.no_grad():  # every rank starts from rank 0's adapter, as DDP does
            for m in models:
                for p in m.parameters():
                    if p.requires_grad:
                        dist.broadcast(p.data, src=0)
        self.saved = []
        for m in models:
            layers = getattr(decoder_of(m), "layers", None)
            if not isinstance(layers, torch.nn.ModuleList):
                raise RecoverLoraError(f"fsdp: no decoder.layers list in this {type(base_model_of(m)).__name__}")
            templates = []
            for layer in layers:
                templates.append(copy.deepcopy(layer).to("meta"))  # structure only, one layer at a time
                fully_shard(layer, mesh=mesh)
            self.saved.append((layers, templates))

    @torch.no_grad()
    def restore(self) -> None:
        for layers, templates in self.saved:
            for i, layer in enumerate(layers):
                whole = {k: full_tensor(v) for k, v in layer.state_dict().items()}  # collective
                plain = templates[i].to_empty(device=self.device)
                plain.load_state_dict(whole)
                bufs = dict(plain.named_buffers())
                for name, b in layer.named_buffers():  # non-persistent buffers are not in the state dict
                    bufs[name].copy_(full_tensor(b))
                layers[i] = plain
        self.saved = []
