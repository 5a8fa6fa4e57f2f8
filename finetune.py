"""Headless fine-tuning (no chat): one model, one dataset, one LoRA run; single process or distributed.

Commands (run from the project folder, inside the venv):

    python finetune.py --config configs/finetune/demo.yaml
    python finetune.py --config configs/finetune/demo.yaml --set training_args.max_steps=40 --set model.device=cpu
    python finetune.py --config configs/finetune/demo.yaml --retrain   # train again though an identical run exists
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml finetune.py --config configs/finetune/demo.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml finetune.py --config configs/finetune/demo.yaml
    torchrun --nproc_per_node 2 finetune.py --config configs/finetune/demo.yaml
    python finetune.py --estimate-memory [--seq-len 2048 --batch 1 --lora-rank 16]
    python finetune.py --config configs/finetune/demo.yaml --export-gguf ember-gguf --gguf-type q8_0

CONFIG is a YAML (or JSON) file with three top-level keys:

    model:                       # one `model_configs` entry (see load_finetune_huggingface_model.py)
      model_type: huggingface
      config_name: demo
      model_id: HuggingFaceTB/SmolLM2-135M-Instruct   # or local_model_path: a folder / an adapter folder
      device: null               # null = cuda > mps > cpu (under a launcher: this rank's device)
      dtype: null                # null/auto, float32, bfloat16, float16
      quantization: null         # "4bit" / "8bit" = QLoRA (CUDA + bitsandbytes only)
      system_prompt: "..."       # put into training rows that have none (use the chat's prompt)
    data_path: data/ember_train.jsonl
    fine_tune_config:            # exactly what `HuggingFaceWrapper.fine_tune` takes
      method: sft                # or dpo / orpo / kto on preference data (e.g. data/style_pairs_train.jsonl)
      eval_data_path: data/ember_eval.jsonl
      lora_config: {r: 8, lora_alpha: 16}
      training_args: {max_steps: 24, learning_rate: 1.0e-3, per_device_train_batch_size: 8, output_dir: runs}

A file holding `model_configs: [ {...one entry with data_path and fine_tune_config inside...} ]` (the
chat script's format) is accepted too. Relative paths (data, eval data, model folders, output_dir) are
relative to the folder you run from. `--set KEY=VALUE` (repeatable) overrides one value; KEY is a dotted
path below the top level, and `lora_config.*`, `training_args.*`, `eval_data_path`, ... may omit the
`fine_tune_config.` prefix; VALUE is parsed as YAML (`40`, `1e-3`, `true`, `null`, `[q_proj, v_proj]`).

Batch sizes are PER PROCESS: the global batch is per_device_train_batch_size x gradient_accumulation_steps
x number of processes. Under `accelerate launch` / `torchrun` every process loads the model and trains
its share of each batch; only the main process (rank 0) creates the run directory, writes run.json,
log_history.json and the adapter, and prints the summary. Every process prints one `[rank i/N]` line at
the end (optimizer steps it ran and a checksum of its LoRA weights: equal checksums = synchronised DDP;
under FSDP / ZeRO-3 how many LoRA values its shard holds: all processes join in gathering the adapter).

Exit status: 0 done, 2 bad input (missing file, bad YAML, unknown key, unusable data; one line on stderr) or
an unexpected failure (one `error:` line naming what failed and the log file holding the traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any folder: the project's modules import

from hfmodel.common import (  # noqa: E402 - light: no torch
    FineTuneInterrupted,
    UnexpectedError,
    UserError,
    check_writable_folder,
    failure_line,
    is_main_process,
    log_traceback,
    quiet_libraries,
    safe_text,
    stage,
)
from hfmodel.distributed import (  # noqa: E402
    check_ranks_agree,
    finish_distributed,
    init_distributed,
    local_lora_size,
    lora_checksum,
)
from hfmodel.memory import MODEL_SHAPES, TABLE_SIZES, estimate_memory, memory_table  # noqa: E402
from hfmodel.settings import assign, fine_tune_key, load_yaml, split_assignment  # noqa: E402

__all__ = ["MODEL_SHAPES", "TABLE_SIZES", "estimate_memory", "load_config", "main", "memory_table"]

CONFIG_KEYS = ("model", "data_path", "fine_tune_config", "practice")
MODEL_PATH_KEYS = ("local_model_path", "local_tokenizer_path")


class InputError(UserError):
    """Bad command-line or config input: reported as one line on stderr, exit status 2."""


# =============================================================================================
# Config loading


def read_config_file(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"config file not found: {path}" + (" (it is a folder)" if file.is_dir() else ""))
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read config file {path}: {e.strerror or e} (check its permissions)") from None
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = load_yaml(text)
    except RecursionError:
        raise InputError(f"{path}: nested hundreds of levels deep; a config is a few levels of mappings") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping with keys {', '.join(CONFIG_KEYS)}; "
                         f"got {type(data).__name__}")
    return data


def normalise_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept {model, data_path, fine_tune_config} or {model_configs: [entry]}; return the first shape."""
    if "model_configs" in data:
        extra = sorted(set(data) - {"model_configs"})
        entries = data["model_configs"]
        if isinstance(entries, dict):
            entries = [entries]
        if extra or not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise InputError(f"{source}: `model_configs` must be a list with exactly one entry and nothing beside it"
                             f"{' (found: ' + ', '.join(extra) + ')' if extra else ''}")
        entry = dict(entries[0])
        data = {"model": entry, "data_path": entry.pop("data_path", None),
                "fine_tune_config": entry.pop("fine_tune_config", None)}
    unknown = [k for k in data if k not in CONFIG_KEYS]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], CONFIG_KEYS, n=1)
        raise InputError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}"
                         f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; valid: {', '.join(CONFIG_KEYS)}")
    model = data.get("model")
    if not isinstance(model, dict):
        raise InputError(f"{source}: `model` must be a mapping (one model_configs entry), got "
                         f"{type(model).__name__}")
    model = dict(model)
    for key in ("data_path", "fine_tune_config"):  # a pasted model_configs entry may carry them
        if key in model:
            inner = model.pop(key)
            if data.get(key) is not None and inner is not None and inner != data.get(key):
                raise InputError(f"{source}: `{key}` is given both at the top level and inside `model`")
            data = {**data, key: data.get(key) if data.get(key) is not None else inner}
    ftc = data.get("fine_tune_config") or {}
    if not isinstance(ftc, dict):
        raise InputError(f"{source}: `fine_tune_config` must be a mapping, got {type(ftc).__name__}")
    practice = data.get("practice") or {}
    if not isinstance(practice, dict):
        raise InputError(f"{source}: `practice` must be a mapping (k, rounds, keep, ...), got {type(practice).__name__}")
    return {"model": model, "data_path": data.get("data_path"), "fine_tune_config": ftc, "practice": practice}


