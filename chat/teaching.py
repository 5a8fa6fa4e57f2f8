"""What the chat learns from: taught answers (`/teach`), taught tool calls (`/teach call`), `/good` and `/bad`
marks, and `/train` on them (SFT, or DPO/ORPO/KTO on the taught pairs); plus the text helpers the chat modules share.

`TeachingCommands` is a part of `ChatSession` (chat_commands.py): the commands here use its model, agent, config and
printing; keeping them apart keeps each file to one kind of work.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentscope.message import AssistantMsg
from rich.text import Text

from chat.startup import plain  # noqa: F401 - the chat modules import it from here too
from hfmodel.common import UserError, create_exclusive, safe_text, write_text_atomic
from hfmodel.data import DatasetFormatError
from hfmodel.preference_data import Marked, Pair, PreferenceDataset, load_preference_dataset, preference_mix
from hfmodel.settings import METHODS, parse_overrides, split_assignment
from hfmodel.tool_schema import call_problem
from hfmodel.training import taught_mix

if TYPE_CHECKING:
    from chat.session_log import SessionLog
    from finetune_dialogagent import Finetune_DialogAgent
    from huggingface_model import FineTuneResult


def cell(text: str) -> Text:
    """Data or model text for a table cell or title: as typed (no markup), control characters stripped."""
    return Text(safe_text(text))


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class CommandError(UserError):
    """A command used the wrong way; the message shows the right way."""


TRAIN_REPEATS = 8  # minimum repeats of each taught example (more when replayed data would outweigh them)
SFT_SCHEDULE = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "warmup_steps", "lr_scheduler_type")  # not inherited by /train method=dpo


@dataclass
class Taught:
    prompt: str
    answer: str
    rejected: str | None = None  # the reply /teach replaced (None: the reply was kept); DPO's rejected answer
    call: dict[str, Any] | None = None  # /teach call: the tool call to make instead ({"name", "arguments"})
    tools: list[dict] | None = None  # the tool schemas the agent offered when this was taught
    steps: list[dict[str, Any]] | None = None  # a kept reply that called tools: its calls, results and answer

    @property
    def uses_tools(self) -> bool:
        """A call is part of the taught answer (trained as SFT with its tools; the preference rows carry none)."""
        return self.call is not None or bool(self.steps)


class TeachingCommands:
    """`/teach`, `/train`, `/good`, `/bad` (mixed into `ChatSession`, which provides what is declared here)."""

    assistant: Finetune_DialogAgent
    base_config: dict[str, Any]
    raw_arguments: str
    session_stamp: str
    taught: list[Taught]
    taught_path: Path | None
    marks: list[Marked]
    loop: asyncio.AbstractEventLoop
    session_log: SessionLog | None

    if TYPE_CHECKING:
        def print(self, *renderables: Any) -> None: ...
        def _output_dir(self) -> Path: ...
        def _tool_schemas(self) -> list[dict] | None: ...
        def _log_problem(self, problem: str | None) -> bool: ...
        def _config_with(self, pairs: list[str], own_data: bool = False) -> dict[str, Any]: ...
        def _fine_tune(self, data_path: str | None, config: dict[str, Any], probe_count: int = 4
                       ) -> FineTuneResult: ...

    def _last_turn(self) -> tuple[int, str, int | None]:
        """Index and text of the last user message, and the index of the reply after it (if any)."""
        context = self.assistant.state.context
        for i in range(len(context) - 1, -1, -1):
            if context[i].role == "user":
                reply = next((j for j in range(i + 1, len(context)) if context[j].role == "assistant"), None)
                return i, context[i].get_text_content() or "", reply
        raise CommandError("Nothing to teach yet: ask the assistant something first.")

    def _taught_file(self) -> Path:
        """This session's own file (a unique id after the stamp: sessions of the same second never share one)."""
        if self.taught_path is None:
            self.taught_path = create_exclusive(self._output_dir(), f"taught-{self.session_stamp}-", ".jsonl")
        return self.taught_path

    def _save_taught(self) -> Path:
        path = self._taught_file()
        return write_text_atomic(path, _jsonl([self._taught_row(t) for t in self.taught]))

    @staticmethod
    def _taught_row(taught: Taught) -> dict[str, Any]:
        if taught.steps:
            answer: list[dict[str, Any]] = taught.steps
        elif taught.call is None:
            answer = [{"role": "assistant", "content": taught.answer}]
        else:
            answer = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": taught.call}]}]
        row: dict[str, Any] = {"messages": [{"role": "user", "content": taught.prompt}, *answer]}
        return {**row, "tools": taught.tools} if taught.tools else row

    def _called_tools(self, reply_index: int) -> bool:
        return any(b.type == "tool_call" for b in self.assistant.state.context[reply_index].get_content_blocks())

    def _reply_steps(self, reply_index: int) -> list[dict[str, Any]] | None:
        """The reply's tool calls, their results and its answer as training messages (None: it called no tool)."""
        if not self._called_tools(reply_index):
            return None
        from hfmodel.replies import chat_messages

        return self.loop.run_until_complete(chat_messages([self.assistant.state.context[reply_index]]))

    def cmd_teach(self, args: list[str]) -> None:
        if args[:1] == ["call"]:
            self._teach_call(args[1:])
            return
        user_index, prompt, reply_index = self._last_turn()
        context = self.assistant.state.context
        answer = " ".join(args)
        rejected, steps = None, None
        if answer:
            corrected = AssistantMsg(name=self.assistant.name, content=answer)
            if reply_index is None:
                context.append(corrected)
            else:
                # A replaced reply that called tools is no DPO rejected answer: the pairs carry no tools.
                if not self._called_tools(reply_index):
                    rejected = context[reply_index].get_text_content() or None
                context[reply_index] = corrected
            if self.session_log:  # the log keeps what the user accepted: the taught answer, not the replaced one
                self._log_problem(self.session_log.replace(str(context[user_index].id), answer))
        else:
            if reply_index is None:
                raise CommandError("There is no reply to keep yet; give the better answer: /teach <answer>.")
            answer = context[reply_index].get_text_content() or ""
            steps = self._reply_steps(reply_index)  # kept with its calls: without them it would teach skipping them
        # Trained as the chat renders it: with the tools the agent offers (none offered: none rendered).
        self.taught.append(Taught(prompt, answer, rejected, tools=self._tool_schemas() or None, steps=steps))
        path = self._save_taught()
        calls = f" (with its {sum(bool(m.get('tool_calls')) for m in steps)} tool call turn(s))" if steps else ""
        self.print(f"Taught example {len(self.taught)}: [italic]{plain(prompt)}[/] -> "
                   f"[italic]{plain(answer)}[/]{calls} (saved to {plain(str(path))}; /train to learn it"
                   + ("; the replaced reply is kept as the rejected answer for /train method=dpo)." if rejected
                      else ")."))

    def _teach_call(self, args: list[str]) -> None:
        """`/teach call calculator {"expression": "97*91"}`: the last question should have been this tool call."""
        user_index, prompt, _ = self._last_turn()
        tools = self._tool_schemas() or []
        names = [t["function"]["name"] for t in tools]
        usage = 'Usage: /teach call <tool> {"argument": "value"}, e.g. /teach call calculator {"expression": "97*91"}'
        if not args:
            raise CommandError(usage)
        if args[0] not in names:
            raise CommandError(f"No tool named {args[0]!r}; this agent's tools: {', '.join(names) or 'none'}. {usage}")
        raw = self.raw_arguments.split(None, 2)[2] if len(self.raw_arguments.split(None, 2)) > 2 else ""
        try:
            arguments = json.loads(raw or "{}")  # the typed text: shell-style splitting would drop its quotes
        except json.JSONDecodeError as e:
            raise CommandError(f"The arguments are not JSON ({e.msg}). {usage}") from None
        if not isinstance(arguments, dict):
            raise CommandError(f"The arguments must be a JSON object. {usage}")
        problem = call_problem(args[0], arguments, tools)
        if problem:
            raise CommandError(f"{problem}. {usage}")
        self.taught.append(Taught(prompt, "", call={"name": args[0], "arguments": arguments}, tools=tools))
        if self.session_log:  # the reply should have been this call: it is not trained
            self._log_problem(self.session_log.judge(str(self.assistant.state.context[user_index].id), False))
        path = self._save_taught()
        shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
        self.print(f"Taught example {len(self.taught)}: [italic]{plain(prompt)}[/] -> call "
                   f"[italic]{plain(args[0])}({plain(shown)})[/] (saved to {plain(str(path))}; /train to learn it).")

    def cmd_train(self, args: list[str]) -> None:
        pairs = [p for p in args if not p.startswith("replay=")]
        replay = all(split_assignment(p)[1] is not False for p in args if p.startswith("replay="))
        method = self._config_with(pairs).get("method", "sft")
        if method not in METHODS:  # named before anything else: "Nothing taught" would read as if it were one
            raise CommandError(f"method = {method!r}: must be one of {', '.join(METHODS)} (e.g. /train method=dpo).")
        if not self.taught and not self.marks:
            raise CommandError("Nothing taught yet: ask something, then /teach <better answer>.")
        if method != "sft":
            self._train_preferences(method, self._preference_config(pairs), replay)
            return
        if not self.taught:
            raise CommandError("Nothing taught yet for SFT (only /good and /bad marks: /train method=kto learns "
                               "those); ask something, then /teach <better answer>.")
        taught_path = self._save_taught()
        mix = taught_mix(taught_path, self.base_config.get("data_path") if replay else None, TRAIN_REPEATS)
        config = self._config_with(pairs)
        config.setdefault("eval_fraction", 0.0)
        config.setdefault("probes", [t.prompt for t in self.taught][:5])
        result = self._fine_tune(str(mix), config)
        if not result.reused:
            write_text_atomic(result.run_dir / "taught.jsonl", taught_path.read_text(encoding="utf-8"))

    def _train_preferences(self, method: str, config: dict[str, Any], replay: bool) -> None:
        """/train method=dpo|orpo|kto: the taught answers over the replies they replaced (KTO: and the marks)."""
        rows = self._preference_rows(method)
        if not rows:
            raise CommandError(
                "No taught pair has a rejected reply yet: /teach <better answer> replaces a reply, and the replaced "
                "reply becomes the rejected answer (/teach with no text keeps the reply: an SFT example). /good and "
                "/bad marks train with method=kto.")
        replayed = self._replay_preferences() if replay else None
        mix = preference_mix(rows, replayed, TRAIN_REPEATS, paired=method != "kto")
        taught = self._taught_file()
        unique_rows = write_text_atomic(taught.with_name(f"{taught.stem}-{method}.jsonl"), _jsonl(rows))
        mix_file = write_text_atomic(taught.with_name(f"{taught.stem}-{method}-train.jsonl"), _jsonl(mix))
        config.setdefault("eval_fraction", 0.0)
        config.setdefault("probes", list(dict.fromkeys(r["prompt"][-1]["content"] for r in rows))[:5])
        result = self._fine_tune(str(mix_file), config)
        if not result.reused:
            write_text_atomic(result.run_dir / f"taught-{method}.jsonl", unique_rows.read_text(encoding="utf-8"))

    def _preference_config(self, pairs: list[str]) -> dict[str, Any]:
        """The configured fine_tune_config with `pairs` over it, for a preference run. The configured eval file belongs
        to the configured data (the taught pairs score themselves), and a configured SFT schedule (learning rate,
        steps, batch) was tuned for SFT: the method's defaults replace it, unless typed in `pairs`."""
        config = self._config_with(pairs, own_data=True)
        if (self.base_config.get("fine_tune_config") or {}).get("method", "sft") == "sft":
            typed = parse_overrides(pairs).get("training_args") or {}
            args = config.get("training_args") or {}
            for key in SFT_SCHEDULE:
                if key not in typed:
                    args.pop(key, None)
        return config

    def _preference_rows(self, method: str) -> list[dict[str, Any]]:
        """Pairs (taught answer over the replaced reply) for dpo/orpo; for kto every taught answer is good, every
        replaced reply bad, plus the /good and /bad marks."""
        def prompt(text: str) -> list[dict[str, str]]:
            return [{"role": "user", "content": text}]

        if method in ("dpo", "orpo"):
            return [Pair(prompt(t.prompt), t.answer, t.rejected).to_row() for t in self.taught
                    if t.rejected and t.rejected.strip() != t.answer.strip()]
        texts = [t for t in self.taught if not t.uses_tools]  # a taught call's text alone would teach skipping it
        marked = [Marked(prompt(t.prompt), t.answer, True) for t in texts]
        marked += [Marked(prompt(t.prompt), t.rejected, False) for t in texts if t.rejected]
        return [m.to_row() for m in marked + self.marks]

    def _replay_preferences(self) -> PreferenceDataset | None:
        """The configured data, if it is preference data (SFT data cannot be mixed into preference rows)."""
        data_path = self.base_config.get("data_path")
        if not data_path:
            return None
        try:
            return load_preference_dataset(str(data_path))
        except DatasetFormatError:
            self.print(f"Not replaying {plain(str(data_path))}: it is not preference data, so the taught rows train "
                       "alone (DPO and KTO keep the model close to its current weights through their reference).")
            return None

    def cmd_good(self, args: list[str]) -> None:
        self._mark(True)

    def cmd_bad(self, args: list[str]) -> None:
        self._mark(False)

    def _mark(self, good: bool) -> None:
        try:
            user_index, prompt, reply_index = self._last_turn()
        except CommandError:
            raise CommandError("There is no reply to mark yet: ask something first.") from None
        reply = self.assistant.state.context[reply_index].get_text_content() if reply_index is not None else None
        if not reply or not reply.strip():
            raise CommandError("There is no reply to mark yet: ask something first.")
        if reply_index is not None and self._called_tools(reply_index):
            raise CommandError("That reply called a tool, and /good and /bad marks train without tools (KTO): the "
                               "model would learn to answer without the call. /teach keeps the reply with its calls "
                               "(SFT); /teach call <tool> <json arguments> teaches a different call.")
        self.marks.append(Marked([{"role": "user", "content": prompt}], reply, good))
        if self.session_log:  # a /bad reply stays in the log untrained; /good trains it (again)
            self._log_problem(self.session_log.judge(str(self.assistant.state.context[user_index].id), good))
        self.print(f"Marked the last reply {'good' if good else 'bad'} ({len(self.marks)} marked; "
                   "/train method=kto learns from the marks).")
