"""Practice: the agent improves from verified outcomes (rejection-sampling fine-tuning, RFT).

    tasks file -> k sampled attempts per task through a real AgentScope agent with its tools -> a verifier scores
    each attempt -> the accepted ones (at most `keep` distinct per task) train a new LoRA adapter by SFT ->
    `rounds` times, each round from the last adapter -> a before/after report on held-out tasks

Attempts run as many AgentScope `Agent`s at once (each with its own state) sharing one model, driven by
`asyncio.gather` with at most `batch` in flight: an engine that batches concurrent calls serves them together,
and today's engine serves them one at a time. Each attempt has its own sampling seed, derived from (round, task,
attempt), so a run repeats exactly.

This module uses agentscope directly (never `chat` or the root modules): the caller hands over the model (the
`HuggingFaceWrapper`, used through its methods) and a factory that builds one agent around a model view.
Verifier code named by the user is imported like the script's own tools; model output is never evaluated.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfmodel.common import (
    FineTuneConfigError,
    FineTuneInterrupted,
    UserError,
    closest,
    fsdp_requested,
    is_main_process,
    logger,
    rank,
    world_size,
    write_text_atomic,
)
from hfmodel.data import DatasetFormatError, load_chat_dataset, load_rows
from hfmodel.settings import merge_config, parse_overrides, split_assignment

Chat = list[dict[str, Any]]
Progress = Callable[[dict[str, Any]], None]
Verifier = Callable[[str, str, list[dict[str, Any]]], float]
AgentFactory = Callable[[Any, Any], Any]  # (a model view, the attempt's Toolkit or None) -> an AgentScope Agent

METHODS = ("rft", "grpo")


class PracticeError(UserError):
    """Practice cannot start as asked; the message names the problem and the fix."""


# =============================================================================================
# Settings


@dataclass
class PracticeSettings:
    """`/practice` and `practice()` settings (any other key=value goes to the fine-tune config)."""

    k: int = 4
    """Attempts sampled per task (GRPO: `num_generations`)."""
    rounds: int = 1
    """RFT: sample -> filter -> train this many times, each round from the last adapter."""
    method: str = "rft"
    """"rft" (train on the accepted attempts) or "grpo" (trl's GRPOTrainer, the verifier as reward)."""
    keep: int = 2
    """RFT: at most this many distinct accepted attempts per task become training rows."""
    temperature: float = 0.8
    """Sampling temperature of the attempts (the chat's own setting is used for pass@1 in the report)."""
    top_p: float | None = None
    """Nucleus sampling mass of the attempts; None = the model's setting."""
    batch: int = 16
    """Attempts in flight at once (an engine that batches concurrent calls generates them together)."""
    accept: float = 1.0
    """An attempt is accepted when its score is at least this."""
    verifier: str | None = None
    """`path/to/file.py:function` scoring `(prompt, reply_text, tool_calls) -> float in [0, 1]`; None = `answer`."""
    replay: bool = True
    """RFT: mix in as many rows of the configured data as accepted attempts (keeps what was learned)."""
    allow_tools: bool = False
    """Run tools that normally ask for permission without asking (otherwise such calls are refused)."""
    seed: int = 0
    """Base of the per-attempt sampling seeds."""
    eval_fraction: float = 0.1
    """Share of the tasks held out for the before/after report (needs >= 10 tasks; 0 = none)."""
    eval_data_path: str | None = None
    """A separate tasks file for the report (then every task of the tasks file is practised)."""

    def problems(self) -> list[str]:
        out = []
        for key in ("k", "rounds", "keep", "batch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{key} = {value!r}: must be a whole number >= 1")
        if self.method not in METHODS:
            out.append(f"method = {self.method!r}: must be rft or grpo")
        if self.method == "grpo" and isinstance(self.k, int) and self.k < 2:
            out.append("k must be >= 2 for method=grpo (rewards are compared within a group of k)")
        if not _number(self.temperature) or not 0 < self.temperature <= 5:
            out.append(f"temperature = {self.temperature!r}: must be a number in (0, 5]")
        if self.top_p is not None and (not _number(self.top_p) or not 0 < self.top_p <= 1):
            out.append(f"top_p = {self.top_p!r}: must be a number in (0, 1] (or null)")
        if not _number(self.accept) or not 0 < self.accept <= 1:
            out.append(f"accept = {self.accept!r}: must be a number in (0, 1]")
        if not _number(self.eval_fraction) or not 0 <= self.eval_fraction < 0.5:
            out.append(f"eval_fraction = {self.eval_fraction!r}: must be a number in [0, 0.5)")
        for key in ("replay", "allow_tools"):
            if not isinstance(getattr(self, key), bool):
                out.append(f"{key} = {getattr(self, key)!r}: must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            out.append(f"seed = {self.seed!r}: must be a whole number from 0 to {2**32 - 1}")
        if self.verifier is not None and not isinstance(self.verifier, str):
            out.append(f"verifier = {self.verifier!r}: must be path/to/file.py:function")
        return out


PRACTICE_KEYS = [f.name for f in PracticeSettings.__dataclass_fields__.values()]
# Defaults of the training step where they differ from a plain fine-tune (a trial on the demo: 12 steps, LoRA+ 8 and
# learning rate 5e-4 continuing from the demo adapter raised a set of story problems from 13/24 to 17/24).
RFT_TRAINING_ARGS = {"learning_rate": 5e-4, "max_steps": 12}
RFT_LORA = {"loraplus_lr_ratio": 8}
# GRPO steps are policy-gradient steps: at the learning rates above (SFT's), SmolLM2 with the demo adapter lost every
# tool call within 6 steps (measured at 1e-3 with LoRA+ 8). A plain LoRA at a GRPO learning rate instead.
GRPO_TRAINING_ARGS = {"learning_rate": 2e-5, "max_steps": 12}
GRPO_LORA: dict[str, Any] = {"loraplus_lr_ratio": None}
GRPO_SAFE_LEARNING_RATE = 1e-4  # above this GRPO warns (see above)


def sharding_requested() -> str | None:
    """The launcher's weight sharding (FSDP, DeepSpeed ZeRO-3) as accelerate passes it to its processes, or None."""
    if fsdp_requested():
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def method_defaults(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training_args, lora_config) defaults of the training step of `method`."""
    return (dict(GRPO_TRAINING_ARGS), dict(GRPO_LORA)) if method == "grpo" else (dict(RFT_TRAINING_ARGS),
                                                                                    dict(RFT_LORA))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_practice_args(pairs: list[str], base_config: dict[str, Any] | None = None
                        ) -> tuple[PracticeSettings, dict[str, Any]]:
    """`k=4 rounds=2 max_steps=20` -> (practice settings, the fine-tune config for the training step): practice keys
    are read here, every other key is a fine-tune setting (checked by the one `key=value` parser)."""
    practice: dict[str, Any] = {}
    rest: list[str] = []
    for pair in pairs:
        key, value = split_assignment(pair)
        if key in PRACTICE_KEYS:
            practice[key] = value
        else:
            rest.append(pair)
    try:
        overrides = parse_overrides(rest)
    except FineTuneConfigError as e:
        raise PracticeError(f"{e} Practice settings: {', '.join(PRACTICE_KEYS)}.") from None
    # The practice defaults replace the configured schedule (it was chosen for the configured data); typed keys win.
    settings = make_settings(practice)
    args, lora = method_defaults(settings.method)
    defaults = {"training_args": args, "lora_config": lora}
    return settings, merge_config(merge_config(base_config, defaults), overrides)


def make_settings(values: dict[str, Any] | PracticeSettings | None) -> PracticeSettings:
    if isinstance(values, PracticeSettings):
        settings = values
    else:
        values = dict(values or {})
        unknown = [key for key in values if key not in PRACTICE_KEYS]
        if unknown:
            raise PracticeError(f"Unknown practice setting '{unknown[0]}'{closest(unknown[0], PRACTICE_KEYS)}; valid: "
                                f"{', '.join(PRACTICE_KEYS)}.")
        settings = PracticeSettings(**values)
    problems = settings.problems()
    if problems:
        raise PracticeError("Invalid practice settings: " + "; ".join(problems) + ".")
    return settings


def training_config(fine_tune_config: dict[str, Any] | None, method: str = "rft") -> dict[str, Any]:
    """The fine-tune config of the training step: the method's defaults under the caller's settings; for RFT always
    SFT. Sampling is seeded, so practising again from the same adapter with the same settings gives the same rows:
    the fine-tune then reuses that earlier run's adapter, as any identical fine-tune does (`force_retrain=true`
    trains again)."""
    config = json.loads(json.dumps(fine_tune_config or {}))
    args_defaults, lora_defaults = method_defaults(method)
    args = {**args_defaults, **(config.get("training_args") or {})}
    lora = {**lora_defaults, **(config.get("lora_config") or {})}
    config.pop("data_path", None)
    config.pop("eval_data_path", None)  # it belongs to the configured data; the report scores held-out tasks
    return {**config, "training_args": args, "lora_config": lora, "method": "sft", "eval_fraction": 0.0}


# =============================================================================================
# Tasks


@dataclass
class Task:
    """One practice task: the prompt (the turns up to the user's last message) and what makes an outcome right."""

    messages: Chat
    answer: str | float | None = None
    plain: bool = False  # a prompt that needs no tool: only measured (a call is spurious), never practised
    tools: list[str] | None = None  # the agent's tools this task offers, by name; None = all of them, [] = none

    @property
    def prompt(self) -> str:
        return str(self.messages[-1]["content"])


@dataclass
class TaskSet:
    tasks: list[Task]
    source: str
    skipped: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        plain = sum(t.plain for t in self.tasks)
        text = f"{self.source}: {len(self.tasks) - plain} tasks" + (f" + {plain} plain prompts" if plain else "")
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values())} ({reasons})"
        return text


