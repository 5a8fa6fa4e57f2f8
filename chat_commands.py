"""The chat loop and its in-chat commands: fine-tune, teach, compare, switch and undo adapters, export.

Anything typed that does not start with "/" is a message to the assistant. `/help` lists the commands.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agentscope.message import AssistantMsg, UserMsg
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from chat_data import DatasetFormatError
from finetune_dialogagent import Finetune_DialogAgent, UserAgent
from finetune_report import pick_probes, run_probes, summary_rows, write_report
from hfmodel.common import UserError, describe_validation, redact, write_text_atomic
from hfmodel.settings import merge_config, parse_overrides, parse_value
from hfmodel.training import taught_mix
from huggingface_model import FineTuneInterrupted, FineTuneResult, HuggingFaceWrapper

__all__ = ["HELP", "ChatSession", "DatasetFormatError", "UserError", "merge_config", "parse_overrides"]


class CommandError(UserError):
    """A command used the wrong way; the message shows the right way."""


HELP = [
    ("/finetune [data] [key=value ...]", "fine-tune now (default: the configured data); e.g. max_steps=40 lora.r=16"),
    ("/teach [better answer]", "record the last question with this answer (no text: keep the last reply)"),
    ("/train [key=value ...]", "fine-tune on what was taught (+ the configured data unless replay=false)"),
    ("/compare [prompt]", "answer with the base model and the current adapter, side by side"),
    ("/dryrun [data]", "show format, rows, token lengths and the loss mask of the first example"),
    ("/adapters", "list the adapters of this session"),
    ("/use <name|base>", "switch adapter instantly (no reload)"),
    ("/undo", "go back to the previous adapter"),
    ("/load <model id | folder | adapter folder>", "load another model, or an adapter onto this one"),
    ("/save [folder]", "save the active adapter + tokenizer"),
    ("/export [folder]", "save base + adapter merged into one model folder (checked by loading it back)"),
    ("/system <prompt>", "change the system prompt"),
    ("/set key=value ...", "generation settings: temperature, top_p, max_length, repetition_penalty, do_sample, seed"),
    ("/reset", "clear the conversation"),
    ("/history", "show the conversation"),
    ("/help", "this list"),
    ("exit", "leave (also Ctrl-D)"),
]

TRAIN_REPEATS = 8  # minimum repeats of each taught example (more when replayed data would outweigh them)


@dataclass
class Taught:
    prompt: str
    answer: str


class ChatSession:
    """Runs the user <-> assistant loop and the commands, on one persistent event loop."""

    def __init__(self, assistant: Finetune_DialogAgent, user: UserAgent, base_config: dict[str, Any] | None = None,
                 console: Console | None = None, out: Any = None) -> None:
        self.assistant = assistant
        self.user = user
        self.base_config = base_config or {}
        self.console = console or Console(highlight=False)
        self.out = out or sys.stdout
        self.loop = asyncio.new_event_loop()
        self.taught: list[Taught] = []
        self.session_stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.commands: dict[str, Callable[[list[str], str], None]] = {
            "/help": self.cmd_help, "/finetune": self.cmd_finetune, "/teach": self.cmd_teach,
            "/train": self.cmd_train, "/compare": self.cmd_compare, "/dryrun": self.cmd_dryrun,
            "/adapters": self.cmd_adapters, "/use": self.cmd_use, "/undo": self.cmd_undo, "/load": self.cmd_load,
            "/save": self.cmd_save, "/export": self.cmd_export, "/system": self.cmd_system, "/set": self.cmd_set,
            "/reset": self.cmd_reset, "/history": self.cmd_history,
        }

    @property
    def model(self) -> HuggingFaceWrapper:
        return self.assistant._wrapper("run chat commands")

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> int:
        self.console.print(f"[bold]{self.assistant.name}[/] is ready ({escape(self.model.model)}). "
                           "Type a message, /help for commands, exit to leave.")
        try:
            while True:
                text = self.user.read()
                if text is None:
                    break
                self.handle(text)
        finally:
            self.loop.close()
        self.console.print("Bye.")
        return 0

    def startup_fine_tune(self) -> bool:
        """The configured fine-tune before the first prompt; False if its configuration is wrong."""
        try:
            self._fine_tune(None, self._config_with([]), probe_count=3)
        except FineTuneInterrupted as e:
            self.error(str(e))
        except UserError as e:
            self.error(str(e))
            return False
        except KeyboardInterrupt:
            self.error("Fine-tuning interrupted; chatting with the weights loaded before it.")
        except Exception as e:  # noqa: BLE001 - our bug: visible, logged, and the chat still starts
            self.internal_error("the start-up fine-tune", e)
        return True

    def handle(self, text: str) -> None:
        """One user line: a command or a message. User mistakes print one line; the chat goes on."""
        if text.startswith("/"):
            name, _, rest = text.partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                self.error(f"Unknown command {name}. Commands: {', '.join(self.commands)} (see /help).")
                return
            try:
                args = shlex.split(rest)
            except ValueError as e:
                self.error(f"Could not parse the arguments ({e}); close your quotes.")
                return
            try:
                command(args, rest.strip())
            except FineTuneInterrupted as e:
                self.error(str(e))
            except UserError as e:
                self.error(str(e))
            except KeyboardInterrupt:
                self.error("Interrupted.")
            except Exception as e:  # noqa: BLE001 - the one boundary: our bug stays visible but never ends the chat
                self.internal_error(name.lower(), e)
            return
        try:
            self.say(text)
        except UserError as e:  # e.g. a generation setting the model rejects
            self.out.write("\n")
            self.error(str(e))
        except Exception as e:  # noqa: BLE001 - as above
            self.out.write("\n")
            self.internal_error("the reply", e)

    def internal_error(self, what: str, error: Exception) -> None:
        """Not the user's mistake: one line naming what failed, the full traceback in a log file."""
        log = self._output_dir() / "errors.log"
        trace = "".join(traceback.format_exception(error))
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as f:
                f.write(f"--- {datetime.now().isoformat(timespec='seconds')} {what}\n{redact(trace)}\n")
            where = f"traceback in {log}"
        except OSError:
            where = "the traceback could not be written"
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        self.error(f"{what} failed: {type(error).__name__}: {first} ({where}); the previous weights and the "
                   "conversation are kept.")

    def error(self, message: str) -> None:
        self.console.print(f"[red]error:[/] {escape(redact(message))}")

    def say(self, text: str) -> str:
        """Send a message to the assistant and stream its reply; Ctrl-C stops the reply, not the chat."""
        task = self.loop.create_task(self._stream(text))
        try:
            return self.loop.run_until_complete(task)
        except KeyboardInterrupt:
            task.cancel()
            self.loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            self.out.write("\n")
            self.console.print("[yellow](reply interrupted)[/]")
            return ""

    async def _stream(self, text: str) -> str:
        self.out.write(f"{self.assistant.name}: ")
        self.out.flush()
        pieces = []
        async for piece in self.assistant.stream_reply(UserMsg(name=self.user.name, content=text)):
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        return "".join(pieces)

    # ------------------------------------------------------------------------------------------- helpers

    def _config_with(self, pairs: list[str]) -> dict[str, Any]:
        return merge_config(self.base_config.get("fine_tune_config"), parse_overrides(pairs))

    def _split_data_and_pairs(self, args: list[str]) -> tuple[str | None, list[str]]:
        if args and "=" not in args[0]:
            return args[0], args[1:]
        return None, args

    def _fine_tune(self, data_path: str | None, config: dict[str, Any], probe_count: int = 4) -> FineTuneResult:
        """Fine-tune with a progress bar; Ctrl-C stops cleanly; then print the before/after report."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        before = self.model.active_adapter
        stop = threading.Event()
        with Progress(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                      TimeElapsedColumn(), console=self.console, transient=True) as bar:
            task = bar.add_task("train", total=None, loss="")

            def report(info: dict[str, Any]) -> None:
                fields: dict[str, Any] = {"loss": f"loss {info['loss']:.3f}"} if "loss" in info else {}
                bar.update(task, completed=info.get("step", 0), total=info.get("max_steps") or None, **fields)

            result = self.model.fine_tune(data_path, config, progress=report, stop=stop)
        if result.reused:
            self.console.print(f"Reused the adapter of an identical earlier run: {escape(str(result.run_dir))} "
                               "(add force_retrain=true to train again).")
        else:
            self.report(result, before, config.get("probes"), probe_count)
        self.console.print(f"Now serving adapter [bold]{result.adapter_name}[/]. The conversation is kept.")
        return result

    def _answer(self, prompt: str, adapter: str | None) -> str:
        """One fresh single-turn answer with the given adapter (None = base), same settings and seed."""
        messages = [{"role": "system", "content": self.assistant.sys_prompt}, {"role": "user", "content": prompt}]
        with self.model.serving(adapter):
            return self.model.generate(messages, max_new_tokens=min(self.model.parameters.max_length, 64))

    def report(self, result: FineTuneResult, before: str | None, configured: list[str] | None = None,
               probe_count: int = 4) -> None:
        prompts = pick_probes(result, configured, probe_count)
        probes = run_probes(prompts, lambda p: self._answer(p, before), lambda p: self._answer(p, result.adapter_name))
        before_label, after_label = before or "base", result.adapter_name
        table = Table(title=Text(f"Fine-tune report ({result.run_dir})"), show_lines=False)
        table.add_column("metric")
        table.add_column(Text(f"before ({before_label})"), justify="right")
        table.add_column(Text(f"after ({after_label})"), justify="right")
        for row in summary_rows(result):
            table.add_row(*row)
        self.console.print(table)
        if probes:
            side = Table(title="Probes (same settings and seed)", show_lines=True)
            side.add_column("prompt", max_width=30)
            side.add_column(Text(before_label))
            side.add_column(Text(after_label))
            for p in probes:
                side.add_row(Text(p.prompt), Text(p.before), Text(p.after))
            self.console.print(side)
        path = write_report(result, probes, before_label, after_label)
        self.console.print(f"Report: {escape(str(path))} (+ loss.png)")

    def _last_turn(self) -> tuple[int, str, int | None]:
        """Index and text of the last user message, and the index of the reply after it (if any)."""
        context = self.assistant.state.context
        for i in range(len(context) - 1, -1, -1):
            if context[i].role == "user":
                reply = next((j for j in range(i + 1, len(context)) if context[j].role == "assistant"), None)
                return i, context[i].get_text_content() or "", reply
        raise CommandError("Nothing to teach yet: ask the assistant something first.")

    def _output_dir(self) -> Path:
        ftc = self.base_config.get("fine_tune_config") or {}
        return Path((ftc.get("training_args") or {}).get("output_dir", "runs")).expanduser()

    def _taught_file(self) -> Path:
        base = self._output_dir()
        base.mkdir(parents=True, exist_ok=True)
        return base / f"taught-{self.session_stamp}.jsonl"

    def _save_taught(self) -> Path:
        path = self._taught_file()
        rows = [{"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}]}
                for t in self.taught]
        return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # ------------------------------------------------------------------------------------------- commands

    def cmd_help(self, args: list[str], rest: str) -> None:
        table = Table(show_header=False, box=None)
        for usage, what in HELP:
            table.add_row(f"[bold]{escape(usage)}[/]", escape(what))
        self.console.print(table)

    def cmd_finetune(self, args: list[str], rest: str) -> None:
        data_path, pairs = self._split_data_and_pairs(args)
        config = self._config_with(pairs)
        if data_path:
            config.pop("eval_data_path", None)  # the configured eval file belongs to the configured data
        self._fine_tune(data_path, config)

    def cmd_teach(self, args: list[str], rest: str) -> None:
        user_index, prompt, reply_index = self._last_turn()
        context = self.assistant.state.context
        if rest:
            answer = rest
            corrected = AssistantMsg(name=self.assistant.name, content=answer)
            if reply_index is None:
                context.append(corrected)
            else:
                context[reply_index] = corrected
        else:
            if reply_index is None:
                raise CommandError("There is no reply to keep yet; give the better answer: /teach <answer>.")
            answer = context[reply_index].get_text_content() or ""
        self.taught.append(Taught(prompt, answer))
        path = self._save_taught()
        self.console.print(f"Taught example {len(self.taught)}: [italic]{escape(prompt)}[/] -> "
                           f"[italic]{escape(answer)}[/] (saved to {escape(str(path))}; /train to learn it).")

    def cmd_train(self, args: list[str], rest: str) -> None:
        if not self.taught:
            raise CommandError("Nothing taught yet: ask something, then /teach <better answer>.")
        pairs = [p for p in args if not p.startswith("replay=")]
        replay = all(parse_value(p.split("=", 1)[1]) is not False for p in args if p.startswith("replay="))
        taught_path = self._save_taught()
        mix = taught_mix(taught_path, self.base_config.get("data_path") if replay else None, TRAIN_REPEATS)
        config = self._config_with(pairs)
        config.setdefault("eval_fraction", 0.0)
        config.setdefault("probes", [t.prompt for t in self.taught][:5])
        result = self._fine_tune(str(mix), config)
        if not result.reused:
            (result.run_dir / "taught.jsonl").write_text(taught_path.read_text())

    def cmd_compare(self, args: list[str], rest: str) -> None:
        prompt = rest or self._last_turn()[1]
        current = self.model.active_adapter
        if current is None:
            raise CommandError("No adapter is active, so base and current are the same model. Fine-tune first.")
        base_answer = self._answer(prompt, None)
        tuned_answer = self._answer(prompt, current)
        table = Table(title=Text(f"/compare: {prompt}"), show_lines=True)
        table.add_column("base")
        table.add_column(Text(current))
        table.add_row(Text(base_answer), Text(tuned_answer))
        self.console.print(table)

    def cmd_dryrun(self, args: list[str], rest: str) -> None:
        data_path, pairs = self._split_data_and_pairs(args)
        dry = self.model.dry_run(data_path, self._config_with(pairs))
        lengths = dry.lengths
        self.console.print(f"{escape(dry.data.describe())}")
        self.console.print(f"tokens per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
                           f"{dry.truncated} of {len(lengths)} rows longer than max_length={dry.max_length}; "
                           f"template: {dry.template_name}")
        text = Text()
        for piece, loss in dry.segments:
            text.append(piece, style="bold black on green" if loss else "dim")
        self.console.print("First example (highlighted tokens carry loss):")
        self.console.print(text)
        if dry.loss_tokens == 0:
            self.error("No token of this example carries loss: training would learn nothing.")

    def cmd_adapters(self, args: list[str], rest: str) -> None:
        table = Table(title="Adapters (/use <name>, /use base, /undo)")
        for column in ("", "name", "from", "path", "note"):
            table.add_column(column)
        active = self.model.active_adapter
        table.add_row("*" if active is None else "", "base", "",
                      Text(self.model.source.path if self.model.source else ""), "the loaded model without adapter")
        for record in self.model.adapters.values():
            table.add_row("*" if record.name == active else "", Text(record.name), Text(record.parent or "base"),
                          Text(str(record.path)), Text(record.note))
        self.console.print(table)

    def cmd_use(self, args: list[str], rest: str) -> None:
        if len(args) != 1:
            raise CommandError("Usage: /use <name|base> (see /adapters).")
        self.model.use_adapter(args[0])
        self.console.print(f"Now serving {escape(args[0])}.")

    def cmd_undo(self, args: list[str], rest: str) -> None:
        previous = self.model.undo()
        self.console.print(f"Now serving {escape(previous or 'base')}.")

    def cmd_load(self, args: list[str], rest: str) -> None:
        if not rest:
            raise CommandError("Usage: /load <model id | model folder | adapter folder>.")
        target = Path(rest).expanduser()
        if (target / "adapter_config.json").exists():
            record = self.model.load_adapter(target, note=f"/load {target}")
            self.console.print(f"Adapter {escape(record.name)} loaded and active.")
            return
        if target.exists():
            self.model.load_model(None, str(target))
            self.model.load_tokenizer(None, str(target) if (target / "tokenizer_config.json").exists() else None)
        else:
            self.model.load_model(rest)
            self.model.load_tokenizer(rest)
        self.console.print(f"Loaded {escape(self.model.source.describe() if self.model.source else rest)}; "
                           "the conversation is kept.")

    def cmd_save(self, args: list[str], rest: str) -> None:
        if self.model.active_adapter is None:
            raise CommandError("No adapter is active; nothing to save (the base model is unchanged).")
        dest = Path(rest).expanduser() if rest else self._default_dest("adapter")
        if dest.exists() and any(dest.iterdir()):
            raise CommandError(f"{dest} already exists and is not empty; choose a new folder.")
        path = self.model.save_adapter(dest)
        self.console.print(f"Saved adapter {self.model.active_adapter} + tokenizer to {escape(str(path))}.")

    def cmd_export(self, args: list[str], rest: str) -> None:
        dest = Path(rest).expanduser() if rest else self._default_dest("merged")
        if dest.exists():
            raise CommandError(f"{dest} already exists; choose a new folder.")
        started = time.perf_counter()
        path = self.model.export_merged(dest)
        diff = self.model.verify_export(path)
        self.console.print(f"Exported merged model to {escape(str(path))} in {time.perf_counter() - started:.1f} s; loaded back: "
                           f"max logit difference {diff:.2e} vs base+adapter.")

    def _default_dest(self, kind: str) -> Path:
        base = self._output_dir()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return base / f"{stamp}-{self.model.active_adapter or 'base'}-{kind}"

    def cmd_system(self, args: list[str], rest: str) -> None:
        if not rest:
            self.console.print(f"System prompt: {escape(self.assistant.sys_prompt)}")
            return
        self.assistant.sys_prompt = rest
        self.console.print("System prompt updated.")

    def cmd_set(self, args: list[str], rest: str) -> None:
        if not args:
            self.console.print(self.model.parameters.model_dump())
            return
        updates = {}
        for pair in args:
            if "=" not in pair:
                raise CommandError(f"'{pair}' is not key=value; e.g. /set temperature=0.2 max_length=128.")
            key, raw = pair.split("=", 1)
            updates[key] = parse_value(raw)
        fields = type(self.model.parameters).model_fields
        unknown = [k for k in updates if k not in fields]
        if unknown:
            raise CommandError(f"Unknown setting(s) {', '.join(unknown)}; valid: {', '.join(fields)}.")
        try:
            self.model.parameters = type(self.model.parameters).model_validate(
                {**self.model.parameters.model_dump(), **updates})
        except ValidationError as e:
            raise CommandError(f"Invalid value ({describe_validation(e)}).") from None
        self.console.print(f"Settings: {escape(str(self.model.parameters.model_dump()))}")

    def cmd_reset(self, args: list[str], rest: str) -> None:
        self.assistant.state.context.clear()
        self.console.print("Conversation cleared.")

    def cmd_history(self, args: list[str], rest: str) -> None:
        history = self.assistant.history()
        if not history:
            self.console.print("(no messages yet)")
        for m in history:
            self.console.print(f"[bold]{m['role']}:[/] {escape(m['content'])}")
