"""Every chat session, written as it goes, in the dataset format `fine_tune` reads: learn from the agent's own runs.

One JSON line per exchange (the user's message, the assistant's tool calls and their results, the final reply),
OpenAI `messages` form with a `tools` column when tools were offered:

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "tool_calls": [...]},
                  {"role": "tool", "name": "calculator", "content": "8827"}, {"role": "assistant", ...}],
     "tools": [{"type": "function", "function": {...}}]}

Before the exchange come the chat's previous CONTEXT_EXCHANGES logged exchanges, their assistant turns with
`"weight": 0`: the model learns each exchange once, in the conversation it answered in (trained only on single
exchanges, SmolLM2 stopped calling the calculator after a chat's first question). `/reset` starts afresh.

The log holds what the user accepted: a reply replaced by `/teach <answer>` is replaced by the taught answer (in its
own row and in the context of later ones), a reply marked `/bad` (or replaced by `/teach call`) keeps `"weight": 0`
(untrained), `/good` trains it again. `/finetune runs/session-<stamp>-<id>.jsonl` trains on it as it is. The chat
leaves out an exchange whose reply was cut at `max_length` (it would teach replies that stop mid-sentence). The file
is created exclusively with a unique id (two chats started in the same second never share one) and appended line by
line (a crash loses at most the exchange in progress); a verdict rewrites it atomically.

A log that cannot be written (`runs` is a file, a read-only folder, a full disk) is never the chat's failure: each
method returns the problem as text, and the chat warns once and goes on without a log.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hfmodel.common import write_text_atomic

CONTEXT_EXCHANGES = 2  # earlier exchanges written before each one as context (the demo's rows hold one to three)


@dataclass
class Exchange:
    """One logged exchange: its row in the file, and where the exchange's own messages start in the row."""

    agent: str
    user_id: str  # the AgentScope id of the exchange's user message: how a verdict finds it
    row: dict[str, Any]
    start: int
    chat: list[dict[str, Any]]  # the exchange's own messages (also the context of the agent's next exchanges)


class SessionLog:
    """Appends each finished exchange of one chat session to `folder/session-<stamp>-<id>.jsonl`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._path: Path | None = None  # created when the chat starts: a start that fails leaves nothing behind
        self.exchanges: list[Exchange] = []
        self._recent: dict[str, list[list[dict[str, Any]]]] = {}  # per agent: its last CONTEXT_EXCHANGES exchanges

    def reset(self, agent: str = "") -> None:
        """`agent`'s conversation was cleared: its next exchange has no context."""
        self._recent.pop(agent, None)

    @property
    def path(self) -> Path:
        """The session's file, created (exclusively: never someone else's file) on first use."""
        if self._path is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            path = self.folder / f"session-{stamp}-{uuid.uuid4().hex[:6]}.jsonl"
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            self._path = path
        return self._path

    def start(self) -> str | None:
        """Create the file now; the problem if it cannot be (see `problem`)."""
        try:
            _ = self.path
        except OSError as e:
            return self.problem(e)
        return None

    def problem(self, error: OSError) -> str:
        """One line: which folder cannot hold the log, and why."""
        if self.folder.exists() and not self.folder.is_dir():
            return f"{self.folder} is a file, not a folder"
        return f"{error.filename or self.folder}: {error.strerror or error}"

    async def record(self, system_prompt: str, messages: list[Any], tools: list[dict] | None,
                     agent: str = "") -> str | None:
        """Append one exchange: `messages` are the AgentScope Msgs it added to `agent`'s conversation (in a team
        chat each agent has its own, so its own earlier exchanges are its context). Returns the problem, if the
        file could not be written."""
        from hfmodel.replies import chat_messages

        if not messages:
            return None
        chat = await chat_messages(messages)
        recent = self._recent.get(agent, [])
        context = [{**m, "weight": 0} if m["role"] == "assistant" else m for exchange in recent for m in exchange]
        row: dict[str, Any] = {"messages": [{"role": "system", "content": system_prompt}, *context, *chat]}
        if tools:
            row["tools"] = tools
        self._recent[agent] = [*recent, chat][-CONTEXT_EXCHANGES:]
        self.exchanges.append(Exchange(agent, str(messages[0].id), row, 1 + len(context), chat))
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:
            return self.problem(e)
        return None

    def replace(self, user_id: str, answer: str) -> str | None:
        """`/teach <answer>`: the exchange's reply (its calls and results too) becomes the taught answer."""
        exchange = self._find(user_id)
        if exchange is None:
            return None
        exchange.chat[1:] = [{"role": "assistant", "content": answer}]  # in place: later context sees it too
        exchange.row["messages"][exchange.start:] = exchange.chat
        return self._rewrite()

    def judge(self, user_id: str, trained: bool) -> str | None:
        """`/good` (trained) or `/bad` (`"weight": 0`: kept as it was said, never trained) for the exchange's reply."""
        exchange = self._find(user_id)
        if exchange is None:
            return None
        for message in exchange.chat:
            if message["role"] == "assistant":
                if trained:
                    message.pop("weight", None)
                else:
                    message["weight"] = 0
        exchange.row["messages"][exchange.start:] = exchange.chat
        return self._rewrite()

    def _find(self, user_id: str) -> Exchange | None:
        """The logged exchange that began with this user message (None: it was not logged, e.g. cut)."""
        return next((e for e in reversed(self.exchanges) if e.user_id == user_id), None)

    def _rewrite(self) -> str | None:
        try:
            write_text_atomic(self.path, "".join(json.dumps(e.row, ensure_ascii=False) + "\n"
                                                 for e in self.exchanges))
        except OSError as e:
            return self.problem(e)
        return None