class _BadTask(Exception):
    """A row that cannot be a task; its message is the reason counted."""


def load_tasks(path: str, has_verifier: bool = False, tool_names: Collection[str] = ()) -> TaskSet:
    """Rows with `prompt` (text) or `messages` (ending on the user's turn), and `answer` (a number or a text) unless a
    verifier decides; `plain: true` marks a prompt that needs no tool; `tools` (optional) lists the agent's tools the
    task offers (`tool_names`: the agent's). Bad rows are skipped and counted."""
    raw = load_rows(path)
    return tasks_from_rows(raw, str(path), has_verifier, tool_names)


def tasks_from_rows(raw: list[Any], source: str, has_verifier: bool = False, tool_names: Collection[str] = ()
                    ) -> TaskSet:
    if not raw:
        raise DatasetFormatError(f"{source} has no rows; each task needs a prompt and an answer.")
    tasks, skipped = [], Counter[str]()
    for row in raw:
        try:
            tasks.append(_task(row, has_verifier, tool_names))
        except _BadTask as why:
            skipped[str(why)] += 1
    if not any(not t.plain for t in tasks):
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common()) or "only plain prompts"
        raise DatasetFormatError(f"{source}: no usable tasks ({reasons}). Each row needs `prompt` (text) or `messages` "
                                 "ending on a user turn, and `answer` (or name a verifier: verifier=file.py:function).")
    return TaskSet(tasks, source, skipped)


