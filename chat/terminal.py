"""The terminal's user (`UserAgent`): reads the user's lines.

It imports nothing of the project, and AgentScope only when a line becomes a message, so the chat can show its
prompt while AgentScope is still being imported (chat/startup.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserAgent:
    """Reads the user's turns from the terminal (or any `input_fn`, for tests and scripts)."""

    def __init__(self, name: str = "User", input_fn: Callable[[str], str] | None = None,
                 prompt: str = "User: ") -> None:
        self.name = name
        self.input_fn = input_fn or input
        self.prompt = prompt
        if input_fn is None and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # non-UTF-8 bytes become U+FFFD, not a crash

    def read(self) -> str | None:
        """The next non-empty line; None on `exit` (any case, spaces around it), EOF or Ctrl-C."""
        while True:
            try:
                text = self.input_fn(self.prompt)
            except (EOFError, KeyboardInterrupt):
                return None
            text = text.strip()
            if text.lower() == "exit":
                return None
            if text:
                return text

    def __call__(self) -> Any:
        """The next line as an AgentScope `UserMsg`; None at the end (see `read`)."""
        from agentscope.message import UserMsg

        text = self.read()
        return None if text is None else UserMsg(name=self.name, content=text)