def apply_set(config: dict[str, Any], assignment: str) -> None:
    """`--set training_args.max_steps=40` (see the module docstring for the key rules)."""
    try:
        key, value = split_assignment(assignment)
    except UserError:
        raise InputError(f"--set expects KEY=VALUE, got {assignment!r}") from None
    try:
        path = key.split(".") if key.split(".")[0] in CONFIG_KEYS else ["fine_tune_config", *fine_tune_key(key)]
        assign(config, path, value, where=f"--set {key}")
    except UserError as e:
        raise InputError(f"--set {key}: {e}") from None


def _expand(path: Any) -> Any:
    return os.path.expanduser(path) if isinstance(path, str) else path


def preflight(config: dict[str, Any], source: str) -> None:
    """Cheap checks before loading anything heavy: required keys and local files exist."""
    from hfmodel.data import FILE_LOADERS, looks_like_hub_id

    data_path = config.get("data_path")
    if not data_path or not isinstance(data_path, str):
        raise InputError(f"{source}: `data_path` is required (a .jsonl/.json/.csv/.parquet file or a hub dataset id)")
    ftc = config["fine_tune_config"]
    for what, value in (("data_path", data_path), ("fine_tune_config.eval_data_path", ftc.get("eval_data_path"))):
        if not value:
            continue
        if not isinstance(value, str):
            raise InputError(f"{source}: `{what}` must be a string, got {type(value).__name__}")
        path = Path(_expand(value))
        if (path.suffix.lower() in FILE_LOADERS or not looks_like_hub_id(value)) and not path.is_file():
            raise InputError(f"{what}: data file not found: {value} (relative paths start from {Path.cwd()})")
    for key in MODEL_PATH_KEYS:
        value = config["model"].get(key)
        if value and not Path(_expand(value)).exists():
            raise InputError(f"model.{key}: folder not found: {value} (relative paths start from {Path.cwd()})")
    args = ftc.get("training_args")
    if args is not None and not isinstance(args, dict):
        raise InputError(f"{source}: fine_tune_config.training_args must be a mapping, got {type(args).__name__}")
    check_output_dir((args or {}).get("output_dir") or "runs")


