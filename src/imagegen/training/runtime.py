"""Where training runs: device choice and (when launched by torchrun) the process group."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from imagegen.device import select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def tune_cuda() -> None:
    """Training settings for NVIDIA GPUs: cuDNN picks the fastest convolution algorithms for the
    (fixed) shapes, and float32 matrix products and convolutions may use TF32 tensor cores (the
    parts that bf16 autocast leaves in float32, or all of it with train.amp off)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def setup_runtime(preference: str) -> Runtime:
    """Single process unless torchrun set RANK/WORLD_SIZE; then join the process group."""
    device = select_device(preference)
    if device.type == "cuda":
        tune_cuda()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(device)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    runtime = Runtime(device, dist.get_rank(), dist.get_world_size())
    log.info("distributed: rank %d of %d on %s", runtime.rank, runtime.world_size, device)
    return runtime


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
