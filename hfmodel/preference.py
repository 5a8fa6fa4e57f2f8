"""Learning from preferences: DPO, ORPO and KTO with LoRA, on trl's own trainers, as explicit steps like the SFT
recipe in training.py:

    prepare rows -> fingerprint (reuse an identical earlier run?) -> score (before) -> train -> score (after) -> record

- DPO (`trl.DPOTrainer`) and ORPO (`trl.experimental.orpo.ORPOTrainer`: in trl 1.16 ORPO lives in the experimental
  package) learn from pairs; KTO (`trl.KTOTrainer`) from answers marked good or bad (pairs are split into one good
  and one bad answer).
- The reference model of DPO and KTO is the model as it served before the run: the same weights with the new
  adapter disabled, or with a frozen copy of the adapter the new one continues from (`speedups.trl_reference`);
  no second copy of the base model is made. ORPO needs no reference.
- Scores, before and after: for each pair, the summed log-probability of each answer given the prompt, over exactly
  the tokens DPO and KTO train on (`answer_tokens`). Accuracy = share of pairs whose chosen answer is the likelier;
  margin = mean log p(chosen) - log p(rejected), in nats. Measured on the held-out pairs, or on the training pairs
  when there are none (a few pairs taught in the chat). Answers marked good or bad with no pair for the same prompt
  give a margin only: mean log p(good) - mean log p(bad).

trl, peft and datasets are imported only when a run starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hfmodel import training
from hfmodel.adapters import AdapterSet, use_loraplus
from hfmodel.chat_format import ChatFormat
from hfmodel.common import FineTuneConfigError, FineTuneInterrupted, logger, redact, world_size, write_json_atomic
from hfmodel.data import Conversation, DatasetFormatError
from hfmodel.distributed import gather_trained_weights, sharded_training
from hfmodel.loading import ModelHandle
from hfmodel.preference_data import (
    Marked,
    Pair,
    PreferenceDataset,
    load_preference_dataset,
    pairs_of,
    unique,
    unpair,
)
from hfmodel.settings import FineTuneConfig, trainer_config_class, trainer_fields
from hfmodel.speedups import drop_trl_reference, loss_positions_only, own_forward, trl_reference

PAIRED_METHODS = ("dpo", "orpo")  # learn from pairs; "kto" learns from marked answers
SCORE_BATCH = 8  # sequences per forward pass when scoring


@dataclass
class Scores:
    """How strongly the model prefers the chosen (good) answers, at one moment."""

    count: int  # pairs scored (or marked answers, when `accuracy` is None)
    accuracy: float | None  # share of pairs whose chosen answer is the likelier; None without pairs
    margin: float | None  # mean log p(chosen) - log p(rejected), nats (good - bad answers without pairs)

    @property
    def unit(self) -> str:
        return "pairs" if self.accuracy is not None else "marked answers"


@dataclass
class PreferenceResult(training.FineTuneResult):
    """What one preference `fine_tune` call produced: the SFT result's fields plus the scores before and after."""

    method: str = "dpo"
    before: Scores | None = None
    after: Scores | None = None
    scored_on: str = "held-out pairs"  # or "training pairs" when nothing was held out


@dataclass
class PreferenceRows:
    """The rows of one run: what the method trains on, the held-out rows, and the rows scored before/after."""

    train: list[Any]  # Pair for dpo/orpo, Marked for kto
    eval: list[Any]  # held-out rows, in the data's own shape
    data: PreferenceDataset
    scored: list[Any]
    scored_on: str

    @property
    def prompts(self) -> list[Conversation]:
        return [r.prompt for r in unique(self.scored)]


