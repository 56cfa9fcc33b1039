"""Stage 4, distill: LoRA adapters on the degraded model learn the reference's logits.

The training loop is written out top to bottom (torchtune-recipe style): one teacher forward and
one student forward per micro-batch, a chunked full-vocabulary loss, AdamW with linear warmup and
cosine decay, gradient accumulation, bf16 autocast on GPU, and atomic checkpoints from which an
interrupted run resumes bit-for-bit (the batch order is a pure function of seed and step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import zlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import graphs
from .degrade import parse_layers, parse_modules, select_modules
from .losses import LOSSES, chunked_loss_backward, hidden_match_loss
from .synth import dist_rank_world
from .adapters import adapter_targets, attach, preset_plan  # noqa: F401 - re-exported
from .forward import base_model_of, decoder_of, hidden_states, lm_head_of  # noqa: F401 - re-exported
from .metrics import MetricsLog
from .utils import RecoverLoraError, atomic_torch_save, log, sigterm_as_interrupt
from .config import AdapterConfig, DistillConfig  # noqa: F401 - re-exported


def attach_adapters(model: PreTrainedModel, cfg: AdapterConfig, seed: int = 0, reference=None,
                    calib_ids: torch.Tensor | None = None, **warm_start) -> PeftModel:
    """Wrap the degraded model with fresh LoRA adapters on ``cfg``'s modules (only they train): the
    preset as an :class:`~recover_lora.adapters.AdapterPlan` of uniform ranks, through the one
    :func:`~recover_lora.adapters.attach` (svd / eora starts need ``reference``; ``warm_start``:
    its calib_sequences / shrink)."""
    return attach(model, preset_plan(cfg, model), seed=seed, reference=reference, calib_ids=calib_ids, **warm_start)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_autocast(cfg: DistillConfig, device: torch.device):
    # No weight-cast cache: each weight is cast once a forward anyway, and a CUDA graph capture
    # forbids the cache (it would replay casts of stale weights).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on(cfg, device), cache_enabled=False)


def lora_casts_off(model: torch.nn.Module, active: bool):
    """Under autocast, stop peft from casting each LoRA input to fp32 (autocast casts it back to
    bf16 for the matmul anyway: two wasted passes over the activations per adapted module)."""
    if not active:
        return contextlib.nullcontext()
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # older peft
        return contextlib.nullcontext()
    return disable_input_dtype_casting(model)


def autocast_on(cfg: DistillConfig, device: torch.device) -> bool:
    return cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")


@torch.no_grad()
def measure(student: torch.nn.Module, teacher: PreTrainedModel, ids: torch.Tensor, batch_size: int = 32,
            cfg: DistillConfig | None = None) -> dict[str, float]:
    """Held-out KL(teacher || student) per token and top-1 agreement, at temperature 1."""
    cfg = cfg or DistillConfig()
    device = next(teacher.parameters()).device
    was_training = student.training
    student.eval()
    kl_sum, agree_sum, n = 0.0, 0.0, 0
    for i in range(0, len(ids), batch_size):
        x = ids[i:i + batch_size].to(device)
        with train_autocast(cfg, device), lora_casts_off(student, autocast_on(cfg, device)):
            hs, ht = hidden_states(student, x), hidden_states(teacher, x)
            kl, agree = chunked_loss_backward(hs, ht, lm_head_of(base_model_of(student)), lm_head_of(teacher), "kl", 1.0,
                                              cfg.chunk_tokens, backward=False)
        k = x.numel()
        kl_sum += kl * k
        agree_sum += agree * k
        n += k
    student.train(was_training)
    return {"kl": kl_sum / n, "top1": agree_sum / n}


def lr_lambda(cfg: DistillConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def batch_indices(n_items: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Indices of micro-batch ``micro_step``: epochs of seeded permutations, last partial dropped."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise RecoverLoraError(f"only {n_items} training sequences for a batch of {batch_size}")
    epoch, k = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(zlib.crc32(f"order:{seed}:{epoch}".encode()))
    return torch.randperm(n_items, generator=g)[k * batch_size:(k + 1) * batch_size]


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "top1", "tokens", "time"}
    evals: list[dict] = field(default_factory=list)  # {"step", "kl", "top1"}
    elapsed: float = 0.0
    step_mode: str = ""  # "cuda_graph" or "eager" (with the reason the graph was not used)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP shard (a collective: every rank must call it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _plain(x):
    """Tensor learning rates (CUDA-graph mode) as floats, so any mode can resume any checkpoint."""
    if torch.is_tensor(x):
        return float(x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def checkpoint_payload(model: torch.nn.Module, opt, sched, state: TrainState, cfg: DistillConfig) -> dict:
    """What a checkpoint holds: whole tensors (FSDP shards gathered: call it on every rank), float lrs."""
    opt_sd = opt.state_dict()
    opt_sd["param_groups"] = [{k: _plain(v) if k in ("lr", "initial_lr") else v for k, v in g.items()}
                              for g in opt_sd["param_groups"]]
    # new dicts: state_dict() hands out the optimizer's own per-parameter state
    opt_sd["state"] = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()}
                       for i, st in opt_sd["state"].items()}
    sched_sd = {k: _plain(v) if k in ("base_lrs", "_last_lr") else v for k, v in sched.state_dict().items()}
    return {
        "trainable": _trainable_state(model),
        "optimizer": opt_sd,
        "scheduler": sched_sd,
        "state": asdict(state),
        "config": asdict(cfg),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save_checkpoint(path: Path, model: torch.nn.Module, opt, sched, state: TrainState, cfg: DistillConfig) -> None:
    atomic_torch_save(checkpoint_payload(model, opt, sched, state, cfg), path)


# Settings that may change on resume (when things are measured or written, how memory is spent);
# anything that changes the math may not.
CADENCE_FIELDS = ("eval_every", "eval_batch_size", "checkpoint_every", "chunk_tokens", "cuda_graph",
                  "activation_checkpointing", "fsdp")


def load_checkpoint(path: Path, model: torch.nn.Module, opt, sched, cfg: DistillConfig) -> TrainState:
    # weights_only: a checkpoint is tensors and plain types; a planted pickle must not run code here.
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign pickle, RuntimeError/EOFError for a torn file
        raise RecoverLoraError(f"{path} is not a recover-lora checkpoint that loads safely ({type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:200]}); delete it to start over") from None
    if not isinstance(ck, dict) or not {"trainable", "optimizer", "scheduler", "state", "config"} <= set(ck):
        raise RecoverLoraError(f"{path} is not a recover-lora checkpoint; delete it to start over")
    old = dict(ck["config"])
    new = asdict(cfg)
    for k in CADENCE_FIELDS:
        old.pop(k, None)
        new.pop(k, None)
    # A setting added after the checkpoint was written had its default then: an older checkpoint
    # stays resumable under the default, and only under it.
    for f in fields(DistillConfig):
        if f.name in new and f.name not in old and f.default is not MISSING:
            old[f.name] = f.default
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise RecoverLoraError(f"checkpoint {path} was made with other training settings {diff}; "
                               "resume with the same settings or use a new output folder")
    from torch.distributed.tensor import DTensor, distribute_tensor

    def local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # whole tensor -> like's layout
        t = t.to(like.device, like.dtype)
        return distribute_tensor(t, like.device_mesh, like.placements) if isinstance(like, DTensor) else t

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            params[n].copy_(local(t, params[n]))
    opt.load_state_dict(ck["optimizer"])
    for group in opt.param_groups:  # FSDP: moments as shards of their parameter
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = local(v, p)
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng_cpu"])
    if ck.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng_cuda"])
    return TrainState(**ck["state"])


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


class _HiddenStates(torch.nn.Module):
    """The student as DDP sees it: token ids -> final hidden states (the loss applies the head), or
    every layer's with ``all_layers`` (the layer loss)."""

    def __init__(self, student: torch.nn.Module, all_layers: bool = False):
        super().__init__()
        self.student, self.all_layers = student, all_layers

    def forward(self, ids: torch.Tensor):
        return hidden_states(self.student, ids, self.all_layers)


