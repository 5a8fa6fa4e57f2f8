"""The chat's start: load the model, show the prompt, and import AgentScope and build the agents while the user types.

Importing AgentScope costs about 1.2 s on 2 cores (its package imports openai and mcp) and holds the GIL, so it
cannot overlap the model load; the user's typing can. So the model loads first (`hfmodel.preload`, torch and
transformers only), the usual opening lines and the prompt follow, and a thread imports AgentScope and builds the
wrapper, the agents and the session meanwhile; the first line is handled once that thread has finished. Where the
start has more to do before the chat can answer (an adapter to load, int8 weights to check, a start-up fine-tune to
wait for, a toolkit that is not plain functions), everything is built first and the prompt follows, as before.

This module imports AgentScope (and what needs it) only inside its functions.
"""

from __future__ import annotations

import inspect
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from chat.session_log import SessionLog
from chat.terminal import UserAgent
from hfmodel.common import (
    Sanitized,
    UserError,
    check_writable_folder,
    failure_line,
    log_traceback,
    quiet_agentscope,
    redact,
    safe_text,
)
from hfmodel.int8 import INT8
from hfmodel.settings import FineTuneConfig, merge_config

if TYPE_CHECKING:
    from chat.team_chat import TeamChatSession
    from hfmodel.preload import Preloaded

START_THREAD = "chat-start"  # imports AgentScope and builds the agents while the first prompt waits
BACKGROUND_LINE = ("The start-up fine-tune runs in the background; replies use the loaded weights until its adapter "
                   "is swapped in between two replies (set startup_fine_tune = \"wait\" to wait for it instead).")


NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
AGENT_KEYS = ("name", "sys_prompt", "adapter", "data_path")


class TeamError(UserError):
    """A wrong `agents` entry or team command; the message says what to change."""


def check_entries(entries: list[dict[str, Any]]) -> None:
    """Every problem of the `agents` list at once, each naming the entry and the fix."""
    problems, seen = [], set()
    if not entries:
        problems.append("`agents` is empty: give at least one {\"name\": ..., \"sys_prompt\": ...}")
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(AGENT_KEYS))
        if unknown:
            problems.append(f"agents[{i}] has unknown key(s) {', '.join(unknown)}; valid: {', '.join(AGENT_KEYS)}")
        name = str(entry.get("name", ""))
        if not NAME_PATTERN.match(name) or name.lower() == "all":
            problems.append(f"agents[{i}] name {name!r} must be a word of letters, digits, - or _ "
                            "(starting with a letter; not 'all'), so that @Name can address it")
        elif name.lower() in seen:
            problems.append(f"agents[{i}] name {name!r} is used twice")
        seen.add(name.lower())
        if not isinstance(entry.get("sys_prompt"), str):
            problems.append(f"agents[{i}] ({name or 'unnamed'}) needs a \"sys_prompt\" string")
        adapter = entry.get("adapter")
        if adapter is not None and not (Path(adapter).expanduser() / "adapter_config.json").exists():
            problems.append(f"agents[{i}] adapter {adapter!r} is not an adapter folder (no adapter_config.json)")
    if problems:
        raise TeamError("Invalid `agents`: " + "; ".join(problems) + ".")


def plain(text: str) -> str:
    """Data or model text inside a markup string: control characters stripped, then markup escaped."""
    return escape(safe_text(text))


def output_dir(config: dict[str, Any]) -> Path:
    """Where runs, session logs and error logs go: the configured `training_args.output_dir` (default runs/)."""
    ftc = config.get("fine_tune_config") or {}
    return Path((ftc.get("training_args") or {}).get("output_dir", "runs")).expanduser()


def opening_lines(agents: list[str], model: str, tools: list[str], log: SessionLog | None
                  ) -> tuple[list[str], SessionLog | None]:
    """What the chat shows before its first prompt: the agents, the model, the tools and where the conversation is
    saved. Creates the session log's file; a log that cannot be written is one warning, and None comes back."""
    lines = []
    if len(agents) > 1:
        lines.append(f"Agents: {plain(', '.join(agents))} (one base model, each with its own adapters); plain messages "
                     f"go to {plain(agents[0])}; @Name or @all to address others.")
    lines.append(f"[bold]{plain(agents[0])}[/] is ready ({plain(model)}). Type a message, /help for commands, exit "
                 "to leave.")
    if tools:
        lines.append(f"Tools: {plain(', '.join(tools))}.")
    problem = log.start() if log is not None else None
    if problem:
        lines.append(log_warning(problem))
        log = None
    elif log is not None:
        lines.append(f"This conversation is saved as training data in {plain(str(log.path))} (--no-session-log turns "
                     "that off).")
    return lines, log


def log_warning(problem: str) -> str:
    """A session log that cannot be written is one warning, and the chat goes on without it."""
    return (f"[yellow]warning:[/] cannot write the session log ({plain(problem)}); the chat goes on without it (fix "
            "the folder, set training_args.output_dir, or use --no-session-log).")


def status_line(state: dict[str, Any], seconds: float) -> str:
    """One line: where the background start-up fine-tune is."""
    step, total = state.get("step"), state.get("max_steps")
    where = f"step {step}/{total}" if step is not None and total else "preparing"
    loss = f", loss {state['loss']:.3f}" if isinstance(state.get("loss"), float) else ""
    return (f"(start-up fine-tune running in the background: {where}{loss}, {seconds:.0f} s; replies use the "
            "weights loaded before it until it finishes)")