def _task(row: Any, has_verifier: bool, tool_names: Collection[str] = ()) -> Task:
    if not isinstance(row, dict):
        raise _BadTask("not an object")
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages: Chat = [{"role": "user", "content": row["prompt"].strip()}]
    elif row.get("messages") is not None:
        messages = _prompt_messages(row["messages"])
    else:
        raise _BadTask("without prompt or messages")
    plain = row.get("plain") is True
    answer = row.get("answer")
    if isinstance(answer, bool) or (answer is not None and not isinstance(answer, (int, float, str))):
        raise _BadTask("with an answer that is not a number or text")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise _BadTask("with an answer that is not finite")
    if isinstance(answer, str):
        answer = answer.strip() or None
    if answer is None and not has_verifier and not plain:
        raise _BadTask("without answer")
    return Task(messages, answer, plain, _task_tools(row.get("tools"), tool_names))


BAD_TOOLS = "with tools not a list of tool names or function schemas"


def _task_tools(value: Any, agent_tools: Collection[str]) -> list[str] | None:
    """A row's `tools` as tool names: no key (or null) = the agent's whole toolkit, [] = none. A schema counts by its
    name only: the schema offered is the agent's own, so what is trained matches what the chat renders."""
    if value is None:
        return None
    if isinstance(value, str):  # a CSV cell, or a column written as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _BadTask(BAD_TOOLS) from None
    if not isinstance(value, list):
        raise _BadTask(BAD_TOOLS)
    names: list[str] = []
    for item in value:
        name = _tool_name(item)
        if name is None:
            raise _BadTask(BAD_TOOLS)
        if name not in agent_tools:
            have = ", ".join(sorted(agent_tools)) or "it has none"
            raise _BadTask(f"naming the tool '{name[:60]}' the agent does not have (its tools: {have})")
        if name not in names:
            names.append(name)
    return names


def _tool_name(item: Any) -> str | None:
    """`"name"`, `{"name": ...}` or `{"type": "function", "function": {"name": ...}}` -> the name."""
    if isinstance(item, dict):
        function = item.get("function")
        item = function.get("name") if isinstance(function, dict) else item.get("name")
    return item if isinstance(item, str) and item.strip() else None


def check_task_tools(tasks: list[Task], tool_names: Collection[str]) -> None:
    """Tasks built in code (not loaded) name only the agent's tools."""
    unknown = sorted({n for t in tasks for n in t.tools or [] if n not in tool_names})
    if unknown:
        raise PracticeError(f"Tasks name tools the agent does not have: {', '.join(unknown)} (its tools: "
                            f"{', '.join(sorted(tool_names)) or 'none'}); give the agent those tools or leave them "
                            "out of the tasks' `tools`.")


def _prompt_messages(value: Any) -> Chat:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _BadTask("with broken JSON in messages") from None
    if not isinstance(value, list) or not value:
        raise _BadTask("with messages not a list")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise _BadTask("with a message that is not a user/assistant/system text")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise _BadTask("with messages not ending on a user turn")
    return out


def split_tasks(tasks: list[Task], settings: PracticeSettings, tool_names: Collection[str] = ()
                ) -> tuple[list[Task], list[Task]]:
    """(practised, held out): the eval file's tasks, else `eval_fraction` of the tasks (with >= 10), chosen by seed;
    plain prompts are only measured."""
    practice = [t for t in tasks if not t.plain]
    plain = [t for t in tasks if t.plain]
    if settings.eval_data_path:
        return practice, load_tasks(settings.eval_data_path, bool(settings.verifier), tool_names).tasks + plain
    n_eval = int(round(len(practice) * settings.eval_fraction)) if len(practice) >= 10 else 0
    order = sorted(range(len(practice)), key=lambda i: _digest(settings.seed, "split", i))
    held = set(order[:n_eval])
    return ([t for i, t in enumerate(practice) if i not in held],
            [t for i, t in enumerate(practice) if i in held] + plain)


def session_tasks(taught: list[tuple[str, str]], marked: list[tuple[Chat, str]]) -> list[Task]:
    """Tasks from this session: (question, taught answer) and (prompt turns, reply marked good). A reference with a
    number is checked by its last number, else the reply must contain it."""
    tasks, seen = [], set()
    for messages, reference in [([{"role": "user", "content": q}], a) for q, a in taught] + list(marked):
        key = json.dumps(messages)
        if key in seen or not reference.strip():
            continue
        seen.add(key)
        numbers = NUMBER.findall(reference)
        tasks.append(Task(messages, _to_number(numbers[-1]) if numbers else reference.strip()))
    return tasks


# =============================================================================================
# Verifiers


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _to_number(text: str) -> float:
    return float(text.replace(",", ""))


