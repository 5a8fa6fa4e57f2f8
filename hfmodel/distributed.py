"""What training under `accelerate launch` / `torchrun` needs beyond one process: a value every rank agrees
on, how the trainer split the weights, gathering a sharded adapter, and checksums that prove DDP synchronised."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from hfmodel.common import distributed_state, is_main_process, world_size


def init_distributed() -> Any:
    """accelerate's process state (gloo on a machine without CUDA), or None for a single process."""
    return distributed_state() if world_size() > 1 else None


def finish_distributed() -> None:
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def from_main_process(make: Callable[[], str]) -> str:
    """`make()` on the main process; every other rank receives its result (collective under a launcher)."""
    if world_size() <= 1:
        return make()
    from accelerate.utils import broadcast_object_list

    distributed_state()  # make sure the process group exists before broadcasting
    holder = [make() if is_main_process() else None]
    broadcast_object_list(holder, from_process=0)
    return str(holder[0])


def sharded_training(trainer: Any) -> str | None:
    """How the trainer splits the weights across processes ("FSDP", "DeepSpeed ZeRO-3"); None when it does not."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def gather_trained_weights(trainer: Any, sharded: str | None) -> dict[str, Any] | None:
    """After sharded training: the trained weights, whole, on the main process (from GPUs: empty dict elsewhere).

    Collective: every process must call it. FSDP (versions 1 and 2) keeps only the tensors that require
    grad (the LoRA matrices being trained): FSDP2 gathers just those; FSDP1 first collects the full
    state dict (from GPUs: into rank 0's CPU RAM, as Trainer.save_model does) and then drops the rest.
    ZeRO-3 goes through accelerate, which consolidates the 16-bit model on rank 0
    (`zero3_save_16bit_model: true`). None when nothing is sharded: every process holds the whole adapter.
    """
    if sharded is None:
        return None
    if sharded == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload (copy to CPU RAM, rank 0 only) only from GPUs: with the weights already on the CPU,
        # FSDP1's offload path clones freed memory and segfaults (torch 2.13).
        on_gpu = trainer.accelerator.device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu, ignore_frozen_params=True)
        return dict(get_model_state_dict(trainer.model_wrapped, options=options))
    return dict(trainer.accelerator.get_state_dict(trainer.model_wrapped))


def check_ranks_agree(checksum: str) -> list[str]:
    """All ranks' LoRA checksums (collective: every rank must call it)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checksum)
    return [str(c) for c in gathered]


def local_lora_size(model: Any, adapter_name: str) -> int:
    """How many of the adapter's LoRA values this process holds (its shard under FSDP / ZeRO-3)."""
    held = 0
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            local = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO-3 partition
            if local is None:
                local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2 DTensor / FSDP1 view
            held += local.numel()
    return held


def lora_checksum(model: Any, adapter_name: str) -> tuple[str, float]:
    """sha256 (first 12 hex digits) and sum of |w| over the adapter's LoRA tensors on this process."""
    import torch
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    digest = hashlib.sha256()
    total = 0.0
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
        total += float(tensor.abs().sum())
    return digest.hexdigest()[:12], total


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's `items`, concatenated in rank order, on every rank (collective under a launcher)."""
    if world_size() <= 1:
        return items
    import torch.distributed as dist

    distributed_state()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
