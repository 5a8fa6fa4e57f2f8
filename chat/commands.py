"""The chat loop and its in-chat commands: fine-tune, teach, compare, switch and undo adapters, export.

Anything typed that does not start with "/" is a message to the assistant. `/help` lists the commands.
Command arguments follow one rule: shell-style words (quote a folder or text with spaces or apostrophes:
`/save "my adapter"`, `/teach "I'm Ember."`), settings as key=value read by the one parser `--set` uses.
Everything shown that came from data or the model passes through `safe_text` (no terminal escapes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from agentscope.message import ToolCallBlock, UserMsg
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from chat.background import MODES, BackgroundFineTune, Outcome, own_random_state
from chat.practice import PracticeCommands
from chat.session_log import SessionLog
from chat.startup import BACKGROUND_LINE, check_background_run, log_warning, opening_lines, output_dir
from chat.teaching import CommandError, Taught, TeachingCommands, cell, plain
from finetune_dialogagent import Finetune_DialogAgent, ToolLine, UserAgent
from hfmodel.common import (
    Sanitized,
    StreamFilter,
    UserError,
    check_writable_folder,
    describe_validation,
    failure_line,
    log_traceback,
    redact,
    safe_text,
)
from hfmodel.data import DatasetFormatError
from hfmodel.preference_data import Marked
from hfmodel.report import Probe, pick_probes, run_probes, summary_rows, write_report
from hfmodel.serving import record_last_export
from hfmodel.settings import merge_config, number_problems, parse_overrides, split_assignment
from huggingface_model import FineTuneInterrupted, FineTuneResult, HuggingFaceWrapper

__all__ = ["HELP", "ChatSession", "CommandError", "DatasetFormatError", "UserError", "cell", "merge_config",
           "parse_overrides", "plain"]


HELP = [
    ("/finetune [data] [key=value ...]", "fine-tune now (default: the configured data); e.g. max_steps=40 lora.r=16"),
    ("/teach [better answer]", "record the last question with this answer (no text: keep the last reply)"),
    ('/teach call <tool> {"arg": ...}', "record that the last question should have made this tool call"),
    ("/train [key=value ...]", "fine-tune on what was taught (+ the configured data unless replay=false)"),
    ("/train method=dpo|orpo|kto", "learn the preferences: the taught answers over the replies they replaced"),
    ("/good", "mark the last reply good (/train method=kto learns from the marks)"),
    ("/bad", "mark the last reply bad (/train method=kto learns from the marks)"),
    ("/practice <tasks> [k=4 rounds=1 method=rft|grpo keep=2 ...]",
     "sample attempts with the tools, keep what the verifier accepts, train on them (RFT) or GRPO"),
    ("/practice session", "practise this session's questions: taught answers and /good replies are the references"),
    ("/compare [prompt]", "answer with the base model and the current adapter, side by side"),
    ("/dryrun [data]", "show format, rows, token lengths and the loss mask of the first example"),
    ("/adapters", "list the adapters of this session"),
    ("/use <name|base>", "switch adapter instantly (no reload)"),
    ("/undo", "go back to the previous adapter"),
    ("/load <model id | folder | adapter folder>", "load another model, or an adapter onto this one"),
    ("/save [folder]", "save the active adapter + tokenizer"),
    ("/export [folder]", "save base + adapter merged into one model folder (checked by loading it back)"),
    ("/export gguf [folder] [type=f16|q8_0]", "the same as one GGUF file + Ollama Modelfile (checked by loading it "
                                              "back); make serve serves the last export"),
    ("/system <prompt>", "change the system prompt"),
    ("/set key=value ...", "generation settings: temperature, top_p, max_length, repetition_penalty, do_sample, seed"),
    ("/reset", "clear the conversation"),
    ("/history", "show the conversation"),
    ("/help", "this list"),
    ("exit", "leave (also Ctrl-D)"),
]

NO_ARGUMENTS = ("/adapters", "/undo", "/reset", "/history", "/help", "/good", "/bad")
ACTIVITY = {"/finetune": "Fine-tuning", "/train": "Fine-tuning", "/load": "Loading", "/dryrun": "The dry run",
            "/compare": "Comparing", "/practice": "Practice", "/save": "Saving", "/export": "Exporting"}  # named in an unexpected error
DRYRUN_CHARS, DRYRUN_LINES = 2000, 25  # /dryrun shows about a screenful of the first example
WAIT_FOR_BACKGROUND = ("/finetune", "/train", "/load")  # they would race the start-up fine-tune's own swap


@dataclasses.dataclass
class PreparedReport:
    """A fine-tune report computed (probes answered, files written) and not yet shown."""

    result: FineTuneResult
    before_label: str
    after_label: str
    probes: list[Probe]
    path: Path


async def _collect(stream: Any) -> list[str]:
    return [piece async for piece in stream]


async def _gather(coroutines: Any) -> list[Any]:
    """asyncio.gather inside the running loop (outside one it would bind to another loop)."""
    return list(await asyncio.gather(*coroutines))


def _probe_text(pieces: list[str]) -> str:
    """A probe's answer as one cell: its tool-call lines, then the reply."""
    calls = [p for p in pieces if isinstance(p, ToolLine)]
    return "\n".join([*calls, "".join(p for p in pieces if not isinstance(p, ToolLine)).strip()])


