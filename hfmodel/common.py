"""What every other module needs: error types, the token and its redaction, device and dtype choice,
process rank helpers, one atomic write, and one way to quiet the libraries."""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch costs a second to import; the config checks of finetune.py run without it
    import torch

logger = logging.getLogger("huggingface_model")

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGINGFACE_TOKEN")


# =============================================================================================
# Errors: a mistake the user can fix. Everything else is our bug and must stay visible as one.


class UserError(Exception):
    """A mistake in the user's input or setup; the message names the problem and the fix."""


class ModelLoadError(UserError, ValueError):
    """A model or tokenizer cannot be loaded; the message names the problem and the fix."""


class FineTuneConfigError(UserError, ValueError):
    """`fine_tune_config` has unknown keys, wrong types or values; the message lists every problem."""


class FineTuneError(UserError, RuntimeError):
    """Fine-tuning cannot run (or cannot run with this model); the message says why."""


class FineTuneInterrupted(UserError, RuntimeError):
    """Fine-tuning was stopped (Ctrl-C); the previous weights are still serving."""


def closest(key: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for a near miss, else ''."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def describe_validation(error: Any) -> str:
    """A pydantic ValidationError as one line: field: problem (got value)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                     for err in error.errors())


# =============================================================================================
# The user's token: read from the environment or a .env file, never printed


def hf_token() -> str | None:
    """The user's Hugging Face token from the environment or a `.env` file (never logged)."""
    try:
        from dotenv import find_dotenv, load_dotenv

        load_dotenv(find_dotenv(usecwd=True), override=False)
    except ImportError:  # python-dotenv is in requirements; tolerate its absence in embedded use
        pass
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def redact(text: str) -> str:
    """Remove the user's token from any text that is about to be shown or written."""
    token = hf_token()
    return text.replace(token, "***") if token else text


# =============================================================================================
# Processes (under accelerate launch / torchrun) and devices


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def distributed_state() -> Any:
    """accelerate's process state; on a machine without CUDA it must be told to use gloo on the CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def fsdp_requested() -> bool:
    """True in processes started by `accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes", "on")


def pick_device(device: str | None = None) -> torch.device:
    """An explicit device wins; otherwise cuda > mps > cpu."""
    import torch

    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError as e:
            raise ModelLoadError(f"Unknown device '{device}'. Use 'cpu', 'cuda', 'cuda:1' or 'mps'.") from e
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device='{device}' but no CUDA GPU is visible. Use device='cpu' or leave it unset.")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError(f"device='{device}' but MPS is not available. Use device='cpu' or leave it unset.")
        return chosen
    if world_size() > 1:  # under accelerate launch / torchrun: this rank's device
        return distributed_state().device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Weights dtype: bf16 on GPUs that have it, fp16 on other GPUs and MPS, fp32 on CPU.

    On CPU the chat keeps fp32 weights; training adds bf16 autocast where the CPU supports it (see
    `settings.device_training_args`).
    """
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        if dtype not in names:
            raise ModelLoadError(f"Unknown dtype '{dtype}'. Use one of: auto, {', '.join(names)}.")
        if device.type == "cpu" and names[dtype] == torch.float16:
            logger.warning("dtype=%s is slow and unstable on CPU; using float32 instead.", dtype)
            return torch.float32
        return names[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 autocast then trains ~1.4x faster."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: stay in fp32
        return False


def is_peft_model(model: Any) -> bool:
    """True for a peft-wrapped model, without importing peft (it is only needed once fine-tuning starts)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# =============================================================================================
# Writing: files and folders appear whole or not at all


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to a unique temporary file beside `path`, then rename it over `path` (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """run.json and friends: written by the main process only, with the token redacted."""
    if not is_main_process():
        return
    write_text_atomic(path, redact(json.dumps(data, indent=2, default=str)))


@contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside `dest` to write into; renamed to `dest` when the block succeeds.

    The temporary name is unique (mkdtemp), so nothing of the user's is ever overwritten or deleted;
    on failure only the folder made here is removed. `replace`: `dest` is ours (a run's adapter folder,
    the model cache) and an older copy of it may go; otherwise only an empty `dest` is replaced.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.is_dir() and (replace or not any(dest.iterdir())):
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# =============================================================================================
# Logging


def quiet_libraries(ours: int = logging.INFO, rich: bool = False) -> None:
    """Our log lines on stderr at level `ours`; library chatter (progress bars, deprecations) off."""
    if rich:
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]", handlers=[handler])
    else:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logger.setLevel(ours)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers
    from agentscope import setup_logger

    setup_logger("WARNING")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
