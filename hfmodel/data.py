"""Dataset normalisation: any supported file or hub dataset -> `messages` rows.

Accepted shapes (detected from the columns, logged once):

| format            | columns                                                          |
|-------------------|------------------------------------------------------------------|
| messages (OpenAI) | `messages`: [{"role": "system"/"user"/"assistant", "content"}]   |
| sharegpt          | `conversations`: [{"from": "human"/"gpt"/"system", "value"}]     |
| lima              | `conversations`: ["user text", "assistant text", ...]            |
| alpaca            | `instruction`, optional `input`, `output` (optional `system`)    |
| prompt-completion | `prompt`, `completion` (strings, or lists of messages)           |

Tool use: `messages` rows may hold assistant `tool_calls` ([{"type": "function",
"function": {"name", "arguments"}}], arguments as an object or its JSON text) and
`tool` messages with the results; ShareGPT rows use `function_call` (value: the
call's JSON) and `observation` turns. A `tools` column (JSON schemas, as a list or
JSON text) lists the tools offered; a call to a tool missing from it, or arguments
that do not fit the tool's JSON schema (hfmodel/tool_schema.py), skip the row.

An assistant message of a `messages` row may carry `"weight": 0` (OpenAI's fine-tuning
format): it stays in the conversation as context but is not trained on (1, the
default, trains it). The session logs give earlier exchanges this way.

Every format becomes a list of chat messages that starts with an optional
system message, alternates user/assistant (a tool-calling turn followed by its
results and the assistant again) and ends on an assistant turn.
Rows that cannot be used (empty or non-string content, unknown roles, no
assistant turn) are skipped and counted; if none is usable the load fails
with `DatasetFormatError`. Nothing from a data file is ever evaluated.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfmodel.chat_format import TOOLS_KEY, trained
from hfmodel.common import UserError
from hfmodel.tool_schema import call_problem

logger = logging.getLogger("huggingface_model")

Message = dict[str, Any]  # role, content; assistant turns may carry tool_calls, tool results a name
Conversation = list[Message]

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

FORMATS = {
    "messages": "`messages`: list of {role, content} (OpenAI)",
    "sharegpt": "`conversations`: list of {from, value} (ShareGPT)",
    "lima": "`conversations`: list of alternating strings (LIMA)",
    "alpaca": "`instruction`, optional `input`, `output` (alpaca)",
    "prompt-completion": "`prompt` and `completion`",
}

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",  # a tool's result (OpenAI); ShareGPT calls it "observation"
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}


class DatasetFormatError(UserError, ValueError):
    """A data file or dataset cannot be turned into chat rows; the message says why and how to fix it."""


@dataclass
class ChatDataset:
    """Normalised conversations plus what was detected and dropped on the way."""

    rows: list[Conversation]
    format: str
    source: str
    skipped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> str:
        text = f"{self.source}: format '{self.format}', {len(self.rows)} usable rows"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values())} ({reasons})"
        return text


# ---------------------------------------------------------------------------------------------
# Loading


def load_chat_dataset(data_path: str, split: str = "train") -> ChatDataset:
    """Load a local json/jsonl/csv/parquet file or a hub dataset id and normalise it."""
    raw_rows = load_rows(data_path, split=split)
    data = normalize_rows(raw_rows, source=str(data_path))
    if getattr(raw_rows, "torn", 0):
        data.skipped[TORN] += raw_rows.torn  # type: ignore[attr-defined]
    logger.info("Dataset %s", data.describe())
    return data


def load_rows(data_path: str, split: str = "train") -> list[dict[str, Any]]:
    """Read raw rows with `datasets`; turn its errors into messages that name the file and the fix."""
    path = Path(os.path.expanduser(str(data_path)))
    if path.suffix.lower() in FILE_LOADERS or path.exists():
        return _load_local(path)
    if looks_like_hub_id(str(data_path)):
        return _load_hub(str(data_path), split)
    raise DatasetFormatError(
        f"Data file not found: {data_path}. Give a path to a .json, .jsonl, .csv or .parquet file "
        "(relative to the folder you run from) or a Hugging Face dataset id like 'user/name'."
    )


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


MAX_NESTING = 32  # a chat row is ~5 levels deep (row -> messages -> message -> content parts -> part)
UTF8_BOM = b"\xef\xbb\xbf"


def _load_local(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DatasetFormatError(
            f"Data file not found: {path}. Check the path (relative paths start from {Path.cwd()})."
        )
    if path.is_dir():
        raise DatasetFormatError(f"{path} is a folder; give one .json, .jsonl, .csv or .parquet file.")
    builder = FILE_LOADERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetFormatError(
            f"Unsupported data file extension '{path.suffix}' ({path}). "
            f"Use one of: {', '.join(sorted(FILE_LOADERS))}."
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetFormatError(f"Cannot read data file {path}: {e.strerror or e}. Check that it is a "
                                 "readable file (permissions, a broken link).") from None
    if not raw.strip():
        raise DatasetFormatError(f"Data file {path} is empty; it needs at least one conversation.")
    options: dict[str, Any] = {}
    if builder != "parquet":
        text = _decode_text(path, raw)
        if raw.startswith(UTF8_BOM):
            options["encoding"] = "utf-8-sig"  # a BOM (Windows editors write one) is skipped, not read as data
        torn = _check_json_syntax(path, text) if builder == "json" else None
        if torn is not None:
            return _without_torn_line(path, text, torn, options)

    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True,
                                        **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        cause = e.__cause__ or e
        raise DatasetFormatError(
            f"Could not read {path}: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}. "
            "Check that every row has the same columns with the same types."
        ) from e
    return _materialize(dataset)


class RawRows(list):
    """A file's raw rows, and how many torn lines were left out on the way (counted in the dataset's summary)."""

    torn = 0


TORN = "torn last line (an interrupted write)"


def _without_torn_line(path: Path, text: str, number: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file whose last line was cut off mid-write (a crash while a chat logged): that line
    is left out, with a warning, and counted; the rest loads as usual (from a copy: the user's file is not touched)."""
    import tempfile

    logger.warning("%s: line %d is cut off (the file ends in the middle of a row, as after a crash while writing); "
                   "skipped it.", path, number)
    kept = "".join(text.splitlines(keepends=True)[:number - 1])
    if not kept.strip():
        raise DatasetFormatError(f"Data file {path} holds only a torn line {number}; it needs a complete row.")
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_text(kept, encoding="utf-8")
        try:
            rows = RawRows(_load_local(copy))
        except DatasetFormatError as e:  # named after the user's file, not the copy
            raise DatasetFormatError(str(e).replace(str(copy), str(path))) from None
    rows.torn = 1
    return rows