def check_background_run(fine_tune_config: dict[str, Any]) -> None:
    """What can be checked of a background fine-tune before it starts (field names are checked in the run, once trl
    is imported); a `UserError` naming the problem."""
    FineTuneConfig.from_dict(fine_tune_config, check_fields=False)
    runs = (fine_tune_config.get("training_args") or {}).get("output_dir") or "runs"
    if isinstance(runs, str):
        check_writable_folder(runs, "training_args.output_dir")


def prompt_first(config: dict[str, Any], entries: list[dict[str, Any]], tools: list[Any], mode: str,
                 preloaded: Preloaded) -> bool:
    """True when nothing but AgentScope's import and building the agents is left before the chat can answer."""
    waits = bool(config.get("data_path")) and mode != "background"
    return not (waits or preloaded.source.adapter or config.get("quantization") == INT8
                or any(e.get("adapter") for e in entries) or not all(inspect.isfunction(t) for t in tools))


class Chat:
    """One start of the chat (see the module docstring); `run()` is the chat itself, its exit status returned."""

    def __init__(self, config: dict[str, Any], entries: list[dict[str, Any]], tools: list[Any], mode: str,
                 session_log: bool) -> None:
        self.config, self.entries, self.tools, self.mode = config, entries, tools, mode
        self.log = SessionLog(output_dir(config)) if session_log else None
        self.console = Console(highlight=False)
        self.user = UserAgent(name="User")

    def run(self) -> int:
        from hfmodel.preload import preload

        try:
            check_entries(self.entries)
        except UserError as e:
            return self.error(str(e))
        try:
            preloaded = preload(self.config)
        except Exception as e:  # noqa: BLE001 - a bad entry is one line; our bug is one line and a logged traceback
            return self.failed("Loading the model", e)
        background = bool(self.config.get("data_path")) and self.mode == "background"
        if not prompt_first(self.config, self.entries, self.tools, self.mode, preloaded):
            session = self.build(preloaded, background_line=True)
            return session if isinstance(session, int) else session.run()
        if background:
            try:
                check_background_run(self.startup_config())
            except UserError as e:
                return self.error(str(e))
        lines, self.log = opening_lines([e["name"] for e in self.entries], preloaded.name,
                                        [t.__name__ for t in self.tools], self.log)
        if background:
            lines = [BACKGROUND_LINE, *lines, f"[dim]{plain(status_line({}, 0))}[/]"]
        for line in lines:
            self.console.print(Sanitized(line))
        built: list[Any] = []
        builder = threading.Thread(target=lambda: built.append(self.attempt(preloaded)), name=START_THREAD,
                                   daemon=True)  # `attempt` always appends: a session or an exit status
        builder.start()
        first = self.user.read()  # while AgentScope imports and the agents are built
        try:
            builder.join()
        except KeyboardInterrupt:  # Ctrl-C while the start finishes: leave, as Ctrl-C at the prompt does (a
            first = None  # background run it started is stopped and recorded by the session)
            builder.join()
        session = built[0]
        return session if isinstance(session, int) else session.run(first=first, opened=True)

    def attempt(self, preloaded: Preloaded) -> TeamChatSession | int:
        """`build` on the start thread: its background run starts at once (the main thread waits at the prompt)."""
        try:
            session = self.build(preloaded, background_line=False)
        except Exception as e:  # noqa: BLE001 - our bug: one line and a logged traceback, as on the main thread
            return self.failed("Starting the chat", e)
        if not isinstance(session, int) and session.background is not None:
            session.background.start()
        return session

    def build(self, preloaded: Preloaded, background_line: bool) -> TeamChatSession | int:
        """The wrapper over the preloaded model, the agents and the session (and the start-up fine-tune: waited for,
        or set up to run in the background); an exit status where that failed (its one line printed)."""
        import agentscope  # noqa: F401 - its logger is set up (and quieted) on import

        quiet_agentscope()
        from chat.team import build_team
        from chat.team_chat import TeamChatSession
        from finetune_dialogagent import build_model

        config = self.config
        try:
            # Fine-tune below (not inside the constructor) so the start-up fine-tune shows progress and a report,
            # and Ctrl-C during it leaves a working chat on the base weights.
            model = build_model(config["config_name"], [config], system_prompt=self.entries[0]["sys_prompt"],
                                data_path=None, preloaded=preloaded)
        except Exception as e:  # noqa: BLE001 - see `failed`
            return self.failed("Loading the model", e)
        model.data_path = config.get("data_path")
        try:
            team = build_team(model, self.entries, self.tools)
        except UserError as e:
            return self.error(str(e))
        session = TeamChatSession(team, self.user, base_config=config, toolkit=self.tools, session_log=self.log)
        if model.data_path and not session.startup_fine_tune(self.mode, announce=background_line):
            return 2
        return session

    def startup_config(self) -> dict[str, Any]:
        return merge_config(dict(self.config.get("fine_tune_config") or {}), {})

    def failed(self, what: str, e: Exception) -> int:
        if isinstance(e, UserError):
            return self.error(str(e))
        log = log_traceback(what, e, output_dir(self.config))
        return self.error(failure_line(what, e, log))

    def error(self, message: str) -> int:
        print(f"error: {safe_text(redact(message))}", file=sys.stderr)
        return 2
