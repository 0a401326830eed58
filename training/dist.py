"""Several processes (torchrun): joining the group, summing numbers over ranks, the DDP wrapper."""
import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by torchrun (WORLD_SIZE > 1).

    nccl on CUDA, gloo on CPU. A single process needs no process group at all.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, local


def all_sum(value: float, world: int) -> float:
    """Sum a Python number over all processes (identity in a single process)."""
    if world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def wrap_ddp(model, device: str, world: int):
    """The module the loop calls forward on: the model itself, or a DDP wrapper of it when world > 1."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # Only parameters that require grad are synchronised (in LoRA mode, only the adapter). The alignment-head
    # mask is a sparse buffer, which DDP cannot broadcast; it is identical on every rank anyway.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["alignment_heads"])
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