def check_output_dir(value: Any) -> None:
    """The runs folder must be one we can create and write in (not /proc/x, not a file, not read-only).

    Under a launcher only the main process tries it: the check makes and removes the folder, and a second rank doing
    the same at the same moment could find it gone (its failure then looked like an unwritable folder). A folder the
    main process cannot write ends the whole launch with its one line."""
    if not isinstance(value, str):
        raise InputError(f"training_args.output_dir must be a folder path, got {type(value).__name__}")
    if not is_main_process():
        return
    try:
        check_writable_folder(_expand(value), "training_args.output_dir")
    except UserError as e:
        raise InputError(str(e)) from None


def output_dir(config: dict[str, Any]) -> Path:
    """Where run directories (and errors.log) go."""
    args = config["fine_tune_config"].get("training_args") or {}
    return Path(_expand(args.get("output_dir") or "runs"))


def load_config(path: str, sets: list[str]) -> dict[str, Any]:
    config = normalise_config(read_config_file(path), path)
    for assignment in sets:
        apply_set(config, assignment)
    config = normalise_config(config, path)  # --set may have touched the shape
    preflight(config, path)
    return config


# =============================================================================================
# The run


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and value is not None else "n/a"


def run(config: dict[str, Any], export_gguf: tuple[Path, str] | None = None) -> int:
    """Build the wrapper without data, fine-tune once, print the summary. Returns the exit status."""
    main = is_main_process()
    quiet_libraries(logging.INFO if main else logging.WARNING)
    model_cfg = config["model"]
    with stage("Starting"):
        state = init_distributed()
        from huggingface_model import FineTuneConfig, HuggingFaceWrapper, fsdp_requested, training_precision

    if state is not None and fsdp_requested() and state.device.type == "cpu" \
            and os.environ.get("FSDP_SYNC_MODULE_STATES", "").lower() == "true":  # accelerate would raise a traceback
        if main:
            print("error: this accelerate config uses FSDP with fsdp_sync_module_states, which needs GPUs; accelerate "
                  "does not run FSDP on CPU: use configs/accelerate/cpu_2proc.yaml here", file=sys.stderr, flush=True)
        state.wait_for_everyone()  # the launcher stops every rank when one exits: rank 0 says why first
        return 2

    ftc = config["fine_tune_config"]
    if ftc.get("method") in PRACTICE_METHODS:
        return run_practice(config)
    args = {**FineTuneConfig.from_dict(ftc).training_args}  # unknown keys / bad values: fail before loading
    with stage("Loading the model"):
        wrapper = HuggingFaceWrapper.from_config({**model_cfg, "data_path": None, "fine_tune_config": ftc})
    bf16, fp16 = training_precision(wrapper.device, args, set(ftc.get("training_args") or {}))
    autocast = "bf16" if bf16 else "fp16" if fp16 else None

    n_proc = state.num_processes if state is not None else 1
    if main:
        global_batch = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * n_proc
        kind = str(state.distributed_type).split(".")[-1] if state is not None else "single process"
        if state is not None and fsdp_requested():
            kind += " with an FSDP config"  # accelerate switches to FSDP when the Trainer starts
        dtype = str(wrapper.dtype).replace("torch.", "") + (f" weights, {autocast} autocast" if autocast else "")
        print(f"Model: {wrapper.model} on {wrapper.device} ({dtype}); "
              f"{n_proc} process(es), {kind}; global batch {global_batch} = "
              f"{args['per_device_train_batch_size']} per device x {args['gradient_accumulation_steps']} "
              f"accumulation x {n_proc}", flush=True)

    steps_here = 0
    last_eval: tuple[int, float] | None = None

    def progress(event: dict[str, Any]) -> None:
        nonlocal steps_here, last_eval
        if set(event) == {"step", "max_steps"}:  # on_step_end: one optimizer step on this process
            steps_here += 1
            return
        if not main:
            return
        where = f"step {event['step']}/{event['max_steps']}" if event["step"] else "before training"
        if "loss" in event:
            print(f"{where}  loss {_fmt(event['loss'])}  lr {event.get('learning_rate', float('nan')):.2e}",
                  flush=True)
        elif "eval_loss" in event and (event["step"], event["eval_loss"]) != last_eval:  # final eval = last one
            last_eval = (event["step"], event["eval_loss"])
            print(f"{where}  eval_loss {_fmt(event['eval_loss'])}", flush=True)

    started = time.perf_counter()
    with stage("Fine-tuning"):
        result = wrapper.fine_tune(config["data_path"], ftc, progress=progress)
    seconds = time.perf_counter() - started

    if n_proc > 1:
        kind = result.distributed_type or str(state.distributed_type).split(".")[-1]
        where = (f"[rank {state.process_index}/{n_proc}] {kind} ({state.backend}) on {state.device}: "
                 f"{steps_here} optimizer steps on this rank")
        if main and fsdp_requested() and result.distributed_type and result.distributed_type != "FSDP":
            print(f"warning: the accelerate config asks for FSDP but accelerate ran {kind}, which does not shard: "
                  "this was plain data-parallel training (accelerate uses FSDP only on GPUs/accelerators).",
                  file=sys.stderr, flush=True)
        if result.sharded:  # each rank holds a different shard by design; the adapter was gathered to save it
            held = local_lora_size(wrapper.hf_model, result.adapter_name)
            print(f"{where}; LoRA sharded ({result.sharded}): this rank holds {held:,} of "
                  f"{result.trainable_params:,} values; the saved adapter was gathered from all ranks", flush=True)
            everyone = []
        else:
            checksum, magnitude = lora_checksum(wrapper.hf_model, result.adapter_name)
            print(f"{where}; LoRA sha256 {checksum}, sum|w| {magnitude:.6f}", flush=True)
            everyone = check_ranks_agree(checksum) if kind.startswith("MULTI_") else [checksum]
        if len(set(everyone)) > 1:  # replicated (DDP) training must end with identical weights everywhere
            if main:
                print(f"error: the {n_proc} processes ended with different LoRA weights ({', '.join(everyone)}): "
                      "gradients were not synchronised (each rank trained alone on its part of the data); "
                      "the saved adapter is rank 0's alone.", file=sys.stderr, flush=True)
            return 1
    if main:
        losses = [e["loss"] for e in result.log_history if "loss" in e]
        print(f"Run directory: {result.run_dir}")
        print(f"Adapter: {result.adapter_dir}" + (" (reused an identical earlier run)" if result.reused else ""))
        print(f"Steps: {result.steps}  trainable params: {result.trainable_params:,}  time: {seconds:.1f} s")
        if losses:
            print(f"Train loss: first {_fmt(losses[0])} -> last {_fmt(losses[-1])} "
                  f"(run mean {_fmt(result.train_loss)})")
        elif result.train_loss is not None:
            print(f"Train loss: {_fmt(result.train_loss)}")
        if result.eval_loss_before is not None:
            print(f"Eval loss: {_fmt(result.eval_loss_before)} -> {_fmt(result.eval_loss_after)}")
        from hfmodel.preference import PreferenceResult, describe_scores

        if isinstance(result, PreferenceResult):  # DPO / ORPO / KTO: how strongly the chosen answers win
            print(f"Preference ({result.method}): {describe_scores(result.before, result.after, result.scored_on)}")
        sys.stdout.flush()
        if export_gguf is not None:
            export(wrapper, *export_gguf, output_dir(config))
    if state is not None:
        state.wait_for_everyone()  # nobody tears the process group down while rank 0 still writes
    return 0


