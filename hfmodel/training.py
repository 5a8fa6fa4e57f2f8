"""The fine-tune recipe (SFT + LoRA with trl and peft) as explicit steps:

    prepare rows -> fingerprint (reuse an identical earlier run?) -> plan the arguments -> run the trainer -> record

plus the run directories (`runs/<timestamp>-<model>/`: run.json, checkpoints/, adapter/, report.md) and their lookup.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from hfmodel.adapters import AdapterSet, use_loraplus
from hfmodel.chat_format import MASK_SOURCES, Expansion, MaskPlan, split_tools
from hfmodel.common import (
    FineTuneError,
    FineTuneInterrupted,
    logger,
    redact,
    world_size,
    write_json_atomic,
    write_text_atomic,
)
from hfmodel.data import ChatDataset, Conversation, load_chat_dataset, with_system_prompt
from hfmodel.distributed import from_main_process, gather_trained_weights, sharded_training
from hfmodel.guards import non_finite_loss_guard
from hfmodel.loading import ModelHandle
from hfmodel.settings import FineTuneConfig
from hfmodel.speedups import loss_positions_only, own_forward, packed_attention, shared_prefix

Progress = Callable[[dict[str, Any]], None]
DRY_RUN_TOKENS = 4096  # tokens of row 1 that /dryrun decodes for display


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
    # The rows and the log stay out of the repr: `print(result)` shows the run, not the whole dataset.
    data: ChatDataset | None = field(default=None, repr=False)
    eval_rows: list[Conversation] = field(default_factory=list, repr=False)
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    distributed_type: str | None = None  # accelerate's, as the Trainer ran: "MULTI_GPU", "FSDP", ...; None = 1 process
    sharded: str | None = None  # "FSDP" / "DeepSpeed ZeRO-3": each process holds only a shard of the weights

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


@dataclass
class DryRun:
    """The dataset as a fine-tune would see it (see `dry_run`)."""

    data: ChatDataset
    lengths: list[int]
    max_length: int | None
    truncated: int
    segments: list[tuple[str, bool]]  # (token text, carries loss) for the first row
    mask_source: str  # a key of MASK_SOURCES: where the loss mask comes from
    tokens: int = 0  # tokens of row 1 (segments decode the first DRY_RUN_TOKENS one by one, the rest as one piece)
    expansion: Expansion = field(default_factory=Expansion)  # rows split into one example per assistant turn

    @property
    def mask_description(self) -> str:
        template = "trl's training template" if self.mask_source == "trl training template" else "the tokenizer's own"
        described = f"template: {template}; loss mask from {self.mask_source} ({MASK_SOURCES[self.mask_source]})"
        return f"{described}; {self.expansion.describe()}" if self.expansion.rows else described

    @property
    def loss_tokens(self) -> int:
        return sum(flag for _, flag in self.segments)

    def ends_turns_with_loss(self, end_token: str) -> bool:
        """True if every assistant end-of-turn token in row 1 carries loss (else the model never learns to stop)."""
        ends = [flag for text, flag in self.segments if text == end_token]
        return bool(ends) and all(ends)


@dataclass
class Rows:
    """The conversations of one run: train and held-out rows, and the dataset they came from."""

    train: list[Conversation]
    eval: list[Conversation]
    data: ChatDataset


Tokens = list[tuple[list[int], list[int]]]  # (input_ids, loss mask) per example (a row, or one turn of a row)


@dataclass
class Plan:
    """Everything decided before the trainer starts."""

    args: dict[str, Any]  # trl SFTConfig fields
    mask: MaskPlan  # how rows become tokens and loss masks
    train: Tokens
    eval: Tokens
    run_dir: Path
    resume_from: Path | None  # a checkpoint to continue from


# =============================================================================================
# Steps


def fine_tune(handle: ModelHandle, adapters: AdapterSet, data_path: str, cfg: FineTuneConfig,
              system_prompt: str | None, model_name: str, progress: Progress | None,
              stop: threading.Event) -> FineTuneResult:
    """The SFT recipe: rows -> fingerprint -> (an identical earlier run is reused) -> plan -> train -> record.
    On success the new adapter serves; on failure the previous weights do."""
    rows = prepare_rows(data_path, cfg, system_prompt)
    fingerprint_ = fingerprint(handle, adapters, rows, cfg)
    base_dir = Path(cfg.training_args["output_dir"]).expanduser()
    earlier = None if cfg.force_retrain or cfg.resume else find_completed_run(base_dir, fingerprint_)
    if earlier is not None:
        return reuse_run(earlier, adapters, rows)
    plan = plan_run(handle, rows, cfg, base_dir, fingerprint_, model_name)
    record = {"status": "running", "fingerprint": fingerprint_, "model": model_name,
              "source": handle.source.describe() if handle.source else None, "data": rows.data.describe(),
              "system_prompt": system_prompt}
    return train(handle, adapters, rows, cfg, plan, record, progress, stop)


def prepare_rows(data_path: str, cfg: FineTuneConfig, system_prompt: str | None) -> Rows:
    """Load and normalise the data, give rows the chat's system prompt, hold out the eval rows."""
    data = load_chat_dataset(data_path)
    rows = with_system_prompt(data.rows, system_prompt)
    if cfg.eval_data_path:
        eval_rows = with_system_prompt(load_chat_dataset(cfg.eval_data_path).rows, system_prompt)
        return Rows(rows, eval_rows, data)
    n_eval = int(round(len(rows) * cfg.eval_fraction)) if len(rows) >= 10 else 0
    if n_eval == 0:
        if cfg.eval_fraction:
            logger.info("Only %d rows: no eval split held out (needs >= 10 rows or eval_data_path).", len(rows))
        return Rows(rows, [], data)
    generator = torch.Generator().manual_seed(int(cfg.training_args.get("seed", 42)))
    order = torch.randperm(len(rows), generator=generator).tolist()
    held = set(order[:n_eval])
    return Rows([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held], data)


