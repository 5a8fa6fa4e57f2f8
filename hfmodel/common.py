"""What every other module needs: error types, the token and its redaction, device and dtype choice,
process rank helpers, one atomic write, and one way to quiet the libraries."""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch costs a second to import; the config checks of finetune.py run without it
    import torch
    from rich.console import Console

logger = logging.getLogger("huggingface_model")

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGINGFACE_TOKEN")
PROJECT_DIR = Path(__file__).resolve().parent.parent  # where the scripts and the project's own .env live


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


class UnexpectedError(Exception):
    """Something outside the user's control failed while doing `what`; `__cause__` is the original error."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Name what runs inside: an unexpected error there becomes `UnexpectedError(what)` (ours pass through)."""
    try:
        yield
    except (UserError, UnexpectedError):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised, named, for the one error boundary of a script
        raise UnexpectedError(what) from e


def log_traceback(what: str, error: BaseException, folder: Path | str) -> Path | None:
    """Append the traceback of an unexpected error to `folder`/errors.log (else the temp folder's); its path.

    The token is redacted; None when no log could be written anywhere.
    """
    entry = (f"--- {datetime.now().isoformat(timespec='seconds')} {what}\n"
             f"{redact(''.join(traceback.format_exception(error)))}\n")
    for log in (Path(folder).expanduser() / "errors.log", Path(tempfile.gettempdir()) / "hf-finetune-errors.log"):
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as f:
                f.write(entry)
            return log.resolve()
        except OSError:
            continue
    return None


def failure_line(what: str, error: BaseException, log: Path | None) -> str:
    """`<what> failed: RuntimeError: <first line> (traceback in <log>)`: one line for an unexpected error."""
    text = str(error).strip()
    first = " ".join(text.splitlines()[0].split())[:300] if text else ""
    where = f"traceback in {log}" if log else "the traceback could not be written"
    return f"{what} failed: {type(error).__name__}{': ' + first if first else ''} ({where})"


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


def dotenv_tokens() -> dict[str, str]:
    """The token variables (and nothing else) of the current folder's `.env`, else the project's own.

    Never a parent folder's: a `.env` found by walking up could belong to anything (and set HF_HUB_OFFLINE=0
    or unrelated secrets).
    """
    try:
        from dotenv import dotenv_values
    except ImportError:  # python-dotenv is in requirements; tolerate its absence in embedded use
        return {}
    found: dict[str, str] = {}
    for folder in dict.fromkeys((Path.cwd(), PROJECT_DIR)):
        file = folder / ".env"
        try:
            values = dotenv_values(file, interpolate=False) if file.is_file() else {}
        except (OSError, UnicodeDecodeError):  # an unreadable .env holds no token we could use
            continue
        for name in TOKEN_ENV_VARS:
            value = (values.get(name) or "").strip()
            if value and name not in found:
                found[name] = value
    return found


def hf_token() -> str | None:
    """The user's Hugging Face token from the environment or a `.env` file (never logged)."""
    for name, value in dotenv_tokens().items():
        os.environ.setdefault(name, value)  # huggingface_hub reads the environment too; it wins over .env
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
# Showing untrusted text: data files and model replies may hold terminal escape sequences