PRACTICE_METHODS = ("rft", "grpo")


def run_practice(config: dict[str, Any]) -> int:
    """`method: rft|grpo`: data_path is a tasks file, practised with the shipped tools (the calculator); settings from
    the `practice` mapping (`--set practice.k=8`). Under a launcher each process samples its share of the
    attempts and all of them train together, like SFT."""
    from chat.tools import SHIPPED, make_toolkit
    from hfmodel import practice
    from huggingface_model import HuggingFaceWrapper

    ftc = dict(config["fine_tune_config"])
    main = is_main_process()
    settings = practice.make_settings({**config["practice"], "method": ftc.pop("method")})
    with stage("Loading the model"):
        wrapper = HuggingFaceWrapper.from_config({**config["model"], "data_path": None, "fine_tune_config": ftc})

    def progress(event: dict[str, Any]) -> None:
        if not main:
            return
        if "loss" in event:
            print(f"{event.get('stage', '')}: step {event['step']}/{event['max_steps']}  loss {_fmt(event['loss'])}",
                  flush=True)
        elif "tasks" in event and event["tasks_done"] == event["tasks"] and event["attempts"] % 16 == 0:
            print(f"{event['stage']}: {event['attempts']} attempts, {event['accepted']} accepted", flush=True)

    with stage("Practising"):
        result = wrapper.practice(config["data_path"], settings, ftc, toolkit=make_toolkit(list(SHIPPED)),
                                  progress=progress)
    if main:
        for metric, before, after in practice.summary_rows(result):
            print(f"{metric}: {before} -> {after}" if before else f"{metric}: {after}")
        print(f"Report: {result.run_dir / 'report.md'}", flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"[rank {os.environ.get('RANK', '0')}/{os.environ['WORLD_SIZE']}] practice done: its share of the "
              "attempts sampled, the adapter trained with the other processes", flush=True)
        init_distributed().wait_for_everyone()  # nobody tears the process group down while rank 0 still writes
    return 0


