"""Between AgentScope and the engine: AgentScope messages (with tool calls and results) as the chat template's
messages, which tools to offer (`tool_choice`), and replies read back into text and `ToolCallBlock`s, streamed or
whole, with transformers' response parser. A reply whose call markup does not parse stays text, with a warning.
A call that repeats one of the same turn that failed, or that a pure tool already answered, is not run again: the
model answers without tools."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass
from typing import Any

from agentscope.message import TextBlock, ToolCallBlock
from agentscope.model import ChatResponse, ChatUsage

from hfmodel.chat_format import ChatFormat
from hfmodel.common import logger
from hfmodel.generation import Generated
from hfmodel.tool_schema import call_problem

Chat = list[dict[str, Any]]
_warned: set[str] = set()


def warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def template_messages(formatted: list[dict[str, Any]]) -> Chat:
    """AgentScope's Ollama-formatted messages as chat-template messages: a call is
    `{"type": "function", "function": {"name", "arguments": dict}}`, a result `{"role": "tool", "name", "content"}`;
    the calls of one turn (one message each in Ollama's format) become one assistant message."""
    out: Chat = []
    for m in formatted:
        message: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            message["tool_calls"] = [{"type": "function", "function": {
                "name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}}
                for c in m["tool_calls"]]
            previous = out[-1] if out else None
            if previous and previous["role"] == "assistant" and previous.get("tool_calls") and not message["content"]:
                previous["tool_calls"] += message["tool_calls"]
                continue
        if m["role"] == "tool":
            message["name"] = m.get("tool_name") or m.get("name") or ""
        out.append(message)
    return out


async def chat_messages(messages: list[Any]) -> Chat:
    """AgentScope messages as chat-template messages (tool calls and results included), as the model sees them."""
    from agentscope.formatter import OllamaChatFormatter

    return template_messages(await OllamaChatFormatter().format(messages))


def result_text(block: Any) -> str:
    """A tool result block's output as text."""
    return block.output if isinstance(block.output, str) else " ".join(getattr(b, "text", "") for b in block.output)


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value or "{}")
    except (TypeError, json.JSONDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def offered_tools(tools: list[dict] | None, tool_choice: Any, fmt: ChatFormat) -> list[dict] | None:
    """The tool schemas to render: none for `tool_choice` "none", only the named ones when it names tools, and
    none (with one warning) when this model's template cannot render tools or its replies cannot be parsed."""
    if not tools:
        return None
    mode = getattr(tool_choice, "mode", tool_choice)
    names = getattr(tool_choice, "tools", None)
    if mode == "none":
        return None
    if isinstance(mode, str) and mode not in ("auto", "required"):
        names = [mode]  # a tool name: only that tool is offered (generation cannot force the call)
    if names:
        tools = [t for t in tools if _name(t) in set(names)]
    if not fmt.tools_supported():
        warn_once("no-tools", "Tools are not offered to this model: its chat template cannot render or read tool "
                  "calls (see the log line above).")
        return None
    return tools or None


def _name(schema: dict) -> str:
    return str(schema.get("function", schema).get("name", ""))


CallKey = tuple[str, str]  # a call's tool name and its arguments as canonical JSON


def _key(name: str, arguments: Any) -> CallKey:
    return name, json.dumps(_arguments(arguments), sort_keys=True, ensure_ascii=False)


def settled_calls(messages: list[Any], pure: Collection[str] = ()) -> set[CallKey]:
    """The calls of the current turn (the messages after the last user message) that running again would not change:
    those that failed (a tool that raised or that the user refused, AgentScope's ERROR and DENIED states, or a result
    text that starts with "error", the calculator's answer to bad input), and those of a `pure` tool (its result
    depends only on its arguments, like the calculator's) that returned a result."""
    start = max((i for i, m in enumerate(messages) if getattr(m, "role", None) == "user"), default=-1) + 1
    made: dict[str, CallKey] = {}
    settled: set[CallKey] = set()
    for message in messages[start:]:
        for block in message.get_content_blocks():
            if block.type == "tool_call":
                made[block.id] = _key(block.name, block.input)
            elif block.type == "tool_result" and block.id in made:
                failed = block.state in ("error", "denied") or result_text(block).lstrip().lower().startswith("error")
                if failed or made[block.id][0] in pure:
                    settled.add(made[block.id])
    return settled


def without_repeats(blocks: list[Any], settled: set[CallKey]) -> tuple[list[Any], bool]:
    """`blocks` less the calls that repeat a settled call of this turn (the same tool, the same arguments: it would
    fail again, or give the result the model already has; small models repeat such calls until the agent's round
    limit), and whether only repeats were called."""
    calls = [b for b in blocks if isinstance(b, ToolCallBlock)]
    repeats = [b for b in calls if _key(b.name, b.input) in settled]
    for call in repeats:
        logger.info("%s(%s) already ran in this turn; not run again.", call.name, call.input)
    kept = [b for b in blocks if not any(b is r for r in repeats)]
    return kept, bool(repeats) and len(repeats) == len(calls)


def call_blocks(calls: list[dict], tools: list[dict] | None) -> list[ToolCallBlock | TextBlock]:
    """Parsed calls as ToolCallBlocks; a call to a tool that was not offered becomes text, with a warning."""
    known = {_name(t) for t in tools or []}
    blocks: list[ToolCallBlock | TextBlock] = []
    for call in calls:
        if call["name"] not in known:
            logger.warning("The model called %r, which is not one of the offered tools (%s); shown as text.",
                           call["name"], ", ".join(sorted(known)) or "none")
            blocks.append(TextBlock(text=json.dumps(call, ensure_ascii=False)))
            continue
        blocks.append(ToolCallBlock(id=f"call-{uuid.uuid4().hex[:12]}", name=call["name"],
                                    input=json.dumps(call["arguments"], ensure_ascii=False)))
    return blocks


def whole_reply(fmt: ChatFormat, text: str, chat: Chat, tools: list[dict] | None,
                on_unread: Callable[[], None] | None = None) -> list[Any]:
    """A complete reply as content blocks: the text, then any tool calls. `on_unread` is called when call markup
    could not be read (the reply then stays text)."""
    if not tools:
        return [TextBlock(text=text)]
    try:
        content, calls, problem = fmt.parse_reply(text, fmt.prompt_text(chat, tools), tools)
    except RecursionError:  # JSON nested thousands deep: the parser's own recursion gave up
        content, calls, problem = text, [], NESTED_TOO_DEEP
    misfit = schema_problem(calls, tools)
    if misfit:  # a call that does not fit its tool is not run: the whole reply stays text
        content, calls, problem = text, [], misfit
        logger.warning("A tool call in the reply could not be read (%s); kept as text.", problem[:200])
        if on_unread:
            on_unread()
    blocks: list[Any] = [TextBlock(text=content.strip())] if content.strip() or not calls else []
    return blocks + call_blocks(calls, tools)


def schema_problem(calls: list[dict], tools: list[dict] | None) -> str | None:
    """The first parsed call whose arguments do not fit its tool's schema (a call to a tool that was not offered
    is `call_blocks`' matter)."""
    return next((p for c in calls if (p := call_problem(c["name"], c["arguments"], tools))), None)


@dataclass
class BatchReply:
    """One reply of `HuggingFaceWrapper.generate_batch`: its text (without call markup), the tool calls it made,
    all its content blocks in order (what an agent would receive) and its token counts."""

    text: str
    tool_calls: list[ToolCallBlock]
    blocks: list[Any]
    input_tokens: int
    output_tokens: int


def batch_reply(fmt: ChatFormat, generated: Generated, chat: Chat, tools: list[dict] | None,
                on_unread: Callable[[], None] | None = None) -> BatchReply:
    blocks = whole_reply(fmt, generated.text, chat, tools, on_unread)
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    return BatchReply(text, [b for b in blocks if isinstance(b, ToolCallBlock)], blocks, generated.input_tokens,
                      generated.output_tokens)


def answer_overrides(fmt: ChatFormat, overrides: dict[str, Any], tools: list[dict] | None) -> dict[str, Any]:
    """Generation arguments for the answer asked for after a repeated call: without tools, and the reply may not
    open with a call (a tuned model that repeats a call writes its markup again even with no tools offered)."""
    start = fmt.call_start_tokens(tools) if tools else []
    return {**overrides, "begin_suppress_tokens": start} if start else overrides


def words_only(blocks: list[Any]) -> list[Any]:
    """The text blocks of an answer that had to be words; a call in it is not run."""
    for block in blocks:
        if isinstance(block, ToolCallBlock):
            logger.info("%s(%s) in the answer asked for without tools; not run.", block.name, block.input)
    return [b for b in blocks if isinstance(b, TextBlock)]


UNREADABLE = (ValueError, TypeError, KeyError, RecursionError)  # what reading call markup may raise: kept as text
NESTED_TOO_DEEP = "RecursionError: the call's JSON is nested too deeply"


def _why(error: Exception) -> str:
    return NESTED_TOO_DEEP if isinstance(error, RecursionError) else f"{type(error).__name__}: {error}"


class StreamReader:
    """Reads a streamed reply: text pieces pass straight on (call markup held back and parsed), calls at the end.

    Without tools every piece is text. With tools, transformers' streaming ResponseParser routes the pieces: the
    content region streams as text, tool-call regions are collected. If the markup does not parse, the raw text
    of the unread part is shown instead, with a warning.
    """

    def __init__(self, fmt: ChatFormat, chat: Chat, tools: list[dict] | None) -> None:
        self.tools = tools
        self.raw: list[str] = []
        self.shown = 0  # characters of `raw` already passed on as text (without tools)
        self.parser = fmt.reply_parser(fmt.prompt_text(chat, tools), tools) if tools else None
        self.calls: list[dict] = []
        self.failed: str | None = None
        self.text_out: list[str] = []

    def feed(self, piece: str) -> str:
        """The text of `piece` to show now."""
        self.raw.append(piece)
        if self.parser is None or self.failed:
            return piece if self.parser is None else ""
        try:
            return self._route(self.parser.feed(piece))
        except UNREADABLE as e:
            self.failed = _why(e)
            return ""

    def finish(self) -> list[Any]:
        """What is left: unshown text (all of the rest, if the markup failed to parse) and the tool calls."""
        if self.parser is None:
            return []
        tail = ""
        if not self.failed:
            try:
                _, events = self.parser.finalize()
                tail = self._route(events)
            except UNREADABLE as e:
                self.failed = _why(e)
            self.failed = self.failed or schema_problem(self.calls, self.tools)
        if self.failed:
            logger.warning("A tool call in the reply could not be read (%s); kept as text.", self.failed[:200])
            shown = "".join(self.text_out)
            raw = "".join(self.raw)
            tail = raw[len(shown):] if raw.startswith(shown) else raw
            self.calls = []
        blocks: list[Any] = [TextBlock(text=tail)] if tail else []
        return blocks + call_blocks(self.calls, self.tools)

    def _route(self, events: list[dict]) -> str:
        text = []
        for event in events:
            if event["type"] == "region_chunk" and event["field"] == "content":
                text.append(event["text"])
            elif event["type"] == "region_close" and event["field"] == "tool_calls":
                self.calls += _calls_of(event["value"])
        out = "".join(text)
        self.text_out.append(out)
        return out


def _calls_of(value: Any) -> list[dict]:
    from hfmodel.chat_format import message_parts

    _, calls, problem = message_parts({"tool_calls": value if isinstance(value, list) else [value]}, "")
    if problem:
        raise ValueError(problem)
    return calls


async def stream_responses(engine: Any, fmt: ChatFormat, parameters: Any, chat: Chat, overrides: dict[str, Any],
                           tools: list[dict] | None, on_unread: Callable[[], None] | None = None,
                           settled: set[CallKey] | None = None) -> AsyncGenerator[ChatResponse, None]:
    """The engine's stream as AgentScope chunks: text as it comes (call markup held back), then the tool calls and
    the usage. Every text chunk carries the same block id, so AgentScope joins them into one text block.
    `on_unread` is called when call markup could not be read (shown as text instead). When the reply only repeats
    calls in `settled` (see `settled_calls`), the model is asked again without tools and that answer streams on."""
    started = time.perf_counter()
    block_id, response_id = f"hf-{time.time_ns()}", f"reply-{time.time_ns()}"
    reader = StreamReader(fmt, chat, tools)
    async for item in engine.stream(chat, parameters, overrides, tools):
        if isinstance(item, Generated):
            blocks = reader.finish()
            if reader.failed and on_unread:
                on_unread()
            blocks, only_repeats = without_repeats(blocks, settled or set())
            for block in blocks:
                if isinstance(block, TextBlock):
                    block = TextBlock(text=block.text, id=block_id)
                yield ChatResponse(content=[block], is_last=False, id=response_id)
            if only_repeats:  # the usage is the answer's: its output tokens tell whether it was cut at max_length
                answer = StreamReader(fmt, chat, tools)  # call markup in the answer is held back, and not run
                async for again in engine.stream(chat, parameters, answer_overrides(fmt, overrides, tools), None):
                    if isinstance(again, Generated):
                        item = again
                    elif text := answer.feed(again):
                        yield ChatResponse(content=[TextBlock(text=text, id=block_id)], is_last=False,
                                           id=response_id)
                for block in words_only(answer.finish()):
                    yield ChatResponse(content=[TextBlock(text=block.text, id=block_id)], is_last=False,
                                       id=response_id)
            yield ChatResponse(content=[], is_last=False, id=response_id, usage=usage(item, started))
        elif text := reader.feed(item):
            yield ChatResponse(content=[TextBlock(text=text, id=block_id)], is_last=False, id=response_id)


def usage(reply: Generated, started: float) -> ChatUsage:
    return ChatUsage(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
                     time=time.perf_counter() - started)
