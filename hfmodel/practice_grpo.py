"""Practice with GRPO: trl's `GRPOTrainer` on the practice tasks, the verifier as its reward, the agent's tools in
trl's own multi-turn tool loop (tool results are masked out of the loss), a new LoRA adapter continuing from the
serving one, `model.generate` (no vLLM), on CPU or GPU.

Differences from RFT worth knowing: trl samples the attempts itself (with the tool loop of trl, not the AgentScope
agent's), so the chat's call-reading safeguards (repeat suppression, unread markup) do not apply during training;
the before/after report still measures through the agent. Tasks with their own `tools` get just those tools in
trl's loop too (one trl "environment" per tool set) when the tasks do not all share one set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from hfmodel.common import FineTuneInterrupted, is_main_process, logger, redact, world_size, write_json_atomic
from hfmodel.distributed import gather_lists, sharded_training
from hfmodel.practice import (
    GRPO_SAFE_LEARNING_RATE,
    GRPO_TRAINING_ARGS,
    PracticeError,
    PracticeSettings,
    RoundLog,
    Sampling,
    Scorer,
    Task,
)
from hfmodel.settings import FineTuneConfig

# GRPOConfig settings where they differ from trl's (and from the SFT defaults): trl's tqdm and checkpointing off, every
# step logged, the tool loop as long as the agent's round limit.
GRPO_ARGS = {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
             "gradient_checkpointing": False, "max_tool_calling_iterations": 5, "dataloader_num_workers": 0}


def tool_functions(sampling: Sampling, names: list[str] | None = None) -> list[Any]:
    """The agent's tools (`names`, default all) as plain functions for trl (only those that run without asking, unless
    allow_tools)."""
    toolkit = sampling.toolkit
    names = [t["function"]["name"] for t in sampling.tools or []] if names is None else names
    if toolkit is None or not names:
        return []

    async def collect() -> list[Any]:
        found = []
        for name in names:
            tool = await toolkit.get_tool(name)
            function = getattr(tool, "_func", None)
            if function is None:
                continue
            if not (getattr(tool, "is_read_only", False) or sampling.allow_tools):
                logger.warning("GRPO leaves out the tool %s: it asks for permission (allow_tools=true runs it).", name)
                continue
            found.append(function)
        return found

    return asyncio.run(collect())


def grpo_args(cfg: FineTuneConfig, settings: PracticeSettings, parameters: Any, run_dir: Path,
              n_prompts: int) -> dict[str, Any]:
    """GRPOConfig fields: the fine-tune settings that GRPO shares, the practice settings, the device's choices."""
    from trl import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    shared = {k: v for k, v in cfg.training_args.items() if k in fields and k not in (
        "per_device_train_batch_size", "per_device_eval_batch_size", "eval_strategy", "save_strategy", "max_length",
        "padding_free", "assistant_only_loss", "save_steps", "eval_steps", "output_dir", "num_train_epochs")}
    args = {**shared, **GRPO_ARGS}
    if cfg.training_args.get("max_steps", -1) in (-1, None):
        args["max_steps"] = n_prompts  # one pass over the tasks, one task (k attempts) per step
    args.update(output_dir=str(run_dir / "grpo"), num_generations=settings.k, per_device_train_batch_size=settings.k,
                temperature=settings.temperature, top_p=settings.top_p if settings.top_p is not None else
                parameters.top_p, max_completion_length=int(parameters.max_length),
                seed=int(cfg.training_args.get("seed", 42)))
    return args