def export(wrapper: Any, dest: Path, out_type: str, runs: Path) -> None:
    """--export-gguf: the trained adapter merged into a checked GGUF + Modelfile (main process only)."""
    from hfmodel.serving import record_last_export

    with stage("Exporting the GGUF"):
        result = wrapper.export_gguf(dest, out_type)
    record_last_export(runs, result.folder)
    print(f"GGUF: {result.gguf_path} ({result.size_mb:.0f} MB, {out_type}) + Modelfile + README.md")
    print(result.check.line(), flush=True)


# =============================================================================================
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune a Hugging Face causal LM with LoRA/QLoRA, without the chat. Runs unchanged "
        "under `accelerate launch --config_file configs/accelerate/NAME.yaml` and `torchrun`.",
        epilog="Config format and examples: see the docstring of finetune.py or configs/finetune/demo.yaml.",
    )
    parser.add_argument("--config", help="YAML or JSON file: model, data_path, fine_tune_config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. training_args.max_steps=40 or model.device=cpu (repeatable)")
    parser.add_argument("--retrain", action="store_true",
                        help="train even if an identical earlier run's adapter exists (= --set force_retrain=true)")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the LoRA/QLoRA GPU memory table (0.5B-70B) and exit")
    parser.add_argument("--seq-len", type=int, default=2048, help="for --estimate-memory (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="per-device batch for --estimate-memory (default 1)")
    parser.add_argument("--lora-rank", type=int, default=16, help="for --estimate-memory (default 16)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="for --estimate-memory")
    parser.add_argument("--export-gguf", metavar="DIR", type=Path,
                        help="after training, write DIR/model-TYPE.gguf + Modelfile + README (checked by loading back)")
    parser.add_argument("--gguf-type", choices=("f16", "q8_0"), default="q8_0",
                        help="with --export-gguf: f16 (lossless for the check) or q8_0 (half the size; default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: bad input and unexpected failures each end in one line on stderr, exit 2."""
    is_main = is_main_process()
    logs = Path(tempfile.gettempdir())  # errors.log goes to the runs folder once the config names it

    def say(message: str) -> None:
        if is_main:  # every rank reads the same input and fails the same way: say it once
            print(f"error: {safe_text(message)}", file=sys.stderr, flush=True)

    try:
        args = parse_args(argv)
        if args.estimate_memory:
            print(estimate(args))
            return 0
        if not args.config:
            raise InputError("give --config CONFIG.yaml (or --estimate-memory); see `python finetune.py --help`")
        sets = args.set + ["force_retrain=true"] * args.retrain
        config = load_config(args.config, sets)  # light imports only: bad input fails in a second
        logs = output_dir(config)
        if args.export_gguf is not None and is_main:  # an unusable folder fails now, not after training
            from hfmodel.gguf_export import check_destination

            check_destination(args.export_gguf.expanduser())
        export_gguf = (args.export_gguf.expanduser(), args.gguf_type) if args.export_gguf is not None else None
        return run(config, export_gguf)
    except (KeyboardInterrupt, FineTuneInterrupted) as e:
        if is_main:
            print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted", file=sys.stderr, flush=True)
        return 130
    except UserError as e:
        say(one_line(e))
        return 2
    except UnexpectedError as e:
        cause = e.__cause__ or e
        say(failure_line(e.what, cause, log_traceback(e.what, cause, logs)))
        return 2
    except Exception as e:  # noqa: BLE001 - the boundary: our own bug, named in one line, traceback logged
        say(failure_line("finetune.py", e, log_traceback("finetune.py", e, logs)))
        return 2
    finally:
        finish_distributed()


def one_line(error: Exception) -> str:
    """The project's "  - problem" lists as one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    rest = [line.lstrip("- ") for line in lines[1:]]
    return " ".join([lines[0] if lines else type(error).__name__, "; ".join(rest)]).strip()


def estimate(args: argparse.Namespace) -> str:
    sizes = {"--seq-len": args.seq_len, "--batch": args.batch, "--lora-rank": args.lora_rank}
    wrong = [f"{flag} must be a whole number >= 1 (got {value})" for flag, value in sizes.items() if value < 1]
    if wrong:
        raise InputError("; ".join(wrong))
    return memory_table(args.seq_len, args.batch, args.lora_rank, args.activation_checkpointing)


if __name__ == "__main__":
    sys.exit(main())