@dataclass
class PreferenceDryRun:
    """The preference data as a run would see it (see `dry_run`); read like `training.DryRun` by `/dryrun`."""

    data: PreferenceDataset
    method: str
    lengths: list[int]  # tokens of prompt + answer, each answer
    max_length: int | None
    truncated: int
    segments: list[tuple[str, bool]]  # (token text, scored) for the first row; headers are not tokens
    heading: str = "First pair (highlighted tokens are scored: the chosen answer, then the rejected one):"

    @property
    def mask_description(self) -> str:
        return (f"method {self.method}: each answer is scored on the tokens the chat template adds after the prompt "
                "and its generation prompt (trl's tokenization)")

    @property
    def loss_tokens(self) -> int:
        return sum(flag for _, flag in self.segments)


@dataclass
class Plan:
    args: dict[str, Any]  # fields of the method's trl config class
    run_dir: Path
    resume_from: Path | None = None


# =============================================================================================
# Steps


def fine_tune(handle: ModelHandle, adapters: AdapterSet, data_path: str, cfg: FineTuneConfig,
              system_prompt: str | None, model_name: str, progress: training.Progress | None,
              stop: threading.Event) -> PreferenceResult:
    """Train a new adapter with cfg.method on preference data; on success it serves, else the previous weights do."""
    rows = prepare_rows(data_path, cfg, system_prompt, handle.format)
    fingerprint_ = fingerprint(handle, adapters, rows, cfg)
    base_dir = Path(cfg.training_args["output_dir"]).expanduser()
    earlier = None if cfg.force_retrain or cfg.resume else training.find_completed_run(base_dir, fingerprint_)
    if earlier is not None:
        return reuse_run(earlier, adapters, rows, cfg.method)
    before = score(handle, rows.scored)
    plan = plan_run(rows, cfg, base_dir, fingerprint_, model_name, handle.device)
    record = {"status": "running", "method": cfg.method, "fingerprint": fingerprint_, "model": model_name,
              "source": handle.source.describe() if handle.source else None, "data": rows.data.describe(),
              "system_prompt": system_prompt}
    return train(handle, adapters, rows, cfg, plan, record, before, progress, stop)


def rows_for(rows: list[Any], method: str, source: str) -> list[Any]:
    """The rows in the shape `method` learns from (pairs for dpo/orpo; kto splits pairs into marked answers)."""
    if method in PAIRED_METHODS:
        if any(isinstance(r, Marked) for r in rows):
            raise DatasetFormatError(f"{source} holds answers marked good or bad (prompt/completion/label), not "
                                     f"pairs: method={method} needs prompt/chosen/rejected rows. Train it with "
                                     "method=kto.")
        return list(rows)
    return [m for r in rows for m in (unpair([r]) if isinstance(r, Pair) else [r])]


def prepare_rows(data_path: str, cfg: FineTuneConfig, system_prompt: str | None, fmt: ChatFormat) -> PreferenceRows:
    """Load and normalise the data, give prompts the chat's system prompt, hold out rows to score."""
    data = _with_system_prompt(load_preference_dataset(data_path), system_prompt, fmt)
    rows: list[Any] = list(data.rows)
    if cfg.eval_data_path:
        held = _with_system_prompt(load_preference_dataset(cfg.eval_data_path), system_prompt, fmt)
        rows_for(list(held.rows), cfg.method, held.source)  # the method must be able to read it
        train, eval_ = rows, list(held.rows)
    else:
        n_eval = int(round(len(rows) * cfg.eval_fraction)) if len(rows) >= 10 else 0
        generator = torch.Generator().manual_seed(int(cfg.training_args.get("seed", 42)))
        order = torch.randperm(len(rows), generator=generator).tolist()
        held_out = set(order[:n_eval])
        train = [r for i, r in enumerate(rows) if i not in held_out]
        eval_ = [r for i, r in enumerate(rows) if i in held_out]
    scored, where = (eval_, "held-out") if eval_ else (unique(train), "training")
    paired = any(isinstance(r, Pair) for r in scored) or pairs_of([r for r in scored if isinstance(r, Marked)])
    return PreferenceRows(rows_for(train, cfg.method, data.source), eval_, data, scored,
                          f"{where} {'pairs' if paired else 'marked answers'}")


