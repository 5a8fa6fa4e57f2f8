"""Every chat session, written as it goes, in the dataset format `fine_tune` reads: learn from the agent's own runs.

One JSON line per exchange (the user's message, the assistant's tool calls and their results, the final reply),
OpenAI `messages` form with a `tools` column when tools were offered:

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "tool_calls": [...]},
                  {"role": "tool", "name": "calculator", "content": "8827"}, {"role": "assistant", ...}],
     "tools": [{"type": "function", "function": {...}}]}

Before the exchange come the chat's previous CONTEXT_EXCHANGES logged exchanges, their assistant turns with
`"weight": 0`: the model learns each exchange once, in the conversation it answered in (trained only on single
exchanges, SmolLM2 stopped calling the calculator after a chat's first question). `/reset` starts afresh.

`/finetune runs/session-<stamp>-<id>.jsonl` trains on it as it is. The chat leaves out an exchange whose reply was cut
at `max_length` (it would teach replies that stop mid-sentence). The file is created exclusively with a unique id
(two chats started in the same second never share one) and appended line by line (a crash loses at most the
exchange in progress).
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

CONTEXT_EXCHANGES = 2  # earlier exchanges written before each one as context (the demo's rows hold one to three)


class SessionLog:
    """Appends each finished exchange of one chat session to `folder/session-<stamp>-<id>.jsonl`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._path: Path | None = None  # created when the chat starts: a start that fails leaves nothing behind
        self.exchanges = 0
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

    async def record(self, system_prompt: str, messages: list[Any], tools: list[dict] | None, agent: str = "") -> None:
        """Append one exchange: `messages` are the AgentScope Msgs it added to `agent`'s conversation (in a team
        chat each agent has its own, so its own earlier exchanges are its context)."""
        from hfmodel.replies import chat_messages

        if not messages:
            return
        chat = await chat_messages(messages)
        recent = self._recent.get(agent, [])
        context = [{**m, "weight": 0} if m["role"] == "assistant" else m for exchange in recent for m in exchange]
        row: dict[str, Any] = {"messages": [{"role": "system", "content": system_prompt}, *context, *chat]}
        if tools:
            row["tools"] = tools
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.exchanges += 1
        self._recent[agent] = [*recent, chat][-CONTEXT_EXCHANGES:]