class ChatSession(TeachingCommands, PracticeCommands):
    """Runs the user <-> assistant loop and the commands, on one persistent event loop."""

    def __init__(self, assistant: Finetune_DialogAgent, user: UserAgent, base_config: dict[str, Any] | None = None,
                 console: Console | None = None, out: Any = None, session_log: bool | SessionLog | None = False
                 ) -> None:
        """`session_log`: write every exchange to runs/session-<stamp>-<id>.jsonl (see session_log.py); or the
        `SessionLog` to write to (the chat's start creates it)."""
        self.assistant = assistant
        self.user = user
        self.base_config = base_config or {}
        self.session_log = session_log if isinstance(session_log, SessionLog) else \
            SessionLog(self._output_dir()) if session_log else None
        self.raw_arguments = ""
        self.console = console or Console(highlight=False)
        self.out = out or sys.stdout
        self.loop = asyncio.new_event_loop()
        self.taught: list[Taught] = []
        self.session_stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.taught_path: Path | None = None  # created (exclusively) at the first /teach
        self.marks: list[Marked] = []  # /good and /bad: replies marked for KTO
        self.background: BackgroundFineTune | None = None  # the start-up fine-tune while it runs in the background
        self.background_host: HuggingFaceWrapper | None = None  # the model its adapter goes into
        self.commands: dict[str, Callable[[list[str]], None]] = {
            "/help": self.cmd_help, "/finetune": self.cmd_finetune, "/teach": self.cmd_teach,
            "/train": self.cmd_train, "/compare": self.cmd_compare, "/dryrun": self.cmd_dryrun,
            "/adapters": self.cmd_adapters, "/use": self.cmd_use, "/undo": self.cmd_undo, "/load": self.cmd_load,
            "/save": self.cmd_save, "/export": self.cmd_export, "/system": self.cmd_system, "/set": self.cmd_set,
            "/reset": self.cmd_reset, "/history": self.cmd_history, "/good": self.cmd_good, "/bad": self.cmd_bad,
            "/practice": self.cmd_practice,
        }

    @property
    def model(self) -> HuggingFaceWrapper:
        return self.assistant._wrapper("run chat commands")

    # ------------------------------------------------------------------------------------------- loop

    def agent_names(self) -> list[str]:
        return [self.assistant.name]

    def run(self, first: str | None = None, opened: bool = False) -> int:
        """The chat until `exit`. `opened`: the opening lines and the first prompt were shown already (the chat's
        start, chat/startup.py), and `first` is what the user typed there (None: they left)."""
        if not opened:
            tools = self._tool_schemas()
            lines, self.session_log = opening_lines(self.agent_names(), self.model.model,
                                                    [t["function"]["name"] for t in tools or []], self.session_log)
            for line in lines:
                self.print(line)
        try:
            while True:
                if opened:
                    text, opened = first, False
                else:
                    self._background_news(status=True)
                    if self.background is not None:
                        # Started at the first prompt, once everything before it has run: the main thread imports
                        # nothing while the run imports (see BackgroundFineTune._run); from then on it computes only
                        # in turns.
                        self.background.start()
                    text = self.user.read()
                if text is None:
                    break
                self._background_news(status=False)  # a finished run is swapped in before this line is handled
                self.handle(text)
        finally:
            self._end_background()
            self.loop.close()
        self.print("Bye.")
        return 0

    def startup_fine_tune(self, mode: str = "wait", announce: bool = True) -> bool:
        """The configured fine-tune: before the first prompt ("wait"), or in the background while the chat answers
        from the loaded weights ("background", see chat/background.py; `announce`: say so); False if its
        configuration is wrong."""
        if mode not in MODES:
            self.error(f"startup_fine_tune must be one of {', '.join(MODES)}, got {mode!r}.")
            return False
        if mode == "background":
            return self._start_background(self._config_with([]), probe_count=3, announce=announce)
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
            self.internal_error("The start-up fine-tune", e)
        return True

    def handle(self, text: str) -> None:
        """One user line: a command or a message. User mistakes print one line; the chat goes on."""
        with self._turn():
            self._handle(text)

    def _handle(self, text: str) -> None:
        if text.startswith("/"):
            name, _, rest = text.partition(" ")
            name = name.lower()
            command = self.commands.get(name)
            if command is None:
                self.error(f"Unknown command {name}. Commands: {', '.join(self.commands)} (see /help).")
                return
            self.raw_arguments = rest.strip()  # for the one argument that is JSON: /teach call's
            try:
                args = shlex.split(rest)
            except ValueError as e:
                self.error(f"Could not parse the arguments ({e}); close your quotes.")
                return
            if args and name in NO_ARGUMENTS:
                self.error(f"{name} takes no arguments (got {' '.join(args)!r}); see /help.")
                return
            if name in WAIT_FOR_BACKGROUND and self._background_running():
                self.error(f"The start-up fine-tune is still running in the background; {name} can run once it "
                           "has finished and its adapter is serving (its progress shows before each prompt).")
                return
            try:
                command(args)
            except FineTuneInterrupted as e:
                self.error(str(e))
            except UserError as e:
                self.error(str(e))
            except KeyboardInterrupt:
                self.error("Interrupted.")
            except Exception as e:  # noqa: BLE001 - the one boundary: our bug stays visible but never ends the chat
                self.internal_error(ACTIVITY.get(name, name), e)
            return
        try:
            self.say(text)
        except UserError as e:  # e.g. a generation setting the model rejects
            self.out.write("\n")
            self.error(str(e))
        except Exception as e:  # noqa: BLE001 - as above
            self.out.write("\n")
            self.internal_error("The reply", e)

    def internal_error(self, what: str, error: Exception) -> None:
        """Not the user's mistake: one line naming what failed, the full traceback in a log file."""
        log = log_traceback(what, error, self._output_dir())
        self.error(f"{failure_line(what, error, log)}; the previous weights and the conversation are kept.")

    def print(self, *renderables: Any) -> None:
        """Everything the chat shows goes through here: data and model text lose their control characters."""
        self.console.print(*(Sanitized(r) for r in renderables))

    def error(self, message: str) -> None:
        self.print(f"[red]error:[/] {plain(redact(message))}")

    def say(self, text: str) -> str:
        """Send a message to the assistant and stream its reply; Ctrl-C stops the reply, not the chat."""
        task = self.loop.create_task(self._stream(text))
        try:
            return self.loop.run_until_complete(task)
        except KeyboardInterrupt:
            task.cancel()
            self.loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            self.out.write("\n")
            self.print("[yellow](reply interrupted)[/]")
            return ""

    async def _stream(self, text: str) -> str:
        prefix = f"{self.assistant.name}: "
        pieces, shown = [], StreamFilter()  # model output is untrusted text too
        started = False  # the name goes out with the first text: a reply that starts with a call shows its line first
        context = self.assistant.state.context
        before = len(context)
        async for piece in self.assistant.stream_reply(UserMsg(name=self.user.name, content=text),
                                                       confirm=self._confirm):
            if isinstance(piece, ToolLine):  # a finished tool call: its own line, then the reply goes on
                if started:
                    self.out.write(shown.flush() + "\n")
                    self.out.flush()
                    started = False
                self.print(f"[cyan]{plain(piece)}[/]")
                continue
            if not started:
                self.out.write(prefix)
                started = True
            pieces.append(piece)
            self.out.write(shown.feed(piece))
            self.out.flush()
        self.out.write((shown.flush() if started else prefix) + "\n")
        self.out.flush()
        if getattr(self.assistant, "reply_cut", False):
            limit = getattr(self.assistant.model.parameters, "max_length", "?")
            kept = " It is not saved to the session log: training on it would teach replies that stop mid-sentence." \
                if self.session_log else ""
            self.print(f"[yellow](reply cut at max_length = {limit} new tokens; raise max_length in model_configs for "
                       f"longer replies.{kept})[/]")
        elif getattr(self.assistant, "reply_unread", False):
            kept = " It is not saved to the session log: training on it would teach broken calls." \
                if self.session_log else ""
            self.print("[yellow](the model wrote a tool call that could not be read, shown above as text and left out "
                       "of the conversation, so that the model does not copy it; /teach call <tool> <json arguments> "
                       f"teaches the right call.{kept})[/]")
        elif self.session_log:
            self._log_problem(await self.session_log.record(self.assistant.sys_prompt, context[before:],
                                                            await self._tool_schemas_async(),
                                                            agent=self.assistant.name))
        return "".join(pieces)

    def _log_problem(self, problem: str | None) -> bool:
        """A session log that cannot be written is one warning, and the chat goes on without it."""
        if problem:
            self.print(log_warning(problem))
            self.session_log = None
        return bool(problem)

    def _confirm(self, call: ToolCallBlock) -> bool:
        """AgentScope's permission flow asks before a tool that is not read-only runs: the user says yes or no."""
        try:
            answer = self.user.input_fn(f"\nRun {safe_text(call.name)}({safe_text(call.input)[:200]})? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")

    async def _tool_schemas_async(self) -> list[dict] | None:
        toolkit = getattr(self.assistant, "toolkit", None)
        return await toolkit.get_tool_schemas() if toolkit is not None else None

    def _tool_schemas(self) -> list[dict] | None:
        return self.loop.run_until_complete(self._tool_schemas_async())

    # ------------------------------------------------------------------------------------------- helpers

    def _config_with(self, pairs: list[str], own_data: bool = False) -> dict[str, Any]:
        """The configured fine_tune_config with `pairs` over it. `own_data`: the user named a data file, so the
        configured eval file (it belongs to the configured data) is dropped; one given in `pairs` stays."""
        base = dict(self.base_config.get("fine_tune_config") or {})
        if own_data:
            base.pop("eval_data_path", None)
        return merge_config(base, parse_overrides(pairs))

    @staticmethod
    def _split_data_and_pairs(args: list[str]) -> tuple[str | None, list[str]]:
        if args and "=" not in args[0]:
            return args[0], args[1:]
        return None, args

    @staticmethod
    def _folder(args: list[str], usage: str) -> Path | None:
        """The one optional folder argument of /save, /export, /load (quote a name with spaces)."""
        if len(args) > 1:
            raise CommandError(f"Usage: {usage}: one folder; quote a name with spaces, e.g. \"my adapter\" "
                               f"(got {len(args)} words).")
        return Path(args[0]).expanduser() if args else None

    def _fine_tune(self, data_path: str | None, config: dict[str, Any], probe_count: int = 4) -> FineTuneResult:
        """Fine-tune with a progress bar; Ctrl-C stops cleanly; then print the before/after report."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        runs = (config.get("training_args") or {}).get("output_dir") or "runs"
        if isinstance(runs, str):  # /proc/x, a file, a read-only folder: one line now, not a failure mid-run
            check_writable_folder(runs, "training_args.output_dir")
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
            self.print(f"Reused the adapter of an identical earlier run: {plain(str(result.run_dir))} "
                       "(add force_retrain=true to train again).")
        else:
            self.report(result, before, config.get("probes"), probe_count)
        self.print(f"Now serving adapter [bold]{result.adapter_name}[/]. The conversation is kept.")
        return result

    def _answers(self, prompts: list[str], adapters: list[str | None], model: HuggingFaceWrapper | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 assistant: Finetune_DialogAgent | None = None) -> list[str]:
        """Fresh single-turn answers, prompt i with adapter `adapters[i]` (None = base), same settings and seed, all in
        one batch (peft serves each row its own adapter). An agent with tools answers as in the chat: its calls run,
        shown as `-> calculator(...) = result` lines before the reply (the probe agents run concurrently, so their
        model calls still share batches). `model`, `loop`, `assistant`: another model (the background run's copy),
        event loop and agent."""
        model, loop, assistant = model or self.model, loop or self.loop, assistant or self.assistant
        limit = min(model.parameters.max_length, 64)
        toolkit = getattr(assistant, "toolkit", None)
        if toolkit is None:
            system = {"role": "system", "content": assistant.sys_prompt}
            conversations = [[system, {"role": "user", "content": p}] for p in prompts]
            return [r.text for r in model.generate_batch(conversations, adapters=adapters, max_new_tokens=limit)]
        probes = [Finetune_DialogAgent(name=assistant.name, sys_prompt=assistant.sys_prompt, model=model,
                                       toolkit=toolkit) for _ in prompts]

        async def probe_answer(probe: Finetune_DialogAgent, prompt: str, adapter: str | None) -> list[str]:
            with model.reply_adapter(adapter):  # this task's model calls only
                return await _collect(probe.stream_reply(UserMsg(name=self.user.name, content=prompt)))

        parameters = model.parameters
        model.parameters = parameters.model_copy(update={"max_length": limit})
        try:
            answers = loop.run_until_complete(_gather(
                probe_answer(probe, prompt, adapter) for probe, prompt, adapter in zip(probes, prompts, adapters,
                                                                                       strict=True)))
        finally:
            model.parameters = parameters
        return [_probe_text(pieces) for pieces in answers]

    def report(self, result: FineTuneResult, before: str | None, configured: list[str] | None = None,
               probe_count: int = 4) -> None:
        self.show_report(self.prepare_report(result, before, configured, probe_count, self._answers))

    @staticmethod
    def prepare_report(result: FineTuneResult, before: str | None, configured: list[str] | None, probe_count: int,
                       answer: Callable[[list[str], list[str | None]], list[str]]) -> PreparedReport:
        """Answer the probes before and after (`answer(prompts, adapters)`, all in one batch) and write the report
        files."""
        prompts = pick_probes(result, configured, probe_count)
        probes = run_probes(prompts, answer, before, result.adapter_name)
        before_label, after_label = before or "base", result.adapter_name
        path = write_report(result, probes, before_label, after_label)
        return PreparedReport(result, before_label, after_label, probes, path)

    def show_report(self, prepared: PreparedReport) -> None:
        result, before_label, after_label, probes = (prepared.result, prepared.before_label, prepared.after_label,
                                                     prepared.probes)
        table = Table(title=cell(f"Fine-tune report ({result.run_dir})"), show_lines=False)
        table.add_column("metric")
        table.add_column(cell(f"before ({before_label})"), justify="right")
        table.add_column(cell(f"after ({after_label})"), justify="right")
        for row in summary_rows(result):
            table.add_row(*row)
        self.print(table)
        if probes:
            side = Table(title="Probes (same settings and seed)", show_lines=True)
            side.add_column("prompt", max_width=30)
            side.add_column(cell(before_label))
            side.add_column(cell(after_label))
            for p in probes:
                side.add_row(cell(p.prompt), cell(p.before), cell(p.after))
            self.print(side)
        self.print(f"Report: {plain(str(prepared.path))} (+ loss.png)")

    # ------------------------------------------------------------------------------------------- background run

    def _start_background(self, config: dict[str, Any], probe_count: int, announce: bool = True) -> bool:
        """Set the configured fine-tune up on a copy of the model (it starts at the first prompt); False if its
        configuration is wrong."""
        try:
            check_background_run(config)
        except UserError as e:
            self.error(str(e))
            return False
        host, assistant, before = self.model, self.assistant, self.model.active_adapter
        self.background_host = host  # the first agent's model, whichever agent is current when the run ends

        def work(twin: HuggingFaceWrapper, progress: Callable[[dict[str, Any]], None],
                 stop: threading.Event) -> tuple[FineTuneResult, PreparedReport | None]:
            result = twin.fine_tune(None, config, progress=progress, stop=stop)
            if result.reused:
                return result, None
            loop = asyncio.new_event_loop()  # the chat's loop belongs to the main thread

            def answer(prompts: list[str], adapters: list[str | None]) -> list[str]:
                assert self.background is not None
                self.background.pause()  # a reply waiting for its turn goes first
                return self._answers(prompts, adapters, model=twin, loop=loop, assistant=assistant)

            try:
                return result, self.prepare_report(result, before, config.get("probes"), probe_count, answer)
            except KeyboardInterrupt:  # stopped while probing: the adapter is complete and saved, only the report is not
                return result, None
            finally:
                loop.close()

        self.background = BackgroundFineTune(host, work)  # started at the first prompt (run)
        if announce:
            self.print(BACKGROUND_LINE)
        return True

    def _background_running(self) -> bool:
        return self.background is not None and not self.background.done

    def _turn(self) -> Any:
        """While the background run is going, a reply or command takes its turn on the CPU (see Turns)."""
        if not self._background_running():
            return contextlib.nullcontext()
        assert self.background is not None
        stack = contextlib.ExitStack()
        stack.enter_context(self.background.turns.reply())
        stack.enter_context(own_random_state())
        return stack

    def _background_news(self, status: bool) -> None:
        """Between replies: swap in a finished run's adapter (with its report), or show one status line."""
        if self.background is None:
            return
        if not self.background.done:
            if status:
                self.print(f"[dim]{plain(self.background.status())}[/]")
            return
        outcome, self.background = self.background.outcome, None
        if outcome is not None:
            self._adopt(outcome)

    def _adopt(self, outcome: Outcome) -> None:
        """The run's adapter into the serving model (loaded from the folder the run saved), then its report."""
        if outcome.error is not None:
            self.internal_error("The start-up fine-tune", outcome.error)
            return
        if outcome.result is None:
            self.error(f"{outcome.message} Chatting with the weights loaded before it.")
            return
        result = outcome.result
        note = f"reused {result.run_dir.name}" if result.reused else f"trained {result.run_dir.name} (background)"
        assert self.background_host is not None
        try:
            record = self.background_host.load_adapter(result.adapter_dir, note=note)
        except UserError as e:
            self.error(f"The start-up fine-tune finished, but its adapter could not be loaded: {e}")
            return
        if result.reused:
            self.print(f"Reused the adapter of an identical earlier run: {plain(str(result.run_dir))} "
                       "(add force_retrain=true to train again).")
        elif outcome.report is not None:
            self.show_report(outcome.report)
        self.print(f"The start-up fine-tune finished: now serving adapter [bold]{plain(record.name)}[/]. "
                   "The conversation is kept.")

    def _end_background(self) -> None:
        """Leaving the chat: stop a running start-up fine-tune at its next step and say where it stopped."""
        if self.background is None:
            return
        background, self.background = self.background, None
        if background.started and not background.done:
            self.print("Stopping the start-up fine-tune...")
        outcome = background.finish()
        if outcome is None:
            return
        if outcome.result is not None:
            self.print(f"The start-up fine-tune had finished: its adapter is in {plain(str(outcome.result.adapter_dir))} "
                       "(the next start reuses it).")
        elif outcome.error is not None:
            self.internal_error("The start-up fine-tune", outcome.error)
        elif outcome.stopped:  # the user is leaving: where it stopped is news, not an error
            self.print(plain(str(outcome.message)))
        else:
            self.error(str(outcome.message))

    def _output_dir(self) -> Path:
        return output_dir(self.base_config)

    # ------------------------------------------------------------------------------------------- commands

    def cmd_help(self, args: list[str]) -> None:
        table = Table(show_header=False, box=None)
        for usage, what in HELP:
            table.add_row(f"[bold]{plain(usage)}[/]", plain(what))
        self.print(table)
        self.print('Arguments are shell-style words: quote a folder or text with spaces or apostrophes '
                   '(/save "my adapter").')

    def cmd_finetune(self, args: list[str]) -> None:
        data_path, pairs = self._split_data_and_pairs(args)
        self._fine_tune(data_path, self._config_with(pairs, own_data=bool(data_path)))

    def cmd_compare(self, args: list[str]) -> None:
        prompt = " ".join(args) or self._last_turn()[1]
        current = self.model.active_adapter
        if current is None:
            raise CommandError("No adapter is active, so base and current are the same model. Fine-tune first.")
        base_answer, tuned_answer = self._answers([prompt, prompt], [None, current])  # one batch
        table = Table(title=cell(f"/compare: {prompt}"), show_lines=True)
        table.add_column("base")
        table.add_column(cell(current))
        table.add_row(cell(base_answer), cell(tuned_answer))
        self.print(table)

    def cmd_dryrun(self, args: list[str]) -> None:
        data_path, pairs = self._split_data_and_pairs(args)
        dry = self.model.dry_run(data_path, self._config_with(pairs, own_data=bool(data_path)))
        lengths = dry.lengths
        self.print(plain(dry.data.describe()))
        self.print(f"tokens per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
                   f"{dry.truncated} of {len(lengths)} rows longer than max_length={dry.max_length}; "
                   f"{dry.mask_description}")
        text, shown, chars, lines = Text(), 0, 0, 0
        for piece, loss in dry.segments:
            chars, lines = chars + len(piece), lines + piece.count("\n")
            if chars > DRYRUN_CHARS or lines > DRYRUN_LINES:
                break
            text.append(piece, style="bold black on green" if loss else "dim")
            shown += 1
        self.print(getattr(dry, "heading", "First example (highlighted tokens carry loss):"))
        self.print(text)
        if shown < len(dry.segments):
            total = sum(len(piece) for piece, _ in dry.segments)
            tokens = getattr(dry, "tokens", 0) or len(dry.segments)
            self.print(f"(cut to a screenful: {len(text):,} of {total:,} characters, {shown:,} of "
                       f"{tokens:,} tokens shown)")
        if dry.loss_tokens == 0:
            self.error("No token of this example carries loss: training would learn nothing.")

    def cmd_adapters(self, args: list[str]) -> None:
        table = Table(title="Adapters (/use <name>, /use base, /undo)")
        for column in ("", "name", "from", "path", "note"):
            table.add_column(column)
        active = self.model.active_adapter
        table.add_row("*" if active is None else "", "base", "",
                      cell(self.model.source.path if self.model.source else ""), "the loaded model without adapter")
        for record in self.model.adapters.values():
            table.add_row("*" if record.name == active else "", cell(record.name), cell(record.parent or "base"),
                          cell(str(record.path)), cell(record.note))
        self.print(table)

    def cmd_use(self, args: list[str]) -> None:
        if len(args) != 1:
            raise CommandError("Usage: /use <name|base> (see /adapters).")
        self.model.use_adapter(args[0])
        self.print(f"Now serving {plain(args[0])}.")

    def cmd_undo(self, args: list[str]) -> None:
        previous = self.model.undo()
        self.print(f"Now serving {plain(previous or 'base')}.")

    def cmd_load(self, args: list[str]) -> None:
        target = self._folder(args, "/load <model id | model folder | adapter folder>")
        if target is None:
            raise CommandError("Usage: /load <model id | model folder | adapter folder>.")
        if (target / "adapter_config.json").exists():
            record = self.model.load_adapter(target, note=f"/load {target}")
            self.print(f"Adapter {plain(record.name)} loaded and active.")
            return
        # Model and tokenizer load and are checked together; on failure the current ones keep serving.
        if target.exists():
            self.model.load_model(None, str(target))
        else:
            self.model.load_model(args[0])
        self.print(f"Loaded {plain(self.model.source.describe() if self.model.source else args[0])}; "
                   "the conversation is kept.")

    def cmd_save(self, args: list[str]) -> None:
        dest = self._folder(args, "/save [folder]")
        if self.model.active_adapter is None:
            raise CommandError("No adapter is active; nothing to save (the base model is unchanged).")
        dest = dest or self._default_dest("adapter")
        if dest.exists() and any(dest.iterdir()):
            raise CommandError(f"{dest} already exists and is not empty; choose a new folder.")
        path = self.model.save_adapter(dest)
        self.print(f"Saved adapter {self.model.active_adapter} + tokenizer to {plain(str(path))}.")

    def cmd_export(self, args: list[str]) -> None:
        if args[:1] == ["gguf"]:
            self.cmd_export_gguf(args[1:])
            return
        dest = self._folder(args, "/export [folder]") or self._default_dest("merged")
        if dest.exists():
            raise CommandError(f"{dest} already exists; choose a new folder.")
        started = time.perf_counter()
        path = self.model.export_merged(dest)
        diff = self.model.verify_export(path)
        record_last_export(self._output_dir(), path)
        self.print(f"Exported merged model to {plain(str(path))} in {time.perf_counter() - started:.1f} s; "
                   f"loaded back: max logit difference {diff:.2e} vs base+adapter.")

    def cmd_export_gguf(self, args: list[str]) -> None:
        usage = "/export gguf [folder] [type=f16|q8_0]"
        settings = dict(split_assignment(a) for a in args if "=" in a)
        unknown = [key for key in settings if key != "type"]
        if unknown:
            raise CommandError(f"Unknown setting(s) {', '.join(unknown)} for {usage}; only type=f16 or type=q8_0.")
        out_type = str(settings.get("type", "q8_0")).lower()
        dest = self._folder([a for a in args if "=" not in a], usage) or self._default_dest(f"gguf-{out_type}")
        started = time.perf_counter()
        self.print("Merging, writing the GGUF, then loading it back to check...")
        result = self.model.export_gguf(dest, out_type, system_prompt=self.assistant.sys_prompt)
        record_last_export(self._output_dir(), result.folder)
        self.print(f"Exported {plain(str(result.gguf_path))} ({result.size_mb:.0f} MB, {out_type}) + Modelfile + "
                   f"README.md in {time.perf_counter() - started:.1f} s.")
        self.print(plain(result.check.line()))

    def _default_dest(self, kind: str) -> Path:
        base = self._output_dir()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return base / f"{stamp}-{self.model.active_adapter or 'base'}-{kind}"

    def cmd_system(self, args: list[str]) -> None:
        if not args:
            self.print(f"System prompt: {plain(self.assistant.sys_prompt)}")
            return
        self.assistant.sys_prompt = " ".join(args)
        self.print("System prompt updated.")

    def cmd_set(self, args: list[str]) -> None:
        if not args:
            self.print(plain(str(self.model.parameters.model_dump())))
            return
        updates = {}
        for pair in args:
            if "=" not in pair:
                raise CommandError(f"'{pair}' is not key=value; e.g. /set temperature=0.2 max_length=128.")
            key, value = split_assignment(pair)
            updates[key] = value
        fields = type(self.model.parameters).model_fields
        unknown = [k for k in updates if k not in fields]
        if unknown:
            raise CommandError(f"Unknown setting(s) {', '.join(unknown)}; valid: {', '.join(fields)}.")
        try:
            parameters = type(self.model.parameters).model_validate({**self.model.parameters.model_dump(), **updates})
        except ValidationError as e:
            raise CommandError(f"Invalid value ({describe_validation(e)}).") from None
        wrong = number_problems([], set={key: getattr(parameters, key) for key in updates})  # unbounded fields
        if wrong:
            raise CommandError(f"Invalid value ({'; '.join(p.removeprefix('set.') for p in wrong)}).")
        self.model.parameters = parameters
        self.print(f"Settings: {plain(str(self.model.parameters.model_dump()))}")

    def cmd_reset(self, args: list[str]) -> None:
        self.assistant.state.context.clear()
        if self.session_log:
            self.session_log.reset(self.assistant.name)
        self.print("Conversation cleared.")

    def cmd_history(self, args: list[str]) -> None:
        history = self.assistant.history()
        if not history:
            self.print("(no messages yet)")
        for m in history:
            self.print(f"[bold]{m['role']}:[/] {plain(m['content'])}")