def grpo_round(model: Any, tasks: list[Task], settings: PracticeSettings, config: dict[str, Any], scorer: Scorer,
               sampling: Sampling, run_dir: Path, progress: Any, stop: threading.Event) -> RoundLog:
    """One GRPO run over `tasks`; the new adapter serves afterwards (on failure or Ctrl-C the previous one does)."""
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from hfmodel.adapters import use_loraplus
    from hfmodel.training import progress_callback

    handle, adapters = model.handle, model.adapter_set
    cfg = FineTuneConfig.from_dict(config, handle.device)
    tools, environments = task_tools(tasks, sampling)
    tokenizer = _tool_tokenizer(handle, bool(tools) or any(f for f in (environments or {}).values()))
    rows = [{"prompt": ([{"role": "system", "content": sampling.system_prompt}] if sampling.system_prompt else [])
             + t.messages, "task": i} for i, t in enumerate(tasks)]
    if environments is not None:
        rows = [{**row, "environment": _set_name(sampling.tool_names(t))} for row, t in zip(rows, tasks, strict=True)]
    rewards: list[float] = []

    def reward(prompts: list[Any], completions: list[Any], task: list[int], **_: Any) -> list[float | None]:
        scores = [scorer(tasks[index], *_reply_and_calls(completion))
                  for completion, index in zip(completions, task, strict=True)]
        rewards.extend(scores)
        return list[float | None](scores)

    args = grpo_args(cfg, settings, model.parameters, run_dir, len(rows))
    if float(args.get("learning_rate", 0)) > GRPO_SAFE_LEARNING_RATE:
        logger.warning("GRPO at learning_rate %g: policy-gradient steps at a fine-tune's learning rate can undo what "
                       "the model knew within a few steps (SmolLM2 lost its tool calls at 1e-3); %g is the default.",
                       float(args["learning_rate"]), GRPO_TRAINING_ARGS["learning_rate"])
    set_seed(int(args["seed"]))
    adapter_name, peft_model = adapters.for_training(cfg.lora_config)
    previous = adapters.active
    started = time.perf_counter()
    trainer = None
    try:
        with warnings.catch_warnings():  # per-task tool sets use trl's environments, which it calls experimental
            warnings.filterwarnings("ignore", message="You are using 'environment_factory'")
            trainer = GRPOTrainer(model=peft_model, reward_funcs=[reward], args=GRPOConfig(**args),
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  callbacks=[progress_callback(_staged(progress), stop)], tools=tools or None,
                                  environment_factory=_environment_factories(environments))
        sharding = sharded_training(trainer)
        if sharding:  # a launcher config that slipped past practice()'s check
            raise PracticeError(f"method=grpo does not run with {sharding}; use a DDP launcher "
                                "config or one process, or method=rft.")
        use_loraplus(trainer, cfg.lora_config)
        trainer.remove_callback(PrinterCallback)
        peft_model.train()
        trainer.train()
        if stop.is_set():
            raise KeyboardInterrupt
        peft_model.eval()
        adapter_dir = adapters.save(adapter_name, run_dir / "grpo-adapter", None, replace=True)
    except (KeyboardInterrupt, Exception) as e:
        peft_model.eval()
        adapters.discard(adapter_name, previous)
        if is_main_process():
            write_json_atomic(run_dir / "grpo-run.json", {"status": "interrupted" if isinstance(e, KeyboardInterrupt)
                                                          else "failed", "error": redact(repr(e))[:500]})
        if isinstance(e, KeyboardInterrupt):
            raise FineTuneInterrupted(f"GRPO stopped at step {trainer.state.global_step if trainer else 0}") from None
        if isinstance(e, ValueError) and "response" in str(e).lower():
            raise PracticeError(f"GRPO cannot read this model's tool calls ({e}); use method=rft.") from None
        raise
    seconds = time.perf_counter() - started
    adapters.add_trained(adapter_name, adapter_dir, previous, f"grpo {run_dir.name}")
    history = trainer.state.log_history
    rewards = gather_lists(rewards)  # under a launcher each process scored its own completions
    if is_main_process():
        write_json_atomic(run_dir / "grpo-run.json", {"status": "completed", "steps": trainer.state.global_step,
                                                      "seconds": round(seconds, 2), "log_history": history,
                                                      "processes": world_size()})
    tokens = int(sum(e.get("completions/mean_length", 0) * settings.k for e in history if "reward" in e))
    logger.info("GRPO in %.1f s (%d steps), mean reward %.2f.", seconds, trainer.state.global_step,
                sum(rewards) / len(rewards) if rewards else 0.0)
    return RoundLog(1, len(rewards), sum(r >= settings.accept for r in rewards), 0, len(tasks), len(rows), 0,
                    sum(rewards) / len(rewards) if rewards else 0.0, 0.0, seconds, tokens, adapter_name,
                    log_history=history)


def task_tools(tasks: list[Task], sampling: Sampling) -> tuple[list[Any], dict[str, list[Any]] | None]:
    """(tools for every task, None) when the tasks share one tool set; else ([], {tool set name: its functions}):
    trl then renders and runs each task's own tools (its `environment` column picks the set)."""
    sets = {_set_name(list(names)): tool_functions(sampling, list(names))
            for names in {tuple(sampling.tool_names(t)) for t in tasks}}
    distinct = {tuple(functions) for functions in sets.values()}  # sets that differ only by tools GRPO leaves out
    if len(distinct) == 1:
        return list(next(iter(distinct))), None
    return [], sets


def _set_name(names: list[str]) -> str:
    return "+".join(names) or "(no tools)"


def _environment_factories(environments: dict[str, list[Any]] | None) -> dict[str, Any] | None:
    """trl's per-example tool sets: an "environment" class per set whose methods are the set's functions (trl reads
    the tools from the class, and resets an instance before each rollout; these tools keep no state)."""
    if environments is None:
        return None
    factories = {}
    for name, functions in environments.items():
        members: dict[str, Any] = {f.__name__: staticmethod(f) for f in functions}
        factories[name] = type("PracticeTools", (), {"reset": _reset, **members})
    return factories


def _reset(self: Any, **_: Any) -> None:
    """The prompt stays as the task wrote it."""


def _staged(progress: Any) -> Any:
    if progress is None:
        return None
    return lambda info: progress({**info, "stage": "GRPO"})


def _tool_tokenizer(handle: Any, with_tools: bool) -> Any:
    """The tokenizer with the template the chat renders tools with, and its response parser (trl reads calls with
    it); SmolLM2's own template cannot render tools, so the chat's Hermes stand-in is used as the chat does."""
    import copy

    tokenizer = copy.copy(handle.tokenizer)
    fmt = handle.format
    if with_tools:
        if fmt.tool_template is None or fmt.response_template is None:
            raise PracticeError("This model's chat template cannot render or read tool calls, so GRPO cannot use "
                                "tools; use a model whose template supports tools, or practise without a toolkit.")
        tokenizer.chat_template = fmt.tool_template
        tokenizer.response_template = fmt.response_template
    return tokenizer


def _reply_and_calls(completion: Any) -> tuple[str, list[dict[str, Any]]]:
    """trl's completion (a text, or the assistant/tool messages of the tool loop) as (final reply text, calls)."""
    if isinstance(completion, str):
        return completion, []
    calls: list[dict[str, Any]] = []
    reply = ""
    results = [m for m in completion if m.get("role") == "tool"]
    for message in completion:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            result = str(results[len(calls)].get("content", "")) if len(calls) < len(results) else None
            calls.append({"name": function.get("name"), "arguments": json.dumps(function.get("arguments")),
                          "result": result, "ok": result is not None and not result.lower().startswith("error")})
        reply = str(message.get("content") or "")
    return reply, calls
