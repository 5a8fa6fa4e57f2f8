"""Preference datasets: any supported file or hub dataset -> pairs (DPO, ORPO) or marked answers (KTO).

Accepted shapes (detected from the columns, logged once; files load exactly as for SFT: json, jsonl, csv,
parquet or a hub dataset id, through `chat_data.load_rows`):

| format        | columns                                                                                   |
|---------------|-------------------------------------------------------------------------------------------|
| pairs         | `prompt`, `chosen`, `rejected`: strings, or message lists (`chosen` = [assistant message]) |
| conversations | `chosen`, `rejected`: whole conversations that share every turn but the last answer        |
|               | (the "binarized" shape of UltraFeedback and friends; a `prompt` column is then ignored)    |
| marked        | `prompt`, `completion`, `label` (true = a good answer, false = a bad one; KTO)              |

Every row becomes a prompt (an optional system message, then user/assistant turns ending on a user turn) and one
or two answers. Rows that cannot be used (a missing side, identical sides, broken turns) are skipped and counted;
if none is usable the load fails with one `DatasetFormatError`. Nothing from a data file is ever evaluated.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hfmodel.data import MAX_NESTING, ROLE_ALIASES, Conversation, DatasetFormatError, load_rows, nesting_depth

logger = logging.getLogger("huggingface_model")

FORMATS = {
    "pairs": "`prompt`, `chosen`, `rejected` (strings or message lists)",
    "conversations": "`chosen`, `rejected` as whole conversations sharing the prompt turns (binarized)",
    "marked": "`prompt`, `completion`, `label` (true/false; KTO)",
}
TRUE_LABELS = ("true", "1", "yes", "good", "desirable", "chosen")
FALSE_LABELS = ("false", "0", "no", "bad", "undesirable", "rejected")


@dataclass(frozen=True)
class Pair:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) answer."""

    prompt: Conversation
    chosen: str
    rejected: str

    def to_row(self) -> dict[str, Any]:
        """The file form (`pairs` format, message lists), as `/train` writes it."""
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass(frozen=True)
class Marked:
    """A prompt with one answer marked good (`label=True`) or bad (KTO's unpaired shape)."""

    prompt: Conversation
    completion: str
    label: bool

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": [{"role": "assistant", "content": self.completion}],
                "label": self.label}


@dataclass
class PreferenceDataset:
    """Normalised pairs or marked answers, plus what was detected and dropped on the way."""

    rows: list[Pair] | list[Marked]
    format: str
    source: str
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def paired(self) -> bool:
        return self.format != "marked"

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> str:
        what = "pairs" if self.paired else "marked answers"
        text = f"{self.source}: format '{self.format}', {len(self.rows)} usable {what}"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values())} ({reasons})"
        return text


# ---------------------------------------------------------------------------------------------
# Loading


def load_preference_dataset(data_path: str, split: str = "train") -> PreferenceDataset:
    """Load a local json/jsonl/csv/parquet file or a hub dataset id and normalise its preference rows."""
    data = normalize_preference_rows(load_rows(data_path, split=split), source=str(data_path))
    logger.info("Preference dataset %s", data.describe())
    return data


def is_preference_data(columns: set[str]) -> bool:
    """True when the columns are one of the preference formats (used to route `/dryrun` and to hint)."""
    return {"chosen", "rejected"} <= columns or {"prompt", "completion", "label"} <= columns


