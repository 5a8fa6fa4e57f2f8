"""Serve an exported model over an OpenAI-compatible API with `transformers serve` (127.0.0.1 unless told).

    python -m hfmodel.serving                      # the last /export or /export gguf (runs/last-export.txt)
    python -m hfmodel.serving ember-gguf           # a GGUF export folder, or a merged model folder
    make serve ARGS="ember-gguf --port 8001"

Clients (AgentScope's OpenAIChatModel, any OpenAI client) use base_url http://127.0.0.1:8000/v1 and the model
name this prints. A merged safetensors folder is served by plain `transformers serve FOLDER` too; a GGUF needs
the fix below (transformers 5.24), which this launcher applies in its own process only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hfmodel.common import UserError

LAST_EXPORT = "last-export.txt"  # in the runs folder: the folder of the latest export, one line


class ServeError(UserError, ValueError):
    """A folder that holds nothing `transformers serve` can load (one line, with the fix)."""


def model_id_for(folder: Path | str) -> str:
    """The name `transformers serve` loads `folder` by: `/abs/folder:file.gguf` for a GGUF, else the folder."""
    path = Path(folder).expanduser().absolute()
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs:
        if _has_llama3_rope(ggufs[0]):
            raise ServeError(f"{ggufs[0].name} carries Llama 3's RoPE scaling (rope_freqs), which transformers' GGUF "
                             "loader does not read, so `transformers serve` would run it with plain RoPE and answer "
                             "differently: serve the merged folder /export writes (same adapter), or run this GGUF in "
                             "llama.cpp or Ollama, which read it.")
        return f"{path}:{ggufs[0].name}"
    if (path / "config.json").exists():
        return str(path)
    raise ServeError(f"{path} holds no GGUF file and no config.json; give the folder an /export or "
                     "/export gguf wrote.")


def _has_llama3_rope(path: Path) -> bool:
    import gguf

    from hfmodel.gguf_export import ROPE_FREQS

    return any(t.name == ROPE_FREQS for t in gguf.GGUFReader(path).tensors)


def record_last_export(runs_dir: Path | str, folder: Path | str) -> Path:
    """Remember `folder` as the export `make serve` serves."""
    runs = Path(runs_dir).expanduser()
    runs.mkdir(parents=True, exist_ok=True)
    note = runs / LAST_EXPORT
    note.write_text(f"{Path(folder).expanduser().absolute()}\n", encoding="utf-8")
    return note


def last_export(runs_dir: Path | str = "runs") -> Path:
    note = Path(runs_dir).expanduser() / LAST_EXPORT
    if not note.exists():
        raise ServeError(f"No export recorded in {note}; run /export or /export gguf in the chat first, or name "
                         "a folder: make serve ARGS=FOLDER.")
    return Path(note.read_text(encoding="utf-8").strip())


def fill_gguf_architectures() -> None:
    """transformers 5.24's serve picks the model class from `config.architectures[0]`, which its GGUF reader
    leaves empty for llama/qwen2/qwen3 files (TypeError: 'NoneType' object is not subscriptable). Fill it with the
    family's causal-LM class, in this process only."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    original = transformers.AutoConfig.from_pretrained
    if getattr(original, "fills_gguf_architectures", False):
        return

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result  # (config, unused kwargs) when asked for
        if kwargs.get("gguf_file") and not getattr(config, "architectures", None):
            name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
            if name:
                config.architectures = [name]
        return result

    from_pretrained.fills_gguf_architectures = True  # type: ignore[attr-defined]
    transformers.AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]


def serve_arguments(model_id: str, host: str, port: int) -> list[str]:
    return ["serve", model_id, "--host", host, "--port", str(port)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an export over an OpenAI-compatible API (transformers serve).")
    parser.add_argument("folder", nargs="?", help="an export folder (default: the last export, runs/last-export.txt)")
    parser.add_argument("--runs", default="runs", help="the runs folder that records the last export (default runs)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    args = parser.parse_args(argv)
    try:
        model_id = model_id_for(args.folder or last_export(args.runs))
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Serving {model_id} at http://{args.host}:{args.port}/v1 (model name: {model_id!r}); Ctrl-C stops.",
          flush=True)
    fill_gguf_architectures()
    from transformers.cli.transformers import app

    app(serve_arguments(model_id, args.host, args.port), standalone_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