# Whole sequences first (so their printable tails go too), then any other C0/C1 control character;
# newline and tab stay. OSC/DCS/PM/APC/SOS strings end at BEL or ST (ESC \ or U+009C), else at the line end.
_TERMINAL_CONTROLS = re.compile(
    r"(?:\x1b[\]P^_X]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, PM, APC, SOS
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: ESC [ 2J, colours, cursor moves
    r"|\x1b[ -/]*[0-~]?"  # other escapes: ESC c (reset), ESC ( B, ...
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # what is left: C0 (not \t, \n), DEL, C1
)


def safe_text(text: str) -> str:
    """`text` without terminal control characters (newline and tab kept): safe to print whatever it came from."""
    return _TERMINAL_CONTROLS.sub("", text)


class StreamFilter:
    """`safe_text` for text that arrives in pieces (a streamed reply): the end of a piece from its last escape
    introducer on is held back until the next piece, so a sequence cut in two goes whole."""

    INTRODUCERS = re.compile(r"[\x1b\x90\x98\x9b\x9d-\x9f][^\x1b\n]{0,63}$")

    def __init__(self) -> None:
        self.held = ""

    def feed(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        tail = self.INTRODUCERS.search(text)
        if tail:
            text, self.held = text[:tail.start()], tail.group()
        return safe_text(text)

    def flush(self) -> str:
        text, self.held = self.held, ""
        return safe_text(text)


def safe_rich_text(text: Any) -> Any:
    """A rich `Text` with `safe_text` applied to its whole string, its styles kept on the characters that stay
    (stripping token by token would leave the printable tail of a sequence split across spans)."""
    plain = text.plain
    if not _TERMINAL_CONTROLS.search(plain):
        return text
    keep = [True] * len(plain)
    for match in _TERMINAL_CONTROLS.finditer(plain):
        keep[match.start():match.end()] = [False] * (match.end() - match.start())
    moved = [0]  # moved[i]: where character i of `plain` starts in the cleaned string
    for kept in keep:
        moved.append(moved[-1] + kept)
    clean = text.blank_copy("".join(c for c, kept in zip(plain, keep, strict=True) if kept))
    for span in text.spans:
        clean.stylize(span.style, moved[span.start], moved[span.end])
    return clean


class Sanitized:
    """A rich renderable shown without terminal control characters: wrap anything printed that holds data or
    model text. Every rendered segment is cleaned, so no control character can pass; a `Text` is cleaned whole
    first (whole sequences go, not just their ESC). Data inside markup strings should be cleaned before it is
    escaped (`escape(safe_text(x))`), so that nothing printable of a sequence is left to be read as markup.
    rich adds its own styles and cursor controls after this point: those stay.
    """

    def __init__(self, renderable: Any) -> None:
        from rich.text import Text

        self.renderable = safe_rich_text(renderable) if isinstance(renderable, Text) else renderable

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Any]:
        from rich.segment import Segment

        for segment in console.render(self.renderable, options):
            if segment.control or not _TERMINAL_CONTROLS.search(segment.text):
                yield segment
            else:
                yield Segment(safe_text(segment.text), segment.style)

    def __rich_measure__(self, console: Console, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement.get(console, options, self.renderable)


class SafeLogText(logging.Filter):
    """Log lines carry paths and data too: the same stripping for every record a handler prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _TERMINAL_CONTROLS.search(message):
            record.msg, record.args = safe_text(message), None
        return True


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


def create_exclusive(folder: Path, stem: str, suffix: str) -> Path:
    """A new empty file `folder/<stem><random id><suffix>`, created exclusively (O_EXCL): two sessions started
    in the same second, even on machines sharing the folder, never get the same file."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = folder / f"{stem}{secrets.randbelow(10**6):06d}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name {stem}<id>{suffix} in {folder} after 100 tries")


def check_writable_folder(folder: Path | str, what: str) -> None:
    """`folder` can be created and written in; else a one-line error naming `what` and the fix.

    Nothing stays behind: folders made for the check are removed again (rmdir: only while empty).
    """
    path = Path(folder).expanduser().absolute()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise FineTuneConfigError(f"{what}: cannot write to {path} ({e.strerror or e}); choose a folder you can "
                                  "write to.") from None
    finally:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break


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


def json_safe(data: Any) -> Any:
    """`data` with every NaN or infinity replaced by None (null): strict JSON that every reader accepts."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """run.json and friends: written by the main process only, as strict JSON (NaN -> null), token redacted."""
    if not is_main_process():
        return
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)
    write_text_atomic(path, redact(text))


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


def quiet_libraries(ours: int = logging.INFO, rich: bool = False, agentscope: bool = True) -> None:
    """Our log lines on stderr at level `ours`; library chatter (progress bars, deprecations) off. `agentscope`:
    import AgentScope now and quiet its logger (else call `quiet_agentscope` once it has been imported: its import
    sets its own logger up)."""
    if rich:
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SafeLogText())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]", handlers=[handler])
    logger.setLevel(ours)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers

    if agentscope:
        quiet_agentscope()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quiet_agentscope() -> None:
    """AgentScope's own logger (it logs at INFO from its import on) at WARNING."""
    from agentscope import setup_logger

    setup_logger("WARNING")
