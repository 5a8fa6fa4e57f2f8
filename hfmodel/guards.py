"""Guards on a training run: a run whose numbers stop being numbers stops, and is recorded as failed.

A NaN or infinite loss (from a learning rate or lora_alpha far too high, or extreme data) poisons the LoRA
weights within one optimiser step; every later step and every reply is then garbage. The guard raises
`NonFiniteLoss` from inside the Trainer, so the recipe's failure path runs: the adapter is discarded (never
activated), run.json says "failed" with the reason (strict JSON: `json_safe` turns NaN into null), and a
later run with the same settings trains again instead of reusing it.
"""

from __future__ import annotations

import math
from typing import Any

from hfmodel.common import FineTuneError, json_safe

__all__ = ["NonFiniteLoss", "json_safe", "non_finite_loss_guard", "non_finite_weights"]

WATCHED_LOGS = ("loss", "grad_norm", "eval_loss")


class NonFiniteLoss(FineTuneError):
    """Training produced NaN or infinite numbers; the message names where and the likely fix."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(
            f"Fine-tuning stopped at step {step}: {what} is not a finite number. The learning rate, "
            "lora_alpha or loraplus_lr_ratio is probably too high (or the data holds extreme values); the previous "
            "weights still serve, and the run is recorded as failed (never reused).")


def non_finite_weights(model: Any) -> str | None:
    """The name of the first trainable tensor holding NaN or inf (None when all are finite)."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad:
            local = getattr(param, "_local_tensor", param)  # a DTensor shard (FSDP2): check this rank's part
            if not bool(torch.isfinite(local).all()):
                return name
    return None


def non_finite_loss_guard() -> Any:
    """A TrainerCallback that raises `NonFiniteLoss` at the first NaN/inf logged loss, gradient norm or eval loss,
    or trainable weight after an optimiser step."""
    from transformers import TrainerCallback

    class NonFiniteLossGuard(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            for key in WATCHED_LOGS:
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise NonFiniteLoss(state.global_step, f"the {key.replace('_', ' ')} ({value})")

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            broken = non_finite_weights(model) if model is not None else None
            if broken:
                raise NonFiniteLoss(state.global_step, f"the trainable weight {broken}")

    return NonFiniteLossGuard()