def _decode_text(path: Path, raw: bytes) -> str:
    """The file as text: UTF-8 (a leading BOM skipped), or an error that names the file, the place and the fix."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetFormatError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}; probably Latin-1 or "
            f"Windows-1252). Save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`, "
            "or choose UTF-8 when saving from your editor or spreadsheet."
        ) from None


def _parse_json(text: str, path: Path, where: str) -> Any:
    """json.loads, with nesting deeper than any chat row refused in one line (Python's parser would recurse)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value, depth = None, MAX_NESTING + 1
    else:
        depth = nesting_depth(value)
    if depth > MAX_NESTING:
        raise DatasetFormatError(
            f"{path}, {where}: JSON nested more than {MAX_NESTING} levels deep; a chat row needs about 5 "
            "(row -> messages -> message -> content), so this is not a conversation."
        )
    return value


def nesting_depth(value: Any) -> int:
    """How many lists/objects deep `value` goes (iterative: any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def _check_json_syntax(path: Path, text: str) -> int | None:
    """Report malformed JSON with the file and line number (datasets' own error names neither). Returns the number
    of a torn last line of JSON Lines (malformed, and the file ends without a newline: a write cut off), if any."""
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        stripped = text.lstrip()
        if path.suffix.lower() == ".json" and stripped.startswith("{"):
            try:
                _parse_json(text, path, "the whole file")
                return None
            except json.JSONDecodeError:
                pass  # maybe JSON Lines in a .json file: check line by line below
        lines = text.splitlines()
        last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = _parse_json(line, path, f"line {number}")
            except json.JSONDecodeError as e:
                if number == last > 1 and not text.endswith(("\n", "\r")):
                    return number
                raise DatasetFormatError(
                    f"Malformed JSON in {path}, line {number}, column {e.colno}: {e.msg}. "
                    "Each line of a .jsonl file must be one complete JSON object."
                ) from e
            if not isinstance(row, dict):
                raise DatasetFormatError(
                    f"{path}, line {number}: expected a JSON object per line, got {type(row).__name__}."
                )
        return None
    try:
        rows = _parse_json(text, path, "the whole file")
    except json.JSONDecodeError as e:
        raise DatasetFormatError(
            f"Malformed JSON in {path}, line {e.lineno}, column {e.colno}: {e.msg}."
        ) from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetFormatError(f"{path} must hold a JSON list of objects (one per conversation).")
    if not rows:
        raise DatasetFormatError(f"Data file {path} holds an empty list; it needs at least one conversation.")
    return None


def _load_hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    from huggingface_hub.errors import HfHubHTTPError

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except FileNotFoundError as e:
        raise DatasetFormatError(
            f"Dataset '{dataset_id}' is neither a local file nor a dataset the hub has (or the hub is "
            "unreachable and it is not cached). Check the spelling, or download it and give the file path."
        ) from e
    except (ConnectionError, HfHubHTTPError) as e:
        raise DatasetFormatError(
            f"Could not fetch dataset '{dataset_id}' from the hub ({type(e).__name__}). "
            "Check your network and HF_TOKEN, or give a local file path."
        ) from e
    except ValueError as e:
        raise DatasetFormatError(f"Dataset '{dataset_id}': {str(e).splitlines()[0][:300]}") from e
    return _materialize(dataset)


def _materialize(dataset: Any) -> list[dict[str, Any]]:
    rows = dataset.to_list()
    if not rows:
        raise DatasetFormatError("The dataset has no rows; it needs at least one conversation.")
    return rows


# ---------------------------------------------------------------------------------------------
# Normalising


def detect_format(columns: set[str], first_value: Any = None) -> str:
    """Name the format a set of columns is in, or raise listing what was found and what is accepted."""
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        sample = _parse_json_string(first_value)
        if isinstance(sample, list) and sample and all(isinstance(x, str) for x in sample):
            return "lima"
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    accepted = "; ".join(FORMATS.values())
    raise DatasetFormatError(
        f"No known dataset format matches the columns found: {sorted(columns) or 'none'}. "
        f"Accepted formats: {accepted}."
    )


def normalize_rows(raw_rows: list[dict[str, Any]], source: str = "dataset") -> ChatDataset:
    """Turn raw rows of one format into conversations; skip and count the rows that cannot be used."""
    if not raw_rows:
        raise DatasetFormatError(f"{source} has no rows; it needs at least one conversation.")
    if not all(isinstance(r, dict) for r in raw_rows):
        raise DatasetFormatError(f"{source}: every row must be an object with named columns.")
    columns = set().union(*(r.keys() for r in raw_rows))
    key = {"messages": "messages", "conversations": "conversations"}
    first_key = next((key[c] for c in ("messages", "conversations") if c in columns), None)
    first_value = next((r.get(first_key) for r in raw_rows if r.get(first_key)), None) if first_key else None
    fmt = detect_format(columns, first_value)
    converter = _CONVERTERS[fmt]
    rows: list[Conversation] = []
    skipped: Counter[str] = Counter()
    for raw in raw_rows:
        try:
            rows.append(_with_tools(_validate_conversation(converter(raw)), raw))
        except _SkipRow as why:
            skipped[str(why)] += 1
    if not rows:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        raise DatasetFormatError(
            f"{source}: no usable rows in format '{fmt}' ({reasons}). Each row needs at least one user "
            "turn followed by a non-empty assistant turn."
        )
    return ChatDataset(rows=rows, format=fmt, source=source, skipped=skipped)


class _SkipRow(Exception):
    """One row cannot be used; its message is the reason counted in the summary."""


def _parse_json_string(value: Any) -> Any:
    """CSV and some parquet files hold nested columns as JSON text; parse it (never eval). Text that is not
    JSON comes back as it is."""
    try:
        return _json_column(value, "column")
    except _SkipRow:
        return value


def _json_column(value: Any, column: str) -> Any:
    """A column that may hold JSON text (CSV, some parquet files): parsed, or the row is skipped saying why."""
    if not (isinstance(value, str) and value.strip()[:1] in ("[", "{")):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise _SkipRow(f"with broken JSON in '{column}'") from None
    except RecursionError:
        raise _SkipRow(f"with '{column}' nested too deep") from None
    if nesting_depth(parsed) > MAX_NESTING:
        raise _SkipRow(f"with '{column}' nested too deep")
    return parsed


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _SkipRow(f"non-string {what}")
    return value


def _from_messages(raw: dict[str, Any]) -> Conversation:
    messages = _json_column(raw.get("messages"), "messages")
    if not isinstance(messages, list):
        raise _SkipRow("'messages' not a list")
    out: Conversation = []
    for m in messages:
        if not isinstance(m, dict):
            raise _SkipRow("message not an object")
        role = m.get("role")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise _SkipRow("unknown role")
        message: Message = {"role": ROLE_ALIASES[role.lower()], "content": _text(m.get("content"), "content")}
        if m.get("tool_calls"):
            message["tool_calls"] = [_tool_call(c) for c in _json_column(m["tool_calls"], "tool_calls")]
        if message["role"] == "tool" and isinstance(m.get("name"), str):
            message["name"] = m["name"]
        if message["role"] == "assistant" and "weight" in m:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise _SkipRow("assistant 'weight' not 0 or 1")
            if m["weight"] == 0:
                message["weight"] = 0
        out.append(message)
    return out


def _tool_call(call: Any) -> dict[str, Any]:
    """One call as chat templates take it: {"type": "function", "function": {"name", "arguments": dict}}."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _SkipRow("tool call without a name")
    name = fn["name"]
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise _SkipRow("tool call arguments not a JSON object") from None
    if not isinstance(arguments, dict):
        raise _SkipRow("tool call arguments not a JSON object")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _with_tools(messages: Conversation, raw: dict[str, Any]) -> Conversation:
    """The row's `tools` column (a list of JSON schemas, or its JSON text) rides on the first message; every call
    must name one of them."""
    tools = _json_column(raw.get("tools"), "tools")
    calls = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    if not tools:
        if calls:
            raise _SkipRow("tool calls without a 'tools' column")
        return messages
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _SkipRow("'tools' not a list of JSON schemas")
    names = {str(t.get("function", t).get("name")) for t in tools}
    if any(name not in names for name in calls):
        raise _SkipRow("a call to a tool missing from 'tools'")
    if any(call_problem(c["function"]["name"], c["function"]["arguments"], tools)
           for m in messages for c in m.get("tool_calls") or []):
        raise _SkipRow("a tool call whose arguments do not fit its tool's schema")
    return [{**messages[0], TOOLS_KEY: tools}, *messages[1:]]


def _from_sharegpt(raw: dict[str, Any]) -> Conversation:
    turns = _json_column(raw.get("conversations"), "conversations")
    if not isinstance(turns, list):
        raise _SkipRow("'conversations' not a list")
    out: Conversation = []
    if isinstance(raw.get("system"), str) and raw["system"].strip():
        out.append({"role": "system", "content": raw["system"]})
    for t in turns:
        if not isinstance(t, dict):
            raise _SkipRow("turn not an object")
        role = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        if role == "function_call":  # ShareGPT tool use: the call's JSON {"name", "arguments"} as the value
            call = _tool_call(_json_column(value, "function_call") if isinstance(value, str) else value)
            if out and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
                out[-1]["tool_calls"] = [call]  # text then a call: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise _SkipRow("unknown role")
        out.append({"role": ROLE_ALIASES[role.lower()], "content": _text(value, "content")})
    return out


def _from_lima(raw: dict[str, Any]) -> Conversation:
    turns = _json_column(raw.get("conversations"), "conversations")
    if not isinstance(turns, list):
        raise _SkipRow("'conversations' not a list")
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": _text(t, "content")} for i, t in enumerate(turns)
    ]


def _from_alpaca(raw: dict[str, Any]) -> Conversation:
    instruction = _text(raw.get("instruction"), "instruction").strip()
    extra = _text(raw.get("input"), "input").strip()
    prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    out: Conversation = []
    system = raw.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(raw.get("output"), "output")}]
    return out