def normalise(text: str) -> str:
    """Case, accents, punctuation and spacing do not count."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^\w\s.-]", " ", text).replace(". ", " ").split()).strip(" .")


def answer_matches(answer: str | float, reply: str) -> bool:
    """The default verifier: a numeric answer equals the reply's last number within a relative 1e-6; a text answer is
    contained in the normalised reply."""
    number = answer if isinstance(answer, (int, float)) else None
    if isinstance(answer, str) and re.fullmatch(r"\s*-?[\d,]*\.?\d+(?:[eE][-+]?\d+)?\s*", answer):
        number = _to_number(answer.strip())
    if number is not None:
        found = NUMBER.findall(reply)
        if not found:
            return False
        try:
            last = _to_number(found[-1].rstrip("."))
        except ValueError:
            return False
        return math.isclose(last, float(number), rel_tol=1e-6, abs_tol=1e-9)
    wanted = normalise(str(answer))
    return bool(wanted) and wanted in normalise(reply)


def load_verifier(spec: str, base: Path | None = None) -> Verifier:
    """`path/to/file.py:function` -> the function (the file is imported like the script's own tools)."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise PracticeError(f"verifier={spec!r}: give path/to/file.py:function (e.g. verifier=checks.py:score).")
    path = Path(path_text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise PracticeError(f"verifier={spec!r}: {path} is not a file; give path/to/file.py:function.")
    module_spec = importlib.util.spec_from_file_location(f"practice_verifier_{_digest(0, str(path.resolve()))}", path)
    if module_spec is None or module_spec.loader is None:
        raise PracticeError(f"verifier={spec!r}: {path} cannot be imported as Python; give a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # the user's own code, trusted like the script's tools
    except SyntaxError as e:
        raise PracticeError(f"verifier={spec!r}: {path} has a syntax error (line {e.lineno}): {e.msg}.") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise PracticeError(f"verifier={spec!r}: {path} has no function {name!r}{closest(name, found)} "
                            f"(functions: {', '.join(found) or 'none'}).")
    return function


class Scorer:
    """Scores attempts: the verifier (or the default answer check) clamped to [0, 1]; a verifier that raises or returns
    no number scores 0 and is reported once."""

    def __init__(self, verifier: Verifier | None) -> None:
        self.verifier = verifier
        self.reported: set[str] = set()
        self.failures = 0

    def __call__(self, task: Task, reply: str, calls: list[dict[str, Any]]) -> float:
        if self.verifier is None:
            return 1.0 if task.answer is not None and answer_matches(task.answer, reply) else 0.0
        try:
            value = self.verifier(task.prompt, reply, calls)
        except Exception as e:  # noqa: BLE001 - user code: any failure scores 0, reported once per kind
            self._report(f"raised {type(e).__name__}: {e}")
            return 0.0
        if not _number(value):
            self._report(f"returned {value!r}, not a number in [0, 1]")
            return 0.0
        return min(1.0, max(0.0, float(value)))

    def _report(self, what: str) -> None:
        self.failures += 1
        key = what.split(":", 1)[0]
        if key not in self.reported:
            self.reported.add(key)
            logger.warning("The verifier %s; such attempts score 0 (reported once).", what[:300])


# =============================================================================================
# Rollouts


@dataclass
class Attempt:
    """One sampled attempt: the conversation as training rows, what it called, its reply and score."""

    task: int
    attempt: int
    seed: int
    messages: Chat  # system prompt, prompt turns, calls, results, final reply (training format)
    reply: str
    calls: list[dict[str, Any]]
    tokens: int
    score: float = 0.0
    cut: bool = False
    unread: bool = False
    error: str | None = None
    tools: list[dict] | None = None
    rank: int = 0  # the process that sampled it (under a launcher the attempts are split across processes)

    @property
    def valid_call(self) -> bool:
        """A call the agent ran with a result that is no error (a call that could not be read is none)."""
        return any(c.get("ok") for c in self.calls)

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"messages": self.messages}
        return {**row, "tools": self.tools} if self.tools else row


def attempt_seed(base: int, *parts: Any) -> int:
    return _digest(base, *parts) % (2**32)


def _digest(base: int, *parts: Any) -> int:
    return int(hashlib.sha256(json.dumps([base, *parts]).encode()).hexdigest()[:12], 16)


def model_view(model: Any, **settings: Any) -> Any:
    """The model with its own generation settings (the weights, engine and adapters are shared): each attempt samples
    with its own seed while the chat's settings stay as they are."""
    view = copy.copy(model)
    view.parameters = model.parameters.model_copy(update=settings)
    view.stream = False
    view.unread_calls = 0
    return view


async def run_attempt(agent: Any, task: Task, allow_tools: bool, limit: int, system_prompt: str | None,
                      tools: list[dict] | None) -> tuple[Chat, str, list[dict[str, Any]], int, bool]:
    """One attempt through the agent loop: (training messages, final reply text, calls, tokens sampled, cut)."""
    from agentscope.event import ConfirmResult, ModelCallEndEvent, RequireUserConfirmEvent, UserConfirmResultEvent
    from agentscope.message import AssistantMsg, UserMsg

    from hfmodel.replies import chat_messages, result_text

    for m in task.messages[:-1]:
        if m["role"] == "user":
            agent.state.context.append(UserMsg(name="user", content=m["content"]))
        elif m["role"] == "assistant":
            agent.state.context.append(AssistantMsg(name=agent.name, content=m["content"]))
    start = len(agent.state.context)
    inputs: Any = UserMsg(name="user", content=task.prompt)
    tokens, cut = 0, False
    while inputs is not None:
        current, inputs, pending = inputs, None, None
        async for event in agent.reply_stream(current):
            if isinstance(event, ModelCallEndEvent):
                tokens += event.output_tokens
                cut = cut or event.output_tokens >= limit
            elif isinstance(event, RequireUserConfirmEvent):
                pending = event
        if pending is not None:
            inputs = UserConfirmResultEvent(reply_id=pending.reply_id, confirm_results=[
                ConfirmResult(confirmed=allow_tools, tool_call=call) for call in pending.tool_calls])
    context = agent.state.context
    calls: dict[str, dict[str, Any]] = {}
    for message in context[start:]:
        for block in message.get_content_blocks():
            if block.type == "tool_call":
                calls[block.id] = {"name": block.name, "arguments": block.input, "result": None, "ok": False}
            elif block.type == "tool_result" and block.id in calls:
                text = result_text(block)
                calls[block.id].update(result=text, ok=str(getattr(block.state, "value", block.state)) not in (
                    "error", "denied") and not text.lstrip().lower().startswith("error"))
    last = next((m for m in reversed(context[start:]) if m.role == "assistant"), None)
    reply = (last.get_text_content() or "") if last is not None else ""
    messages = await chat_messages(list(context))
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, reply, list(calls.values()), tokens, cut


@dataclass
class Sampling:
    """How attempts are sampled: the agent factory, tool schemas, system prompt and the attempt's settings."""

    factory: AgentFactory
    system_prompt: str | None
    tools: list[dict] | None  # the schemas of the agent's whole toolkit
    allow_tools: bool
    batch: int
    toolkit: Any = None  # the agent's AgentScope Toolkit (GRPO hands its functions to trl)
    _subsets: dict[tuple[str, ...], tuple[Any, list[dict] | None]] = field(default_factory=dict, repr=False)

    def tool_names(self, task: Task) -> list[str]:
        """The names of the tools `task` offers, in the toolkit's order (the order the chat renders them in)."""
        every = [s["function"]["name"] for s in self.tools or []]
        return every if task.tools is None else [n for n in every if n in task.tools]

    async def for_task(self, task: Task) -> tuple[Any, list[dict] | None]:
        """(Toolkit, schemas) of one attempt at `task`: the agent's whole toolkit, a Toolkit of just the task's tools
        (the same tool objects, so permissions and read-only flags stay), or (None, None) for no tools."""
        if task.tools is None:
            return self.toolkit, self.tools
        key = tuple(self.tool_names(task))
        if not key:
            return None, None
        if key not in self._subsets:
            from agentscope.tool import Toolkit

            subset = Toolkit(tools=[await self.toolkit.get_tool(name) for name in key])
            self._subsets[key] = (subset, await subset.get_tool_schemas() or None)
        return self._subsets[key]


async def sample(model: Any, sampling: Sampling, tasks: list[Task], k: int, settings_of: Callable[[int, int], dict],
                 scorer: Scorer, progress: Progress | None = None, stop: threading.Event | None = None,
                 stage: str = "sampling") -> list[Attempt]:
    """`k` attempts for every task, at most `sampling.batch` at once; `settings_of(task, attempt)` gives each
    attempt's generation settings (its seed among them). Under a launcher each process samples every n-th attempt
    and all of them get every attempt back (in task, attempt order)."""
    from hfmodel.distributed import gather_lists

    gate = asyncio.Semaphore(sampling.batch)
    done = Counter[int]()
    finished = {"tasks": 0, "accepted": 0}

    async def one(t: int, a: int) -> Attempt:
        async with gate:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            settings = settings_of(t, a)
            view = model_view(model, **settings)
            toolkit, tools = await sampling.for_task(tasks[t])
            agent = sampling.factory(view, toolkit)
            limit = view.parameters.max_length
            try:
                messages, reply, calls, tokens, cut = await run_attempt(agent, tasks[t], sampling.allow_tools, limit,
                                                                        sampling.system_prompt, tools)
                attempt = Attempt(t, a, int(settings.get("seed") or 0), messages, reply, calls, tokens, cut=cut,
                                  unread=view.unread_calls > 0, tools=tools, rank=rank())
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - a failed attempt scores 0 and the run goes on
                logger.warning("An attempt failed (%s: %s); it scores 0.", type(e).__name__, str(e)[:200])
                attempt = Attempt(t, a, int(settings.get("seed") or 0), [], "", [], 0, error=repr(e)[:300],
                                  rank=rank())
        if attempt.error is None and not attempt.cut and not attempt.unread and not tasks[t].plain:
            attempt.score = scorer(tasks[t], attempt.reply, attempt.calls)
        done[t] += 1
        finished["accepted"] += attempt.score >= 1.0
        if done[t] == k:
            finished["tasks"] += 1
        if progress:
            progress({"stage": stage, "tasks_done": finished["tasks"], "tasks": len(tasks),
                      "accepted": finished["accepted"], "attempts": sum(done.values())})
        return attempt

    pairs = [(t, a) for t in range(len(tasks)) for a in range(k)]
    jobs = [one(t, a) for i, (t, a) in enumerate(pairs) if i % world_size() == rank()]
    mine = list(await asyncio.gather(*jobs))
    return sorted(gather_lists(mine), key=lambda x: (x.task, x.attempt))


# =============================================================================================
# RFT


def select_rows(attempts: list[Attempt], keep: int, accept: float) -> list[dict[str, Any]]:
    """The accepted attempts as training rows: at most `keep` distinct ones per task (distinct by what the model
    wrote and the tools returned), best score first, then in attempt order."""
    rows, per_task = [], Counter[int]()
    seen: set[str] = set()
    for attempt in sorted(attempts, key=lambda a: (a.task, -a.score, a.attempt)):
        if attempt.score < accept or per_task[attempt.task] >= keep or not attempt.messages:
            continue
        key = json.dumps([attempt.task, attempt.messages], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        per_task[attempt.task] += 1
        rows.append(attempt.row())
    return rows


def replay_rows(data_path: str | None, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows of the configured data (as training rows), chosen by seed; none without data."""
    if not data_path or n <= 0:
        return []
    from hfmodel.training import dataset_row

    rows = [dataset_row(r) for r in load_chat_dataset(data_path).rows]
    order = sorted(range(len(rows)), key=lambda i: _digest(seed, "replay", i))
    return [rows[i] for i in order[:n]]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# =============================================================================================
# Evaluation


@dataclass
class Scores:
    """How one adapter does on the held-out tasks."""

    pass1_chat: float | None = None  # one attempt with the chat's own settings
    pass1_greedy: float | None = None
    pass_k: float | None = None  # at least one of k sampled attempts accepted
    mean_reward: float | None = None  # over the k sampled attempts
    valid_calls: float | None = None  # share of the k sampled attempts with a valid tool call
    spurious: tuple[int, int] | None = None  # plain prompts that made a call (greedy), of how many
    greedy_replies: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def attempt_text(attempt: Attempt) -> str:
    """An attempt as the chat shows it: its calls as `-> name(arguments) = result` lines, then the reply."""
    lines = [f"-> {c['name']}({c['arguments']}) = {' '.join(str(c['result'] or '').split())[:120]}"
             for c in attempt.calls]
    return "\n".join([*lines, attempt.reply.strip() or ("(error)" if attempt.error else "(empty)")])


async def evaluate(model: Any, sampling: Sampling, tasks: list[Task], settings: PracticeSettings, scorer: Scorer,
                   progress: Progress | None, stop: threading.Event | None, label: str) -> Scores:
    """pass@1 (chat settings and greedy), pass@k, mean reward and valid calls on `tasks`; spurious calls on the plain
    prompts among them."""
    started = time.perf_counter()
    scored = [t for t in tasks if not t.plain]
    plain = [t for t in tasks if t.plain]
    chat = model.parameters

    def fixed(**update: Any) -> Callable[[int, int], dict]:
        return lambda t, a: update

    stage = f"evaluating {label}"
    greedy = await sample(model, sampling, scored + plain, 1, fixed(do_sample=False), scorer, progress, stop, stage)
    out = Scores(tokens=sum(a.tokens for a in greedy))
    if scored:
        chat_runs = await sample(model, sampling, scored, 1, fixed(), scorer, progress, stop, stage)
        runs = await sample(model, sampling, scored, settings.k, _sampled(chat, settings, "eval"), scorer, progress,
                            stop, stage)
        accepted = {a.task for a in runs if a.score >= settings.accept}
        out.pass1_chat = _share(a.score >= settings.accept for a in chat_runs)
        out.pass1_greedy = _share(a.score >= settings.accept for a in greedy[:len(scored)])
        out.pass_k = len(accepted) / len(scored)
        out.mean_reward = sum(a.score for a in runs) / len(runs)
        out.valid_calls = _share(a.valid_call for a in runs)
        out.tokens += sum(a.tokens for a in chat_runs + runs)
    if plain:
        out.spurious = (sum(bool(a.calls) for a in greedy[len(scored):]), len(plain))
    out.greedy_replies = [attempt_text(a) for a in greedy]
    out.seconds = time.perf_counter() - started
    return out


def _share(flags: Any) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else 0.0


def _sampled(chat: Any, settings: PracticeSettings, stage: Any) -> Callable[[int, int], dict]:
    top_p = settings.top_p if settings.top_p is not None else chat.top_p

    def of(t: int, a: int) -> dict:
        return {"do_sample": True, "temperature": settings.temperature, "top_p": top_p,
                "seed": attempt_seed(settings.seed, stage, t, a)}

    return of


# =============================================================================================
# The run


@dataclass
class RoundLog:
    round: int
    attempts: int
    accepted: int
    solved: int  # tasks with at least one accepted attempt
    tasks: int
    rows: int  # accepted distinct rows trained on
    replayed: int
    mean_reward: float
    sampling_seconds: float
    training_seconds: float
    tokens: int
    adapter: str | None
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    valid_calls: float = 0.0


@dataclass
class PracticeResult:
    """What one practice run did."""

    run_dir: Path
    method: str
    settings: PracticeSettings
    tasks: TaskSet
    held_out: list[Task]
    before_adapter: str | None
    adapter: str | None  # serving afterwards
    rounds: list[RoundLog]
    before: Scores | None
    after: Scores | None
    verifier_failures: int = 0

    @property
    def sampling_seconds(self) -> float:
        return sum(r.sampling_seconds for r in self.rounds)

    @property
    def training_seconds(self) -> float:
        return sum(r.training_seconds for r in self.rounds)

    @property
    def tokens_per_second(self) -> float:
        tokens = sum(r.tokens for r in self.rounds)
        return tokens / self.sampling_seconds if self.sampling_seconds else 0.0


def practice(model: Any, tasks: str | list[Task] | TaskSet, settings: PracticeSettings,
             fine_tune_config: dict[str, Any] | None, factory: AgentFactory, tools: list[dict] | None,
             system_prompt: str | None, data_path: str | None = None, progress: Progress | None = None,
             stop: threading.Event | None = None, base_dir: Path | None = None, toolkit: Any = None
             ) -> PracticeResult:
    """The whole run (see the module docstring); `model` is the `HuggingFaceWrapper`. On Ctrl-C or a failure the
    adapter that served before keeps serving (the adapters of finished rounds stay listed)."""
    stop = stop or threading.Event()
    verifier = load_verifier(settings.verifier) if settings.verifier else None
    names = [s["function"]["name"] for s in tools or []]
    task_set = tasks if isinstance(tasks, TaskSet) else \
        load_tasks(tasks, verifier is not None, names) if isinstance(tasks, str) else TaskSet(list(tasks), "session")
    check_task_tools(task_set.tasks, names)
    logger.info("Practice tasks: %s", task_set.describe())
    train_tasks, held_out = split_tasks(task_set.tasks, settings, names)
    if not train_tasks:
        raise PracticeError(f"{task_set.source}: no tasks left to practise after holding out {len(held_out)}.")
    config = training_config(fine_tune_config, settings.method)
    from hfmodel.training import shared_run_dir

    sharding = sharding_requested() if settings.method == "grpo" and world_size() > 1 else None
    if sharding:
        raise PracticeError(f"method=grpo does not run with {sharding} (the weights split across "
                            "processes); launch it with a DDP config (configs/accelerate/multi_gpu_ddp.yaml, or "
                            "cpu_2proc.yaml) or in one process, or use method=rft.")
    output = Path((config.get("training_args") or {}).get("output_dir") or base_dir or "runs").expanduser()
    run_dir = shared_run_dir(output, f"{str(model.model).rstrip('/')}-practice")
    config["training_args"]["output_dir"] = str(output)
    sampling = Sampling(factory, system_prompt, tools, settings.allow_tools, settings.batch, toolkit)
    scorer = Scorer(verifier)
    before_adapter = model.active_adapter
    result = PracticeResult(run_dir, settings.method, settings, task_set, held_out, before_adapter, before_adapter,
                            [], None, None)
    if is_main_process():
        write_jsonl(run_dir / "rollouts.jsonl", [])
    try:
        if held_out:
            result.before = asyncio.run(evaluate(model, sampling, held_out, settings, scorer, progress, stop,
                                                 "before"))
        if settings.method == "grpo":
            from hfmodel.practice_grpo import grpo_round

            result.rounds.append(grpo_round(model, train_tasks, settings, config, scorer, sampling, run_dir,
                                            progress, stop))
        else:
            for n in range(1, settings.rounds + 1):
                result.rounds.append(_rft_round(model, n, train_tasks, settings, config, scorer, sampling, run_dir,
                                                data_path, progress, stop))
        result.adapter = model.active_adapter
        if held_out:
            result.after = asyncio.run(evaluate(model, sampling, held_out, settings, scorer, progress, stop,
                                                "after"))
    except (KeyboardInterrupt, FineTuneInterrupted) as e:
        model.use_adapter(before_adapter)
        done = len(result.rounds)
        raise FineTuneInterrupted(f"Practice stopped (round {done + 1 if done < settings.rounds else done}); still "
                                  f"serving {before_adapter or 'the base model'}. Attempts so far: "
                                  f"{run_dir / 'rollouts.jsonl'}." + (f" ({e})" if str(e) else "")) from None
    except BaseException:
        model.use_adapter(before_adapter)
        raise
    result.verifier_failures = scorer.failures
    return result


def _rft_round(model: Any, n: int, tasks: list[Task], settings: PracticeSettings, config: dict[str, Any],
               scorer: Scorer, sampling: Sampling, run_dir: Path, data_path: str | None, progress: Progress | None,
               stop: threading.Event) -> RoundLog:
    """Sample -> score -> keep the accepted attempts -> SFT a new adapter on them (from the serving one)."""
    started = time.perf_counter()
    attempts = asyncio.run(sample(model, sampling, tasks, settings.k, _sampled(model.parameters, settings, n), scorer,
                                  progress, stop, f"round {n}: sampling"))
    sampling_seconds = time.perf_counter() - started
    _append_rollouts(run_dir, n, tasks, attempts)
    rows = select_rows(attempts, settings.keep, settings.accept)
    log = RoundLog(n, len(attempts), sum(a.score >= settings.accept for a in attempts),
                   len({a.task for a in attempts if a.score >= settings.accept}), len(tasks), len(rows), 0,
                   sum(a.score for a in attempts) / len(attempts), sampling_seconds, 0.0,
                   sum(a.tokens for a in attempts), model.active_adapter,
                   valid_calls=_share(a.valid_call for a in attempts))
    if not rows:
        logger.warning("Round %d: no attempt was accepted, so there is nothing to train on; the adapter stays.", n)
        return log
    replayed = replay_rows(data_path, len(rows), settings.seed + n) if settings.replay else []
    log.replayed = len(replayed)
    from hfmodel.distributed import from_main_process

    # Every process trains on the same file: the main process writes it, the others wait for its path.
    train_file = from_main_process(lambda: str(write_jsonl(run_dir / f"round{n}-train.jsonl", rows + replayed)))
    if stop.is_set():
        raise KeyboardInterrupt

    def training_progress(info: dict[str, Any]) -> None:
        if progress:
            progress({**info, "stage": f"round {n}: training"})

    trained = model.fine_tune(str(train_file), config, progress=training_progress, stop=stop)
    log.training_seconds, log.adapter, log.log_history = trained.seconds, trained.adapter_name, trained.log_history
    return log


def _append_rollouts(run_dir: Path, round_: int, tasks: list[Task], attempts: list[Attempt]) -> None:
    if not is_main_process():
        return
    path = run_dir / "rollouts.jsonl"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    new = "".join(json.dumps({**a.row(), "round": round_, "task": a.task, "attempt": a.attempt, "seed": a.seed,
                              "prompt": tasks[a.task].prompt, "answer": tasks[a.task].answer, "score": a.score,
                              "reply": a.reply, "cut": a.cut, "unread_call": a.unread, "error": a.error,
                              "rank": a.rank},
                             ensure_ascii=False) + "\n" for a in attempts)
    write_text_atomic(path, old + new)


# =============================================================================================
# Report


def summary_rows(result: PracticeResult) -> list[tuple[str, str, str]]:
    """(metric, before, after) for the terminal table and report.md."""
    before, after = result.before, result.after

    def pct(s: Scores | None, name: str) -> str:
        value = getattr(s, name) if s else None
        return "-" if value is None else f"{value:.0%}" if name != "mean_reward" else f"{value:.2f}"

    def spurious(s: Scores | None) -> str:
        return "-" if s is None or s.spurious is None else f"{s.spurious[0]}/{s.spurious[1]}"

    n = len([t for t in result.held_out if not t.plain])
    rows = [] if before is None else [
        (f"pass@1, chat settings ({n} held-out tasks)", pct(before, "pass1_chat"), pct(after, "pass1_chat")),
        ("pass@1, greedy", pct(before, "pass1_greedy"), pct(after, "pass1_greedy")),
        (f"pass@{result.settings.k} (temperature {result.settings.temperature})", pct(before, "pass_k"),
         pct(after, "pass_k")),
        ("mean reward", pct(before, "mean_reward"), pct(after, "mean_reward")),
        ("attempts with a valid tool call", pct(before, "valid_calls"), pct(after, "valid_calls")),
        ("plain prompts with a spurious call (greedy)", spurious(before), spurious(after)),
    ]
    for r in result.rounds:
        if result.method == "grpo":  # trl sampled the attempts: rewards per completion, no per-task filter
            rows.append(("GRPO: completions accepted", "", f"{r.accepted}/{r.attempts} (mean reward "
                         f"{r.mean_reward:.2f}; {r.tasks} practice prompts)"))
            continue
        rows.append((f"round {r.round}: accepted attempts", "", f"{r.accepted}/{r.attempts} "
                     f"({r.solved}/{r.tasks} tasks solved at least once)"))
        rows.append((f"round {r.round}: rows trained", "", f"{r.rows} accepted + {r.replayed} replayed"))
    sampled = sum(r.tokens for r in result.rounds)
    rows.append(("sampling time", "", f"in training (trl sampled about {sampled} tokens)" if result.method == "grpo"
                 else f"{result.sampling_seconds:.1f} s ({sampled} tokens, {result.tokens_per_second:.1f} tokens/s)"))
    rows += [
        ("training time", "", f"{result.training_seconds:.1f} s"),
        ("evaluation time", "", f"{(before.seconds if before else 0) + (after.seconds if after else 0):.1f} s"),
    ]
    if result.verifier_failures:
        rows.append(("verifier failures (scored 0)", "", str(result.verifier_failures)))
    return rows


def probes(result: PracticeResult, n: int = 4) -> list[tuple[str, str, str]]:
    """(prompt, greedy before, greedy after) for the first held-out tasks and plain prompts."""
    if result.before is None or result.after is None:
        return []
    scored = [t for t in result.held_out if not t.plain]
    plain = [t for t in result.held_out if t.plain]
    order = scored[: n - min(2, len(plain))] + plain[:2]
    everyone = scored + plain
    return [(t.prompt, result.before.greedy_replies[everyone.index(t)], result.after.greedy_replies[everyone.index(t)])
            for t in order]


def plot(result: PracticeResult, path: Path) -> Path | None:
    """Train loss over the rounds' steps, and the mean reward / accepted share per round (GRPO: per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, rewards, offset = [], [], 0
    for r in result.rounds:
        steps = [(offset + int(e["step"]), float(e["loss"])) for e in r.log_history if "loss" in e and "step" in e]
        rewards += [(offset + int(e["step"]), float(e["reward"])) for e in r.log_history if "reward" in e]
        losses += steps
        offset = max([s for s, _ in steps], default=offset)
    if not losses and not result.rounds:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(7, 7), dpi=110)
    if losses:
        axes[0].plot(*zip(*losses, strict=True), color="#d9480f", linewidth=1.8, label="train loss")
        axes[0].legend()
    axes[0].set_xlabel("optimiser step (all rounds)")
    axes[0].set_ylabel("loss")
    axes[0].set_title(f"{result.run_dir.name}: {result.method.upper()}", fontsize=10)
    axes[0].grid(alpha=0.3)
    if rewards:
        axes[1].plot(*zip(*rewards, strict=True), color="#2f9e44", linewidth=1.6, label="mean reward (GRPO batches)")
        axes[1].set_xlabel("optimiser step")
    else:
        rounds = [r.round for r in result.rounds]
        axes[1].plot(rounds, [r.mean_reward for r in result.rounds], marker="o", color="#2f9e44",
                     label="mean reward of the round's attempts")
        axes[1].plot(rounds, [r.solved / r.tasks if r.tasks else 0 for r in result.rounds], marker="s",
                     color="#1971c2", label="tasks solved at least once")
        axes[1].set_xlabel("round")
        axes[1].set_xticks(rounds)
    for label, scores, style in (("held out, before", result.before, "--"), ("held out, after", result.after, ":")):
        if scores is not None and scores.mean_reward is not None:
            axes[1].axhline(scores.mean_reward, linestyle=style, color="#868e96", label=f"mean reward {label}")
    axes[1].set_ylabel("reward")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_report(result: PracticeResult) -> Path:
    """report.md + loss.png in the practice run folder."""
    picture = plot(result, result.run_dir / "loss.png")
    before, after = result.before_adapter or "base", result.adapter or "base"
    lines = [f"# Practice report: {result.run_dir.name}", "",
             f"Method {result.method.upper()} on {result.tasks.describe()}; {len(result.held_out)} held out. "
             f"Attempts: `rollouts.jsonl`.", "",
             f"| metric | before ({before}) | after ({after}) |", "|---|---|---|",
             *[f"| {m} | {b} | {a} |" for m, b, a in summary_rows(result)], ""]
    side = probes(result)
    if side:
        lines += ["## Probes (greedy, before and after)", ""]
        for prompt, b, a in side:
            lines += [f"**{prompt}**", "", f"- before: {' / '.join(b.splitlines())}",
                      f"- after: {' / '.join(a.splitlines())}", ""]
    if picture:
        lines += ["![loss and reward](loss.png)", ""]
    return write_text_atomic(result.run_dir / "report.md", "\n".join(lines))


def agent_factory(name: str, system_prompt: str | None, max_iters: int = 5) -> AgentFactory:
    """Builds one plain AgentScope `Agent` per attempt around a model view and the attempt's toolkit, configured as
    the chat's agent is (round limit, no runtime reminder in the history, no summarising, no retries)."""
    from agentscope.agent import Agent, ContextConfig, InjectionConfig, ModelConfig, ReActConfig

    def build(view: Any, toolkit: Any) -> Any:
        return Agent(name=name, system_prompt=system_prompt or "", model=view, toolkit=toolkit,
                     react_config=ReActConfig(max_iters=max_iters),
                     injection_config=InjectionConfig(inject_runtime_state=False),
                     context_config=ContextConfig(compression_tool_enabled=False),
                     model_config=ModelConfig(max_retries=0))

    return build


def tool_schemas(toolkit: Any) -> list[dict] | None:
    """The JSON schemas the agent offers (they go into the training rows, as the chat renders them)."""
    if toolkit is None:
        return None
    return asyncio.run(toolkit.get_tool_schemas()) or None
