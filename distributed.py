"""torchrun: which process am I, and the few collectives that make N processes train and evaluate as one.

    torchrun --nproc-per-node N train_dreambooth.py --subject dog6 ...
    torchrun --nproc-per-node N evaluate.py --runs outputs/*

Training: every rank builds the same model and plans every step identically (same seed, same generator); rank r
computes the micro-batches r, r + N, r + 2N, ... of the step and backpropagates loss / grad_accum, exactly as one
process does for all of them. Then the adapter gradients are summed over the ranks (SUM, not mean: each
micro-batch's loss is already divided by grad_accum), so every rank holds the single-process gradient up to float
summation order, and every rank takes the same clipped AdamW step. A rank without a micro-batch (a short step at
the end of a pass) contributes zeros. Only rank 0 writes files, prints and checkpoints. No DistributedDataParallel
wrapper: one flattened all-reduce per step is all that adapters of a million parameters need.
Evaluation: each rank generates its share of the images, waits at a barrier, and rank 0 alone scores them.
"""
import os
import sys

import torch


def init_distributed(device, backend=None, timeout=None):
    """Under torchrun (RANK and WORLD_SIZE set) join the default process group once, NCCL on CUDA and gloo on the
    CPU (or `backend`; `timeout` a datetime.timedelta, torch's default if None), and give each rank its own GPU
    (LOCAL_RANK) when `device` is CUDA. Returns (rank, world_size, device); without torchrun (0, 1, device), and
    nothing is started."""
    import torch.distributed as dist
    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def start(device, timeout=None):
    """init_distributed, then only rank 0 prints: the other ranks' stdout goes to os.devnull (their errors still
    reach stderr). Returns (rank, world_size, device)."""
    rank, world_size, device = init_distributed(device, timeout=timeout)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world_size, device


def broadcast_from_rank0(params, world_size):
    """Start every rank from rank 0's adapter (identical already when initialisation is seeded; this makes sure)."""
    if world_size > 1:
        for p in params.values():
            torch.distributed.broadcast(p.data, src=0)


def sum_over_ranks(params, numbers, world_size):
    """Sum the adapter gradients (None counts as zero) and a few float64 numbers (loss sums) over the ranks."""
    if world_size == 1:
        return numbers
    params = list(params.values())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)
    totals = torch.tensor(numbers, dtype=torch.float64, device=flat.device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


def any_rank(flag, world_size):
    """True on every rank if it is true on one (Ctrl-C reached one rank: all stop after the same step)."""
    if world_size == 1:
        return bool(flag)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(bool(flag))], device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def barrier(world_size):
    """Wait until every rank is here (e.g. for rank 0's class images, or every rank's generated images)."""
    if world_size > 1:
        torch.distributed.barrier()


def leave_ranks(world_size):
    """The collective part is over: leave the process group (rank 0 goes on alone)."""
    if world_size > 1:
        torch.distributed.destroy_process_group()