def _from_prompt_completion(raw: dict[str, Any]) -> Conversation:
    prompt, completion = raw.get("prompt"), raw.get("completion")
    parsed_prompt, parsed_completion = _parse_json_string(prompt), _parse_json_string(completion)
    if _is_message_list(parsed_prompt) and _is_message_list(parsed_completion):  # trl's conversational form
        return _from_messages({"messages": parsed_prompt + parsed_completion})
    return [
        {"role": "user", "content": _text(prompt, "prompt")},
        {"role": "assistant", "content": _text(completion, "completion")},
    ]


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "lima": _from_lima,
    "alpaca": _from_alpaca,
    "prompt-completion": _from_prompt_completion,
}


def _validate_conversation(messages: Conversation) -> Conversation:
    """Enforce: optional leading system, then user/assistant alternating, ending on assistant; an assistant turn
    that calls tools is followed by their results (`tool` messages) and then the assistant again."""
    if any(not m["content"].strip() and not m.get("tool_calls") for m in messages):
        raise _SkipRow("empty content")
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    if not body:
        raise _SkipRow("no turns")
    expected = {"user"}
    for m in body:
        if m["role"] not in expected:
            raise _SkipRow("roles out of order" if m["role"] != "system" else "system message not first")
        if m["role"] == "assistant" and m.get("tool_calls"):
            expected = {"tool"}
        elif m["role"] == "tool":
            expected = {"tool", "assistant"}
        else:
            expected = {"assistant"} if m["role"] == "user" else {"user"}
    while body[-1]["role"] == "tool":  # results with no answer after them: the call itself is still learned
        body = body[:-1]
    if body[-1]["role"] != "assistant":
        if len(body) == 1:
            raise _SkipRow("no assistant turn")
        body = body[:-1]  # a trailing unanswered user turn carries no training signal
    if not any(trained(m) for m in body if m["role"] == "assistant"):
        raise _SkipRow("every assistant turn with weight 0")
    return system + body


def with_system_prompt(rows: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    """Give rows without a system message the chat's system prompt, so training matches chatting."""
    if not system_prompt:
        return rows
    return [r if r[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *r] for r in rows]