def fingerprint(handle: ModelHandle, adapters: AdapterSet, rows: Rows, cfg: FineTuneConfig) -> str:
    """Same base, parent adapter, rows, settings, template, dtype and process count -> same run."""
    parent = adapters.records[adapters.active].path if adapters.active else None
    blob = json.dumps({
        "base": handle.source.path if handle.source else None,
        "parent": str(parent) if parent else None,
        "train": rows.train, "eval": rows.eval,
        "lora": cfg.lora_config,
        "args": {k: v for k, v in cfg.training_args.items() if k not in ("output_dir", "disable_tqdm")},
        "template": handle.tokenizer.chat_template,
        "dtype": str(handle.dtype),
        "processes": world_size(),  # a different global batch is a different run
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def reuse_run(run_dir: Path, adapters: AdapterSet, rows: Rows) -> FineTuneResult:
    """Serve the adapter of an identical earlier run instead of training again."""
    logger.info("Reusing the adapter of an identical earlier run: %s (set force_retrain=True, or --retrain, to "
                "train again).", run_dir)
    record = adapters.load(run_dir / "adapter", note=f"reused {run_dir.name}")
    saved = read_json(run_dir / "run.json")
    return FineTuneResult(
        run_dir=run_dir, adapter_dir=run_dir / "adapter", adapter_name=record.name, reused=True,
        train_loss=saved.get("train_loss"), eval_loss_before=saved.get("eval_loss_before"),
        eval_loss_after=saved.get("eval_loss_after"), seconds=0.0, steps=saved.get("steps", 0),
        train_tokens=0, trainable_params=saved.get("trainable_params", 0), data=rows.data,
        eval_rows=rows.eval, log_history=[],
    )


def tokenize_rows(handle: ModelHandle, rows: list[Conversation], cfg: FineTuneConfig
                  ) -> tuple[MaskPlan, list[Tokens], Expansion]:
    """Each row's examples as the model's own template renders them, with their loss masks: assistant turns and
    their end-of-turn token (`assistant_only_loss`, the default), or every token. A row is one example, or one
    per trained assistant turn when the template renders earlier turns differently once later ones follow."""
    plan = handle.format.mask_plan(rows, assistant_only=bool(cfg.training_args.get("assistant_only_loss", True)))
    per_row, expansion = plan.tokenize_rows(rows)
    return plan, per_row, expansion


def flatten(per_row: list[Tokens]) -> Tokens:
    return [example for examples in per_row for example in examples]


def plan_run(handle: ModelHandle, rows: Rows, cfg: FineTuneConfig, base_dir: Path, fingerprint_: str,
             model_name: str) -> Plan:
    """Template, truncation check, padding-free, evaluation and checkpoint schedule, the run directory."""
    resume_dir = find_resumable_run(base_dir, fingerprint_) if cfg.resume else None
    if cfg.resume and resume_dir is None:
        logger.warning("resume=True but no interrupted run with the same model, data and config has a "
                       "checkpoint; starting a new run.")
    args = dict(cfg.training_args)
    mask, per_row, expansion = tokenize_rows(handle, rows.train + rows.eval, cfg)
    train_tokens, eval_tokens = flatten(per_row[:len(rows.train)]), flatten(per_row[len(rows.train):])
    lengths = [len(ids) for ids, _ in train_tokens]
    logger.info("Loss mask: %s.", MASK_SOURCES[mask.source])
    if expansion.rows:
        logger.info("Rows expanded: %s.", expansion.describe())
    too_long = sum(n > args["max_length"] for n in lengths) if args.get("max_length") else 0
    if too_long:
        logger.warning("%d of %d rows are longer than max_length=%s tokens and will be truncated.",
                       too_long, len(lengths), args["max_length"])
        if too_long == len(lengths) and not args.get("padding_free") and all(
                _first_loss_token(m) >= args["max_length"] for _, m in train_tokens):
            raise FineTuneError(
                f"Every row's first answer starts after max_length={args['max_length']} tokens, so truncation "
                "would leave nothing to learn. Raise training_args.max_length (longest row: "
                f"{max(lengths)} tokens) or shorten the rows.")
    run_dir = shared_run_dir(base_dir, model_name, resume_dir)
    if args.get("padding_free") is None:
        args["padding_free"] = too_long == 0 and handle.device.type != "mps"
    if args["padding_free"]:
        args["max_length"] = None  # rows were checked above; trl requires None without packing
    steps = planned_steps(len(train_tokens), args)
    if "eval_steps" not in cfg.user_training_keys:  # before, halfway, at the end: enough for the curve
        args["eval_steps"] = max(1, -(-steps // 2))
    if "save_steps" not in cfg.user_training_keys:
        args["save_steps"] = max(1, steps // 2)
    if not rows.eval:
        args["eval_strategy"] = "no"
    args["output_dir"] = str(run_dir / "checkpoints")
    # "Eval loss before" is measured inside train(): an evaluate() before train() leaves the model marked
    # prepared, and train() then skips the DDP wrap (each rank would silently train alone).
    args["eval_on_start"] = bool(rows.eval)
    args.pop("resume_from_checkpoint", None)
    args["assistant_only_loss"] = False  # the loss masks are in the tokenized rows (trl needs it off for those)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume_dir else None
    return Plan(args, mask, train_tokens, eval_tokens, run_dir, checkpoint)


def _first_loss_token(mask: list[int]) -> int:
    return mask.index(1) if 1 in mask else len(mask)


def train(handle: ModelHandle, adapters: AdapterSet, rows: Rows, cfg: FineTuneConfig, plan: Plan,
          record: dict[str, Any], progress: Progress | None, stop: threading.Event) -> FineTuneResult:
    """Train a new adapter; on success it serves, on any failure (or Ctrl-C) the previous weights still serve."""
    from transformers import set_seed

    set_seed(int(plan.args.get("seed", 42)))  # the LoRA init happens before the Trainer seeds
    adapter_name, model = adapters.for_training(cfg.lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run_json = plan.run_dir / "run.json"
    write_json_atomic(run_json, {**record, "parent_adapter": adapters.active, "config": cfg.to_json(),
                                 "resolved_training_args": plan.args, "trainable_params": trainable})
    started = time.perf_counter()
    previous = adapters.active
    made: dict[str, Any] = {}  # the trainer, once built: its state tells where a failed run stopped
    try:
        trainer, output, eval_before, eval_after = _fit(handle, model, rows, plan, cfg.lora_config, progress, stop, made)
        seconds = time.perf_counter() - started
        model.eval()
        # Under FSDP / ZeRO-3 every process joins in gathering the whole adapter; the main process writes it.
        weights = gather_trained_weights(trainer, handle.sharded_by)
        adapter_dir = adapters.save(adapter_name, plan.run_dir / "adapter", weights, replace=True)
    except (KeyboardInterrupt, Exception) as e:  # clean up, record, re-raise
        trainer = made.get("trainer")
        model.eval()
        if not handle.sharded_by:  # sharded layers stay unusable in this process anyway
            adapters.discard(adapter_name, previous)
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        write_json_atomic(run_json, {**read_json(run_json), "status": status, "error": redact(repr(e))[:500],
                                     "log_history": trainer.state.log_history if trainer else []})
        if isinstance(e, KeyboardInterrupt):
            raise FineTuneInterrupted(
                f"Fine-tuning stopped at step {trainer.state.global_step if trainer else 0}; still serving the "
                f"previous weights. Checkpoints stay in {plan.run_dir / 'checkpoints'}; continue with resume=true."
            ) from None
        raise
    result = FineTuneResult(
        run_dir=plan.run_dir, adapter_dir=adapter_dir, adapter_name=adapter_name, reused=False,
        train_loss=output.training_loss, eval_loss_before=eval_before, eval_loss_after=eval_after,
        seconds=seconds, steps=output.global_step, train_tokens=count_trained_tokens(trainer),
        trainable_params=trainable, data=rows.data, eval_rows=rows.eval, log_history=trainer.state.log_history,
        distributed_type=str(trainer.accelerator.distributed_type).split(".")[-1] if world_size() > 1 else None,
        sharded=handle.sharded_by,
    )
    _record_completed(result)
    adapters.add_trained(adapter_name, adapter_dir, previous, f"trained {plan.run_dir.name}")
    logger.info("Fine-tuned in %.1f s (%d steps): train loss %.3f%s. Run: %s", seconds, result.steps,
                result.train_loss or float("nan"),
                f", eval loss {eval_before:.3f} -> {eval_after:.3f}" if rows.eval else "", plan.run_dir)
    return result


def _fit(handle: ModelHandle, model: Any, rows: Rows, plan: Plan, lora: dict[str, Any], progress: Progress | None,
         stop: threading.Event, made: dict[str, Any]) -> tuple[Any, Any, float | None, float | None]:
    """Build the SFTTrainer and train: (trainer, train output, eval loss before, eval loss after)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    def dataset(tokens: Tokens) -> Any:
        return Dataset.from_list([{"input_ids": ids, "assistant_masks": mask} for ids, mask in tokens]) \
            if tokens else None

    with loss_positions_only(handle.device), packed_attention(handle.base_model(), bool(plan.args["padding_free"])), \
            own_forward(model):
        trainer = SFTTrainer(model=model, args=SFTConfig(**plan.args), train_dataset=dataset(plan.train),
                             eval_dataset=dataset(plan.eval), processing_class=handle.tokenizer,
                             callbacks=[progress_callback(progress, stop), non_finite_loss_guard()])
        made["trainer"] = trainer
        use_loraplus(trainer, lora)
        trainer.remove_callback(PrinterCallback)  # progress goes through `progress`, not print()
        model.train()
        handle.sharded_by = sharded_training(trainer)  # from here on the layers may hold shards only
        handle.adapter_dir_hint = str(plan.run_dir / "adapter")
        checkpoint = str(plan.resume_from) if plan.resume_from else None
        with shared_prefix(handle.base_model(), enabled=not handle.sharded_by):
            output = trainer.train(resume_from_checkpoint=checkpoint)
            evals = [e for e in trainer.state.log_history if "eval_loss" in e]
            eval_before = evals[0]["eval_loss"] if evals else None
            if stop.is_set():
                raise KeyboardInterrupt
            eval_after = None
            if rows.eval:  # the final step's scheduled evaluation already measured it, else evaluate now
                done = len(evals) > 1 and evals[-1].get("step") == trainer.state.global_step
                eval_after = evals[-1]["eval_loss"] if done else trainer.evaluate()["eval_loss"]
    return trainer, output, eval_before, eval_after


def _record_completed(result: FineTuneResult) -> None:
    write_json_atomic(result.run_dir / "log_history.json", result.log_history)
    write_json_atomic(result.run_dir / "run.json", {
        **read_json(result.run_dir / "run.json"), "status": "completed",
        "train_loss": result.train_loss, "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after, "seconds": round(result.seconds, 2), "steps": result.steps,
        "train_tokens": result.train_tokens, "tokens_per_second": round(result.tokens_per_second, 1),
    })


def dry_run(handle: ModelHandle, data_path: str, cfg: FineTuneConfig, system_prompt: str | None) -> DryRun:
    """What a fine-tune would see: format, rows, token lengths, truncation, and the loss mask of row 1."""
    data = load_chat_dataset(data_path)
    rows = with_system_prompt(data.rows, system_prompt)
    plan, per_row, expansion = tokenize_rows(handle, rows, cfg)
    tokens = flatten(per_row)
    lengths = [len(ids) for ids, _ in tokens]
    max_length = cfg.training_args.get("max_length")
    ids, mask = tokens[0]
    shown = DRY_RUN_TOKENS  # a screenful is what the chat shows; decoding a huge row token by token takes seconds
    segments = [(handle.tokenizer.decode([i]), bool(m)) for i, m in zip(ids[:shown], mask[:shown], strict=True)]
    if len(ids) > shown:  # the rest in one piece: its length is counted, its tokens are not decoded one by one
        segments.append((handle.tokenizer.decode(ids[shown:]), bool(any(mask[shown:]))))
    return DryRun(data=data, lengths=sorted(lengths), max_length=max_length,
                  truncated=sum(n > max_length for n in lengths) if max_length else 0,
                  segments=segments, mask_source=plan.source, tokens=len(ids), expansion=expansion)


def taught_mix(taught_path: Path, replay_path: str | None, min_repeats: int) -> Path:
    """The rows `/train` learns from, written beside the taught file: every taught example repeated so that
    taught rows make up at least half of the mix (a few corrections are learned within one short run), plus the
    configured data replayed so the rest is not forgotten."""
    taught = [json.loads(line) for line in taught_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    replayed = [dataset_row(r) for r in load_chat_dataset(replay_path).rows] if replay_path else []
    repeats = max(min_repeats, -(-len(replayed) // len(taught)))
    mix = taught_path.with_name(taught_path.stem + "-train.jsonl")
    write_text_atomic(mix, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in taught * repeats + replayed))
    return mix


def dataset_row(conversation: Conversation) -> dict[str, Any]:
    """A loaded conversation as a `messages` row again, its tool schemas back in the `tools` column."""
    messages, tools = split_tools(conversation)
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def progress_callback(report: Progress | None, stop: threading.Event) -> Any:
    """A TrainerCallback that forwards progress to a plain function and stops training when asked (Ctrl-C)."""
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

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Between evaluation batches too: a background run (chat/background.py) pauses here for a reply. Marked,
            # so that whoever counts optimizer steps (finetune.py's per-rank line) does not count eval batches.
            if report:
                report({"step": state.global_step, "max_steps": state.max_steps, "evaluating": True})

    return Callback()


def planned_steps(n_rows: int, args: dict[str, Any]) -> int:
    if args.get("max_steps", -1) > 0:
        return int(args["max_steps"])
    per_step = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * world_size()
    return max(1, int(-(-n_rows // per_step) * float(args["num_train_epochs"])))


def count_trained_tokens(trainer: Any) -> int:
    """Non-padding tokens the run trained on (trl logs a running `num_tokens`)."""
    counts = [log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log and "loss" in log]
    return int(counts[-1]) if counts else 0


# =============================================================================================
# Run directories


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


def shared_run_dir(base: Path, model_name: str, existing: Path | None = None) -> Path:
    """The main process creates the run directory; under distributed training every rank gets its path."""
    return Path(from_main_process(lambda: str(existing or new_run_dir(base, model_name))))


def runs_with(base_dir: Path, fingerprint_: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Earlier run directories under `base_dir` with this fingerprint, newest first."""
    for run in sorted(base_dir.glob("*/run.json"), reverse=True):
        info = read_json(run)
        if info.get("fingerprint") == fingerprint_:
            yield run.parent, info


def find_completed_run(base_dir: Path, fingerprint_: str) -> Path | None:
    return next((run for run, info in runs_with(base_dir, fingerprint_) if info.get("status") == "completed"
                 and (run / "adapter" / "adapter_config.json").exists()), None)


def find_resumable_run(base_dir: Path, fingerprint_: str) -> Path | None:
    return next((run for run, info in runs_with(base_dir, fingerprint_) if info.get("status") in
                 ("interrupted", "failed") and latest_checkpoint(run / "checkpoints") is not None), None)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None