def _with_system_prompt(data: PreferenceDataset, system_prompt: str | None, fmt: ChatFormat) -> PreferenceDataset:
    """Prompts as chat sends them: the chat's system prompt where a row has none (folded in where the template has
    no system role)."""
    rows = [type(r)(fmt.prepare(r.prompt, system_prompt), *_answers(r)) for r in data.rows]
    return PreferenceDataset(rows, data.format, data.source, data.skipped)  # type: ignore[arg-type]


def _answers(row: Pair | Marked) -> tuple[Any, ...]:
    return (row.chosen, row.rejected) if isinstance(row, Pair) else (row.completion, row.label)


def fingerprint(handle: ModelHandle, adapters: AdapterSet, rows: PreferenceRows, cfg: FineTuneConfig) -> str:
    """Same base, parent adapter, method, rows, settings, template, dtype and process count -> same run."""
    parent = adapters.records[adapters.active].path if adapters.active else None
    blob = json.dumps({
        "base": handle.source.path if handle.source else None,
        "parent": str(parent) if parent else None,
        "method": cfg.method,
        "train": [r.to_row() for r in rows.train], "eval": [r.to_row() for r in rows.eval],
        "lora": cfg.lora_config,
        "args": {k: v for k, v in cfg.training_args.items() if k not in ("output_dir", "disable_tqdm")},
        "template": handle.tokenizer.chat_template,
        "dtype": str(handle.dtype),
        "processes": world_size(),
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def reuse_run(run_dir: Path, adapters: AdapterSet, rows: PreferenceRows, method: str) -> PreferenceResult:
    """Serve the adapter of an identical earlier run instead of training again."""
    logger.info("Reusing the adapter of an identical earlier run: %s (set force_retrain=True, or --retrain, to "
                "train again).", run_dir)
    record = adapters.load(run_dir / "adapter", note=f"reused {run_dir.name}")
    saved = training.read_json(run_dir / "run.json")
    scores = saved.get("scores") or {}
    return PreferenceResult(
        run_dir=run_dir, adapter_dir=run_dir / "adapter", adapter_name=record.name, reused=True,
        train_loss=saved.get("train_loss"), eval_loss_before=None, eval_loss_after=None, seconds=0.0,
        steps=saved.get("steps", 0), train_tokens=0, trainable_params=saved.get("trainable_params", 0),
        eval_rows=rows.prompts, method=method, before=_scores(scores.get("before")), after=_scores(scores.get("after")),
        scored_on=scores.get("scored_on", rows.scored_on),
    )


def _scores(saved: Any) -> Scores | None:
    return Scores(**saved) if isinstance(saved, dict) else None


def plan_run(rows: PreferenceRows, cfg: FineTuneConfig, base_dir: Path, fingerprint_: str, model_name: str,
             device: torch.device) -> Plan:
    """The trainer's arguments (the method's config fields only), checkpoint schedule, the run directory."""
    fields = set(trainer_fields(cfg.method))
    user = cfg.user_training_keys
    # DEFAULT_TRAINING_ARGS holds SFT settings the other trainers do not take (assistant_only_loss, ...); what the
    # user typed was checked against the method's own fields already.
    args = {k: v for k, v in cfg.training_args.items() if k in fields and (v is not None or k in user)}
    if cfg.method == "kto" and args["per_device_train_batch_size"] < 2:
        raise FineTuneConfigError("method=kto needs per_device_train_batch_size >= 2: its KL term compares the "
                                  "answers within a batch.")
    resume_dir = training.find_resumable_run(base_dir, fingerprint_) if cfg.resume else None
    if cfg.resume and resume_dir is None:
        logger.warning("resume=True but no interrupted run with the same model, data and config has a "
                       "checkpoint; starting a new run.")
    steps = training.planned_steps(len(rows.train), args)
    if "save_steps" not in user:
        args["save_steps"] = max(1, steps // 2)
    if rows.eval and args.get("eval_strategy", "no") != "no":  # trl's own evaluation, when asked for
        args.setdefault("eval_steps", max(1, -(-steps // 2)))
        args["eval_on_start"] = True
    else:
        args["eval_strategy"] = "no"
    if cfg.method != "orpo" and "precompute_ref_log_probs" not in user:
        # On one CPU process the reference log-probs are computed once, before training, instead of in every step
        # (a forward pass less per step). Not under a launcher: trl caches them in a per-process temporary file.
        args["precompute_ref_log_probs"] = device.type == "cpu" and world_size() == 1
    if cfg.method == "orpo":
        args["remove_unused_columns"] = False  # its collator needs the tokenized columns (trl warns otherwise)
    args.pop("resume_from_checkpoint", None)
    run_dir = training.shared_run_dir(base_dir, model_name, resume_dir)
    args["output_dir"] = str(run_dir / "checkpoints")
    checkpoint = training.latest_checkpoint(run_dir / "checkpoints") if resume_dir else None
    return Plan(args, run_dir, checkpoint)


def train(handle: ModelHandle, adapters: AdapterSet, rows: PreferenceRows, cfg: FineTuneConfig, plan: Plan,
          record: dict[str, Any], before: Scores, progress: training.Progress | None,
          stop: threading.Event) -> PreferenceResult:
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
    made: dict[str, Any] = {}
    try:
        trainer, output = _fit(handle, model, adapter_name, rows, cfg.method, plan, cfg.lora_config, progress, stop, made)
        seconds = time.perf_counter() - started
        model.eval()
        weights = gather_trained_weights(trainer, handle.sharded_by)
        adapter_dir = adapters.save(adapter_name, plan.run_dir / "adapter", weights, replace=True)
    except (KeyboardInterrupt, Exception) as e:  # clean up, record, re-raise
        trainer = made.get("trainer")
        model.eval()
        if not handle.sharded_by:
            adapters.discard(adapter_name, previous)
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        write_json_atomic(run_json, {**training.read_json(run_json), "status": status,
                                     "error": redact(repr(e))[:500],
                                     "log_history": trainer.state.log_history if trainer else []})
        if isinstance(e, KeyboardInterrupt):
            raise FineTuneInterrupted(
                f"Fine-tuning stopped at step {trainer.state.global_step if trainer else 0}; still serving the "
                f"previous weights. Checkpoints stay in {plan.run_dir / 'checkpoints'}; continue with resume=true."
            ) from None
        raise
    after = score(handle, rows.scored) if not handle.sharded_by else None  # the new adapter is active
    result = PreferenceResult(
        run_dir=plan.run_dir, adapter_dir=adapter_dir, adapter_name=adapter_name, reused=False,
        train_loss=output.training_loss, eval_loss_before=None, eval_loss_after=None, seconds=seconds,
        steps=output.global_step, train_tokens=training.count_trained_tokens(trainer), trainable_params=trainable,
        eval_rows=rows.prompts, log_history=trainer.state.log_history,
        distributed_type=str(trainer.accelerator.distributed_type).split(".")[-1] if world_size() > 1 else None,
        sharded=handle.sharded_by, method=cfg.method, before=before, after=after, scored_on=rows.scored_on,
    )
    _record_completed(result, rows)
    adapters.add_trained(adapter_name, adapter_dir, previous, f"{cfg.method} {plan.run_dir.name}")
    logger.info("%s in %.1f s (%d steps): %s. Run: %s", cfg.method.upper(), seconds, result.steps,
                describe_scores(before, after, rows.scored_on), plan.run_dir)
    return result


def _fit(handle: ModelHandle, model: Any, adapter: str, rows: PreferenceRows, method: str, plan: Plan,
         lora: dict[str, Any], progress: training.Progress | None, stop: threading.Event,
         made: dict[str, Any]) -> tuple[Any, Any]:
    """Build the method's trl trainer on the peft model and train: (trainer, train output)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from hfmodel.guards import non_finite_loss_guard

    config_class, trainer_class = _trainer_classes(method)
    seed = int(plan.args.get("seed", 42))
    train_set = Dataset.from_list(trl_rows(rows.train, seed))
    eval_set = Dataset.from_list(trl_rows(rows_for(rows.eval, method, "the eval data"), seed)) \
        if plan.args.get("eval_strategy") != "no" else None
    callbacks = [training.progress_callback(progress, stop), non_finite_loss_guard()]
    reference = trl_reference(model, adapter) if method != "orpo" else nullcontext()
    try:
        with loss_positions_only(handle.device), own_forward(model):
            with reference, _quiet_tqdm():  # trl's reference precompute draws a bar; progress goes to `progress`
                trainer = trainer_class(model=model, args=config_class(**plan.args), train_dataset=train_set,
                                        eval_dataset=eval_set, processing_class=handle.tokenizer, callbacks=callbacks)
            made["trainer"] = trainer
            use_loraplus(trainer, lora)
            trainer.remove_callback(PrinterCallback)  # progress goes through `progress`, not print()
            model.train()
            handle.sharded_by = sharded_training(trainer)
            handle.adapter_dir_hint = str(plan.run_dir / "adapter")
            output = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
            if stop.is_set():
                raise KeyboardInterrupt
    finally:
        drop_trl_reference(model)
    return trainer, output


@contextmanager
def _quiet_tqdm() -> Iterator[None]:
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def _trainer_classes(method: str) -> tuple[type, type]:
    config_class = trainer_config_class(method)  # imports ORPO quietly
    if method == "dpo":
        from trl import DPOTrainer

        return config_class, DPOTrainer
    if method == "kto":
        from trl import KTOTrainer

        return config_class, KTOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return config_class, ORPOTrainer


def trl_rows(rows: list[Any], seed: int) -> list[dict[str, Any]]:
    """trl's conversational rows; marked answers shuffled (KTO's KL term pairs each answer with its batch's
    neighbours, in order: one prompt's good and bad answers side by side would teach it little)."""
    out = [r.to_row() for r in rows]
    if rows and isinstance(rows[0], Marked):
        order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()
        out = [out[i] for i in order]
    return out


def _record_completed(result: PreferenceResult, rows: PreferenceRows) -> None:
    write_json_atomic(result.run_dir / "log_history.json", result.log_history)
    write_json_atomic(result.run_dir / "run.json", {
        **training.read_json(result.run_dir / "run.json"), "status": "completed",
        "train_loss": result.train_loss, "seconds": round(result.seconds, 2), "steps": result.steps,
        "train_tokens": result.train_tokens, "tokens_per_second": round(result.tokens_per_second, 1),
        "scores": {"scored_on": rows.scored_on, "before": asdict(result.before) if result.before else None,
                   "after": asdict(result.after) if result.after else None},
    })


def describe_scores(before: Scores | None, after: Scores | None, scored_on: str) -> str:
    def one(s: Scores | None) -> str:
        if s is None:
            return "-"
        accuracy = f"accuracy {s.accuracy:.2f}, " if s.accuracy is not None else ""
        return accuracy + (f"margin {s.margin:+.2f}" if s.margin is not None else "no margin")

    n = before.count if before else after.count if after else 0
    return f"{one(before)} -> {one(after)} on {n} {scored_on}"


# =============================================================================================
# Scoring


def answer_tokens(tokenizer: Any, prompt: Conversation, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as trl's DPO and KTO trainers cut them: the answer is what rendering
    prompt + answer adds after the prompt rendered with its generation prompt (from where the two first differ)."""
    def ids(messages: Conversation, generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation_prompt)["input_ids"])

    prompt_ids = ids(prompt, True)
    full = ids([*prompt, {"role": "assistant", "content": answer}], False)
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    return full[:n], full[n:]


def answer_logps(handle: ModelHandle, items: list[tuple[Conversation, str]]) -> list[float]:
    """Summed log-probability of each answer given its prompt, under the weights serving now."""
    model, tokenizer = handle.module, handle.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [answer_tokens(tokenizer, prompt, answer) for prompt, answer in items]
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(encoded), SCORE_BATCH):
                batch = encoded[start:start + SCORE_BATCH]
                width = max(len(p) + len(a) for p, a in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (p, a) in enumerate(batch):
                    ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                    mask[i, :len(p) + len(a)] = 1
                logits = model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device)).logits
                for i, (p, a) in enumerate(batch):
                    if not a:
                        out.append(0.0)
                        continue
                    scores = logits[i, len(p) - 1:len(p) + len(a) - 1].float().log_softmax(-1)
                    target = torch.tensor(a, device=scores.device).unsqueeze(-1)
                    out.append(float(scores.gather(-1, target).sum()))
    finally:
        model.train(was_training)
    return out


def score(handle: ModelHandle, rows: list[Any]) -> Scores:
    """Accuracy and margin of pairs (or of marked answers: pairs sharing a prompt, else good minus bad)."""
    rows = unique(rows)
    pairs = [r for r in rows if isinstance(r, Pair)] or pairs_of([r for r in rows if isinstance(r, Marked)])
    if pairs:
        logps = answer_logps(handle, [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs])
        diffs = [c - r for c, r in zip(logps[:len(pairs)], logps[len(pairs):], strict=True)]
        return Scores(len(pairs), sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs))
    marked = [r for r in rows if isinstance(r, Marked)]
    logps = answer_logps(handle, [(m.prompt, m.completion) for m in marked])
    good = [lp for lp, m in zip(logps, marked, strict=True) if m.label]
    bad = [lp for lp, m in zip(logps, marked, strict=True) if not m.label]
    margin = sum(good) / len(good) - sum(bad) / len(bad) if good and bad else None
    return Scores(len(marked), None, margin)


# =============================================================================================
# Dry run


def dry_run(handle: ModelHandle, data_path: str, cfg: FineTuneConfig, system_prompt: str | None) -> PreferenceDryRun:
    """What a preference run would see: format, rows, token lengths, truncation, and the scored tokens of row 1."""
    data = _with_system_prompt(load_preference_dataset(data_path), system_prompt, handle.format)
    method = cfg.method if cfg.method != "sft" else ("dpo" if data.paired else "kto")
    rows_for(list(data.rows), method, data.source)
    tokenizer = handle.tokenizer
    lengths = sorted(len(p) + len(a) for p, a in (answer_tokens(tokenizer, r.prompt, text)
                                                  for r in data.rows for text in _texts(r)))
    max_length = cfg.training_args.get("max_length")
    first = data.rows[0]
    segments: list[tuple[str, bool]] = []
    for n, text in enumerate(_texts(first)):
        prompt_ids, ids = answer_tokens(tokenizer, first.prompt, text)
        if n == 0:
            segments += [(tokenizer.decode([i]), False) for i in prompt_ids]
        else:
            segments.append(("\n--- rejected, after the same prompt ---\n", False))
        segments += [(tokenizer.decode([i]), True) for i in ids]
    heading = PreferenceDryRun.heading if isinstance(first, Pair) else (
        f"First answer (marked {'good' if first.label else 'bad'}; highlighted tokens are scored):")
    return PreferenceDryRun(data=data, method=method, lengths=lengths, max_length=max_length,
                            truncated=sum(n > max_length for n in lengths) if max_length else 0, segments=segments,
                            heading=heading)


def _texts(row: Pair | Marked) -> Iterator[str]:
    yield from (row.chosen, row.rejected) if isinstance(row, Pair) else (row.completion,)


def looks_like_preference(data_path: str) -> bool:
    """True when the data's columns are a preference format (so `/dryrun file` needs no method=...)."""
    from hfmodel.data import load_rows
    from hfmodel.preference_data import is_preference_data

    try:
        rows = load_rows(data_path)
    except DatasetFormatError:
        return False  # the SFT dry run reports it
    return is_preference_data(set().union(*(r.keys() for r in rows if isinstance(r, dict))))