def detect_preference_format(columns: set[str], first_chosen: Any = None) -> str:
    """Name the format a set of columns is in, or raise listing what was found and what is accepted."""
    if {"chosen", "rejected"} <= columns:
        sample = _parse_json_text(first_chosen)
        if _is_conversation(sample) and any(m.get("role") != "assistant" for m in sample):
            return "conversations"
        if "prompt" in columns:
            return "pairs"
        raise DatasetFormatError(
            f"Columns {sorted(columns)}: `chosen` and `rejected` are not whole conversations and there is no `prompt` "
            "column, so the prompt is unknown. Add a `prompt` column, or give `chosen`/`rejected` as message lists "
            "that include the user turns.")
    if {"prompt", "completion", "label"} <= columns:
        return "marked"
    hint = (" This looks like supervised (SFT) data: train it with method=sft." if
            columns & {"messages", "conversations", "instruction", "completion"} else "")
    raise DatasetFormatError(
        f"No preference format matches the columns found: {sorted(columns) or 'none'}. "
        f"Accepted formats: {'; '.join(FORMATS.values())}.{hint}")


def normalize_preference_rows(raw_rows: list[dict[str, Any]], source: str = "dataset") -> PreferenceDataset:
    """Turn raw rows of one format into pairs or marked answers; skip and count the rows that cannot be used."""
    if not raw_rows:
        raise DatasetFormatError(f"{source} has no rows; it needs at least one preference pair.")
    if not all(isinstance(r, dict) for r in raw_rows):
        raise DatasetFormatError(f"{source}: every row must be an object with named columns.")
    columns = set().union(*(r.keys() for r in raw_rows))
    first_chosen = next((r.get("chosen") for r in raw_rows if r.get("chosen")), None)
    fmt = detect_preference_format(columns, first_chosen)
    converter = _CONVERTERS[fmt]
    rows: list[Any] = []
    skipped: Counter[str] = Counter()
    for raw in raw_rows:
        try:
            rows.append(converter(raw))
        except _SkipRow as why:
            skipped[str(why)] += 1
    if not rows:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        need = ("a prompt and a non-empty `completion` with a true/false `label`" if fmt == "marked" else
                "a prompt and two different, non-empty answers (`chosen` and `rejected`)")
        raise DatasetFormatError(f"{source}: no usable rows in preference format '{fmt}' ({reasons}). Each row "
                                 f"needs {need}.")
    return PreferenceDataset(rows=rows, format=fmt, source=source, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Between the shapes


def unpair(pairs: list[Pair]) -> list[Marked]:
    """KTO from pairs: each chosen answer is a good one, each rejected answer a bad one."""
    out: list[Marked] = []
    for p in pairs:
        out += [Marked(p.prompt, p.chosen, True), Marked(p.prompt, p.rejected, False)]
    return out


def pairs_of(marked: list[Marked]) -> list[Pair]:
    """Pairs hidden in marked answers: every good x bad answer to the same prompt (for scoring KTO runs)."""
    by_prompt: dict[str, tuple[list[str], list[str]]] = {}
    for m in marked:
        good, bad = by_prompt.setdefault(json.dumps(m.prompt), ([], []))
        (good if m.label else bad).append(m.completion)
    return [Pair(json.loads(key), g, b) for key, (good, bad) in by_prompt.items() for g in good for b in bad]


def unique(rows: list[Any]) -> list[Any]:
    """Rows without repeats, first occurrence kept (`/train` repeats taught pairs; score each once)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = json.dumps(row.to_row(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def preference_mix(taught: list[dict[str, Any]], replay: PreferenceDataset | None, min_repeats: int,
                   paired: bool) -> list[dict[str, Any]]:
    """The rows `/train method=...` learns from: every taught row repeated so that taught rows make up at least
    half of the mix (as for SFT), plus the configured preference data replayed (converted to the same shape)."""
    replayed: list[dict[str, Any]] = []
    if replay is not None and replay.paired:
        replayed = [r.to_row() for r in (replay.rows if paired else unpair(replay.rows))]  # type: ignore[arg-type]
    elif replay is not None and not paired:
        replayed = [r.to_row() for r in replay.rows]
    elif replay is not None:
        logger.info("Not replaying %s: marked answers cannot be mixed into pairs.", replay.source)
    repeats = max(min_repeats, -(-len(replayed) // max(1, len(taught))))
    return taught * repeats + replayed


# ---------------------------------------------------------------------------------------------
# Rows


class _SkipRow(Exception):
    """One row cannot be used; its message is the reason counted in the summary."""


def _parse_json_text(value: Any) -> Any:
    """CSV (and some parquet) files hold message lists as JSON text; parse it (never eval), else keep the value."""
    if not (isinstance(value, str) and value.strip()[:1] in ("[", "{")):
        return value
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value
    return parsed if nesting_depth(parsed) <= MAX_NESTING else value


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _messages(value: list[Any], column: str) -> Conversation:
    out: Conversation = []
    for m in value:
        if not isinstance(m, dict):
            raise _SkipRow(f"message in '{column}' not an object")
        role = m.get("role", m.get("from"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise _SkipRow(f"unknown role in '{column}'")
        content = m.get("content", m.get("value"))
        if not isinstance(content, str) or not content.strip():
            raise _SkipRow(f"empty or non-text message in '{column}'")
        out.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    return out


def _prompt(value: Any) -> Conversation:
    """A prompt: text (one user turn) or messages: optional system, then turns alternating, ending on a user turn."""
    value = _parse_json_text(value)
    if value is None or value == "" or value == []:
        raise _SkipRow("missing prompt")
    if isinstance(value, str):
        if not value.strip():
            raise _SkipRow("missing prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _SkipRow("prompt neither text nor messages")
    messages = _messages(value, "prompt")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)):
        raise _SkipRow("prompt turns out of order")
    if body[-1]["role"] != "user":
        raise _SkipRow("prompt not ending on a user turn")
    return messages


def _answer(value: Any, column: str) -> str:
    """An answer: text, or one assistant message (trl's conversational form)."""
    value = _parse_json_text(value)
    if value is None or value == "" or value == []:
        raise _SkipRow(f"missing {column}")
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        messages = _messages(value, column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _SkipRow(f"'{column}' not one assistant message")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise _SkipRow(f"non-text {column}")
    if not value.strip():
        raise _SkipRow(f"missing {column}")
    return value


def _split(conversation: Any, column: str) -> tuple[Conversation, str]:
    """A whole conversation -> (the prompt turns, the last assistant answer)."""
    value = _parse_json_text(conversation)
    if value is None or value == "" or value == []:
        raise _SkipRow(f"missing {column}")
    if not _is_conversation(value):
        raise _SkipRow(f"'{column}' not a conversation")
    messages = _messages(value, column)
    if messages[-1]["role"] != "assistant":
        raise _SkipRow(f"'{column}' not ending on an assistant turn")
    return _prompt(messages[:-1]), messages[-1]["content"]


def _distinct(prompt: Conversation, chosen: str, rejected: str) -> Pair:
    if chosen.strip() == rejected.strip():
        raise _SkipRow("identical chosen and rejected")
    return Pair(prompt, chosen, rejected)


def _from_pairs(raw: dict[str, Any]) -> Pair:
    chosen, rejected = _answer(raw.get("chosen"), "chosen"), _answer(raw.get("rejected"), "rejected")
    return _distinct(_prompt(raw.get("prompt")), chosen, rejected)


def _from_conversations(raw: dict[str, Any]) -> Pair:
    prompt, chosen = _split(raw.get("chosen"), "chosen")
    other, rejected = _split(raw.get("rejected"), "rejected")
    if other != prompt:
        raise _SkipRow("chosen and rejected answering different prompts")
    return _distinct(prompt, chosen, rejected)


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_LABELS + FALSE_LABELS:
        return value.strip().lower() in TRUE_LABELS
    raise _SkipRow("label not true/false")


def _from_marked(raw: dict[str, Any]) -> Marked:
    return Marked(_prompt(raw.get("prompt")), _answer(raw.get("completion"), "completion"), _label(raw.get("label")))


_CONVERTERS: dict[str, Any] = {"pairs": _from_pairs, "conversations": _from_conversations, "marked": _from_marked}