def train(student: torch.nn.Module, teacher: PreTrainedModel, train_ids: torch.Tensor, cfg: DistillConfig,
          heldout_ids: torch.Tensor | None = None, checkpoint: str | Path | None = None,
          progress: bool = True, stop_after: int | None = None, metrics: MetricsLog | None = None) -> TrainState:
    """Distill ``teacher`` into the trainable parameters of ``student``.

    ``metrics``: each step's numbers (and each held-out measurement) streamed there as they come.

    With ``checkpoint`` set, resumes from it when present and writes it every
    ``cfg.checkpoint_every`` steps and on interruption (Ctrl-C, SIGTERM). ``stop_after`` ends the
    run early after that many steps of this call (used to test resumption).

    Data parallel: when torch.distributed is initialised (torchrun / accelerate launch, see
    :func:`init_distributed`), the student runs under DDP (gloo on CPU, NCCL on GPU). Each rank
    takes its contiguous slice of every global micro-batch from :func:`batch_indices`, so the
    global batch, its order, and (without dropout) the adapter equal a one-process run's up to
    floating-point summation order; ``cfg.batch_size`` is the global batch and must divide by
    the world size. The logged loss and top-1 are averaged over ranks, and only rank 0 writes
    checkpoints (all ranks read them on resume). With ``cfg.fsdp`` the decoder layers of both
    models are sharded across the ranks (FSDP2) instead: the same math, 1/world of the layer
    weights per rank while training (each rank still loads the models whole); checkpoints hold
    whole tensors either way, so DDP, FSDP and single-process runs resume each other's.
    """
    cfg.validate()
    n_layers = getattr(getattr(base_model_of(student), "config", None), "num_hidden_layers", None)
    if cfg.hidden_weight > 0 and n_layers is not None and n_layers < 2:
        raise RecoverLoraError(f"hidden_weight needs intermediate layers to match; the model has {n_layers} decoder layer")
    device = next(teacher.parameters()).device
    rank, world = dist_rank_world()
    if cfg.batch_size % world:
        raise RecoverLoraError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    local_bs = cfg.batch_size // world
    if not any(p.requires_grad for p in student.parameters()):
        raise RecoverLoraError("the student has no trainable parameters")
    sharded = _ShardedLayers([teacher, student], device, world) if cfg.fsdp and world > 1 else None
    params = [p for p in student.parameters() if p.requires_grad]  # (FSDP: now shards)
    graph_why = _graph_blocker(cfg, student, device, world)
    if graph_why and cfg.cuda_graph == "on":
        raise RecoverLoraError(f"cuda_graph='on' but {graph_why}")
    use_graph = graph_why is None
    fused = device.type == "cuda"
    # capturable: the optimizer keeps its step count on the device and reads a tensor lr, so a
    # captured step does not freeze them.
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused,
                            capturable=use_graph and device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = Path(checkpoint) if checkpoint else None
    state = TrainState()
    if ckpt and ckpt.exists():
        state = load_checkpoint(ckpt, student, opt, sched, cfg)
        log.info("resumed from %s at step %d", ckpt, state.step)
    metrics = metrics if metrics is not None and rank == 0 else None
    if metrics is not None:
        metrics.resume(state.step)
    s_head, t_head = lm_head_of(base_model_of(student)), lm_head_of(teacher)
    ddp = None
    if world > 1 and sharded is None:
        from torch.nn.parallel import DistributedDataParallel

        # Built after a resume, so every rank starts from the same (checkpointed) adapter; DDP
        # also broadcasts rank 0's parameters at construction.
        ddp = DistributedDataParallel(_HiddenStates(student, cfg.hidden_weight > 0),
                                      device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False, gradient_as_bucket_view=True)
    fast_casts = autocast_on(cfg, device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * train_ids.shape[1]
    # The whole token set on the device (tens of MB at paper scale: 100k x 128 int64 is 100 MB): no
    # host copy a step. A token set beyond 2 GB stays in (pinned) host memory instead.
    on_device = device.type == "cuda" and train_ids.numel() * train_ids.element_size() <= 2 * 2**30
    data = train_ids.to(device) if on_device else (train_ids.pin_memory() if device.type == "cuda" else train_ids)
    lr_at = lr_lambda(cfg)

    def micro_batch(micro_step: int) -> torch.Tensor:
        idx = batch_indices(len(train_ids), cfg.batch_size, micro_step, cfg.seed)
        x = data[idx[rank * local_bs:(rank + 1) * local_bs].to(data.device)]
        return x.to(device, non_blocking=True)

    layers = cfg.hidden_weight > 0

    def step(xs) -> tuple[torch.Tensor, ...]:
        """One optimizer step over the micro-batches ``xs``; (loss, top-1[, layer loss]) stay on the device."""
        opt.zero_grad(set_to_none=True)
        loss = top1 = hid = 0.0
        for a, x in enumerate(xs):
            # DDP all-reduces gradients on the last micro-batch of the step only.
            sync = ddp.no_sync() if ddp is not None and a < len(xs) - 1 else contextlib.nullcontext()
            with sync, train_autocast(cfg, device):
                with torch.no_grad():
                    ht = hidden_states(teacher, x, layers)
                hs = ddp(x) if ddp is not None else hidden_states(student, x, layers)
                extra = None
                if layers:  # intermediate layers (not the embeddings, not the final state the KL sees)
                    h = hidden_match_loss(hs[1:-1], ht[1:-1])
                    extra = h * (cfg.hidden_weight / len(xs))
                    hid = hid + h.detach() / len(xs)
                    hs, ht = hs[-1], ht[-1]
                l, t = chunked_loss_backward(hs, ht, s_head, t_head, cfg.loss, cfg.temperature, cfg.chunk_tokens,
                                             scale=1.0 / len(xs), as_tensors=True, teacher_topk=cfg.teacher_topk,
                                             extra_loss=extra)
                del hs, ht, extra
            loss = loss + l / len(xs)
            top1 = top1 + t / len(xs)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        return (loss, top1, hid) if layers else (loss, top1)

    student.train()
    teacher.eval()
    if cfg.activation_checkpointing:
        _activation_checkpointing(student, True)
    graphed = None
    state.step_mode = "eager" + (f" ({graph_why})" if graph_why and cfg.cuda_graph == "auto" else "")
    bar = tqdm(total=cfg.steps, initial=state.step, desc="distill", unit="step", disable=not progress or rank != 0)
    start_step = state.step
    t0 = time.perf_counter() - state.elapsed
    with sigterm_as_interrupt(), lora_casts_off(student, fast_casts):
        try:
            while state.step < cfg.steps:
                if stop_after is not None and state.step - start_step >= stop_after:
                    break
                xs = [micro_batch(state.step * cfg.grad_accum + a) for a in range(cfg.grad_accum)]
                if use_graph and graphed is None:
                    use_graph = False  # one try a run
                    for g in opt.param_groups:  # a float lr would be frozen into the graph
                        g["lr"] = torch.tensor(float(g["lr"]), device=device)
                    graph_lrs = [g["lr"] for g in opt.param_groups]
                    graphed, why = graphs.capture_step(step, xs, params, opt)
                    if graphed is None and cfg.cuda_graph == "on":
                        raise RecoverLoraError(f"cuda_graph='on' but the capture failed: {why}")
                    state.step_mode = "cuda_graph" if graphed is not None else f"eager (graph capture failed: {why})"
                outs = graphed(xs) if graphed is not None else step(xs)
                if world > 1:
                    means = _mean_over_ranks(list(outs), device)
                else:
                    means = [float(o) for o in outs]  # the step's one host sync
                loss_sum, top1_sum = means[:2]
                if not math.isfinite(loss_sum):  # the step already spoiled the weights: keep the last checkpoint
                    raise RecoverLoraError(
                        f"the loss is not finite ({loss_sum}) at step {state.step + 1}; stopped without saving it "
                        f"of an earlier step stays). Start over in a new --out-dir with a lower --distill.lr, or check the models")
                lr = cfg.lr * lr_at(state.step)
                sched.step()
                if graphed is not None:
                    _keep_tensor_lrs(opt, graph_lrs)
                state.step += 1
                state.elapsed = time.perf_counter() - t0
                state.history.append({"step": state.step, "loss": loss_sum, "top1": top1_sum, "lr": lr,
                                      "tokens": state.step * tokens_per_step, "time": round(state.elapsed, 3)})
                if layers:
                    state.history[-1]["hidden_loss"] = means[2]
                if metrics is not None:
                    metrics.log("train", state.history[-1])
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", top1=f"{top1_sum:.3f}")
                if heldout_ids is not None and cfg.eval_every and state.step % cfg.eval_every == 0 \
                        and state.step < cfg.steps:
                    m = measure(student, teacher, heldout_ids, cfg.eval_batch_size, cfg)
                    state.evals.append({"step": state.step, **m})
                    if metrics is not None:
                        metrics.log("heldout", state.evals[-1])
                    bar.write(f"step {state.step}: held-out KL {m['kl']:.4f}, top-1 {m['top1']:.3f}")
                if ckpt and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    _save_rank0(ckpt, student, opt, sched, state, cfg, rank, world)
        except KeyboardInterrupt:
            if ckpt and sharded is not None:  # gathering the shards needs every rank: keep the last one
                bar.close()
                raise RecoverLoraError(f"interrupted at step {state.step}; the checkpoint in {ckpt} (every "
                                       f"{cfg.checkpoint_every} steps) stays: run the same command again to resume") from None
            if ckpt:
                if rank == 0:  # no barrier here: the other ranks may be gone already
                    save_checkpoint(ckpt, student, opt, sched, state, cfg)
                bar.close()
                raise RecoverLoraError(f"interrupted at step {state.step}; checkpoint saved to {ckpt}: "
                                       "run the same command again to resume") from None
            raise
        finally:
            bar.close()
            if cfg.activation_checkpointing:
                _activation_checkpointing(student, False)
    if ckpt:
        _save_rank0(ckpt, student, opt, sched, state, cfg, rank, world)
    if sharded is not None:
        sharded.restore()
    return state


class _ShardedLayers:
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
                whole = {k: _full(v) for k, v in layer.state_dict().items()}  # collective
                plain = templates[i].to_empty(device=self.device)
                plain.load_state_dict(whole)
                bufs = dict(plain.named_buffers())
                for name, b in layer.named_buffers():  # non-persistent buffers are not in the state dict
                    bufs[name].copy_(_full(b))
                layers[i] = plain
        self.saved = []


def _keep_tensor_lrs(opt: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """The captured step reads the lr tensors it was captured with: should the scheduler have put a
    new object in a param group (a float, in torch versions that do not fill tensor lrs in place),
    copy its value into the captured tensor and put that back."""
    for g, t in zip(opt.param_groups, tensors):
        if g["lr"] is not t:
            t.fill_(float(g["lr"]))
            g["lr"] = t


def _graph_blocker(cfg: DistillConfig, student: torch.nn.Module, device: torch.device, world: int) -> str | None:
    """Why the training step cannot be a CUDA graph here (None: it can)."""
    if cfg.cuda_graph == "off":
        return "cuda_graph='off'"
    if device.type != "cuda" and graphs.capture_impl is graphs._cuda_capture:
        return "not on a CUDA device"
    if world > 1:
        return "data-parallel run (DDP all-reduce is not captured)"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in student.modules()):
        return "dropout (its random numbers are not captured)"
    return None


def _activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turn transformers' per-layer activation checkpointing on or off (non-reentrant, no RNG
    stashing: no dropout here, and reading the CUDA RNG state is not allowed in a graph capture)."""
    base = base_model_of(model)
    kw = {"use_reentrant": False, "preserve_rng_state": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(kw) if on else base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw) if on else \
            base.gradient_checkpointing_disable()
    if not on and hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()  # enable registered an embedding hook; drop it


def _mean_over_ranks(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    t = torch.stack([torch.as_tensor(v, device=device).to(dtype) for v in values])
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _save_rank0(path: Path, model, opt, sched, state: TrainState, cfg: DistillConfig, rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP: every rank gathers, rank 0 writes
        payload = checkpoint_payload(model, opt, sched, state, cfg)
        if rank == 0:
            atomic_torch_save(payload, path)
    elif rank == 0:
        save_checkpoint(path, model, opt, sched, state, cfg)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # a rank that resumes later finds the file complete
