"""One place where chat and training agree on how a model's own chat template is used.

`ChatFormat` answers, from rendering the tokenizer's template (never from a list of model names):
- whether the template takes a system message (Gemma raises on one: its text is folded into the first user turn);
- which tokens end an assistant turn (`end_of_turn_ids`, the stop ids for `generate`);
- how to render a prompt (`render_prompt`) and how to tokenize a training row with a 0/1 mask on exactly the
  tokens the chat would generate (`mask_plan(rows).tokenize(row)`).

Masking, in order of preference:
1. "generation markers": the template's own `{% generation %}` markers (`return_assistant_tokens_mask=True`);
2. "trl training template": trl's patched template for the family, only when it renders every checked row to
   exactly the text of the model's own template (so training sees what chat sees);
3. "prefix rendering": the model's own template; assistant turn i is what follows the rendering of messages[:i]
   with the generation prompt (the prompt chat would send), up to and including its end-of-turn marker. Each
   conversation is checked as a whole: the prompt of every assistant turn must be a prefix of the whole
   rendering. Rows are tokenized piece by piece (prompt text, turn text, ...), so the tokens marked are exactly
   the tokens chat would generate after that prompt, even for tokenizers that merge characters across the
   prompt/answer boundary. A row whose earlier turns render differently once later turns follow (Qwen3.5/3.6 drop
   the think block the chat's prompt opens) has no such mask: it is expanded into one example per trained
   assistant turn, each the chat's own prompt at that turn (`render_prompt`) followed by the turn, loss on the
   turn only (`Expansion` counts what that costs);
4. "whole sequence" (`assistant_only=False`): every token carries loss.

trl's `is_chat_template_prefix_preserving` probes a tool-call exchange ([user, assistant+tool_calls] vs. the same
plus a tool message): it reports False for Qwen3 and Phi-3 although plain conversations render every earlier
prompt as a prefix, and raises for templates that insist on alternating roles (Gemma, Cohere). It is therefore
only logged here; the per-conversation check above decides.

trl and peft are imported lazily (the chat starts without them).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from jinja2 import TemplateError

from hfmodel.common import FineTuneError

log = logging.getLogger("huggingface_model.chat_format")

# ChatML, the fallback for tokenizers that ship no chat template at all (with {% generation %} markers, so its
# masks come straight from the template).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
# End-of-turn markers of common families; generation also stops on those a tokenizer knows, besides the probed ones.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")
MASK_SOURCES = {
    "generation markers": "the template's own {% generation %} markers",
    "trl training template": "trl's training template for this family (renders like the model's own)",
    "prefix rendering": "the model's own template, one conversation prefix at a time",
    "whole sequence": "every token (assistant_only_loss=False)",
}

Message = dict[str, Any]
Row = list[Message]

MAX_CHECKED_ROWS = 50
MAX_LATER_MULTI_TURN = 10  # multi-turn rows past MAX_CHECKED_ROWS that are checked too
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_SYSTEM = "Probe system text."
_PROBE_USER = "Probe question?"
_PROBE_ANSWER = "Probe answer."
_FIX = "use a chat template with {% generation %} markers, or assistant_only_loss=False"


class ChatTemplateError(FineTuneError):
    """The chat template cannot give assistant-only masks that match what the chat generates."""


Example = tuple[list[int], list[int]]  # (input_ids, loss mask)


@dataclass
class Expansion:
    """Rows that were split into one example per trained assistant turn, and what that costs in tokens."""

    rows: int = 0
    examples: int = 0
    whole_tokens: int = 0  # those rows rendered once each
    tokens: int = 0  # their examples

    def add(self, whole_tokens: int, examples: list[Example]) -> None:
        self.rows += 1
        self.examples += len(examples)
        self.whole_tokens += whole_tokens
        self.tokens += sum(len(ids) for ids, _ in examples)

    def describe(self) -> str:
        extra = self.tokens - self.whole_tokens
        return (f"{self.rows} multi-turn row(s) expanded into {self.examples} example(s), one per trained assistant "
                f"turn, each the chat's prompt at that turn then the turn (the chat template renders earlier turns "
                f"differently once later turns follow): {extra:+,} tokens ({self.whole_tokens:,} rendered whole -> "
                f"{self.tokens:,})")


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and _GENERATION_MARKER.search(template or "") is not None


def template_family(template: str | None) -> str | None:
    """trl's name for a template it ships (e.g. "qwen3", "gemma", "llama3_2"), or None."""
    if not template:
        return None
    from trl import chat_template_utils as ctu

    for name, value in vars(ctu).items():
        if name.endswith("_chat_template") and "_training" not in name and value == template:
            return name.removesuffix("_chat_template")
    return None


def text_of(content: Any) -> str:
    """The visible text of a message's content (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _with_text_before(content: Any, text: str) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": text}, *content]
    return text + text_of(content)


def _unique(ids: list[int | None]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if isinstance(i, int) and i >= 0 and i not in out:
            out.append(i)
    return out


def _as_list(value: Any) -> list[int | None]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _assistant_indices(row: Row) -> list[int]:
    """Assistant turns that follow a prompt (a leading assistant message has nothing to answer)."""
    return [i for i, m in enumerate(row) if m.get("role") == "assistant" and i > 0]


def trained(message: Message) -> bool:
    """Whether an assistant turn is trained on: all are, except those with `"weight": 0` (OpenAI's fine-tuning
    format; a session log's earlier exchanges, given as context)."""
    return message.get("weight", 1) != 0


TOOLS_KEY = "tools"  # a training row's tool schemas ride on its first message under this key (see `split_tools`)


def split_tools(row: Row) -> tuple[Row, list[dict] | None]:
    """(messages, tool schemas) of a row; chat_data puts a row's `tools` column on its first message (a system
    prompt added later goes in front of it, so any message may carry it)."""
    tools = next((m[TOOLS_KEY] for m in row if TOOLS_KEY in m), None)
    if tools is None:
        return row, None
    return [{k: v for k, v in m.items() if k != TOOLS_KEY} for m in row], tools or None


def uses_tools(messages: Row, tools: list[dict] | None = None) -> bool:
    """True when rendering needs a tool-capable template: tool schemas, tool calls or tool results."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def _trl_template_text(name: str) -> str | None:
    """A chat template shipped in the installed trl package (read as a file: trl is not imported)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "chat_templates" / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def message_parts(parsed: Any, raw: str) -> tuple[str, list[dict], str | None]:
    """(content, calls, problem) from a parsed assistant message; calls are {name, arguments: dict}."""
    if not isinstance(parsed, dict):
        return raw, [], "the parser returned no message"
    calls, problems = [], []
    for call in parsed.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        arguments = fn.get("arguments", {}) if isinstance(fn, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            problems.append(f"malformed tool call {call!r:.200}")
            continue
        calls.append({"name": name, "arguments": arguments})
    content = parsed.get("content") or ""
    if problems and not calls:
        return raw, [], "; ".join(problems)
    return (content if isinstance(content, str) else raw), calls, "; ".join(problems) or None


def checked_rows(rows: list[Row], limit: int = MAX_CHECKED_ROWS) -> list[Row]:
    """The rows a mask plan is checked on: the first `limit`, plus the first few later rows with several assistant
    turns (those are the ones a template may render differently from the chat)."""
    later = [r for r in rows[limit:] if len(_assistant_indices(split_tools(r)[0])) > 1]
    return rows[:limit] + later[:MAX_LATER_MULTI_TURN]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class MaskPlan:
    """How training rows become (input_ids, assistant_mask); see the module docstring for `source`."""

    source: str
    template: str
    fmt: ChatFormat = field(repr=False)

    def tokenize(self, row: Row) -> Example:
        """The row as one example; a row this plan splits turn by turn raises (use `examples`)."""
        examples = self.examples(row)
        if len(examples) != 1:
            raise ValueError(f"this row becomes {len(examples)} examples under {self.source}: use MaskPlan.examples")
        return examples[0]

    def examples(self, row: Row) -> list[Example]:
        return self._examples(row)[0]

    def tokenize_rows(self, rows: list[Row]) -> tuple[list[list[Example]], Expansion]:
        """Each row's examples (one, or one per trained assistant turn), and the rows that were expanded."""
        expansion, out = Expansion(), []
        for row in rows:
            examples, whole_tokens = self._examples(row)
            if whole_tokens is not None:
                expansion.add(whole_tokens, examples)
            out.append(examples)
        return out, expansion

    def _examples(self, row: Row) -> tuple[list[Example], int | None]:
        """(examples, tokens of the row rendered whole if it was expanded, else None)."""
        row, tools = split_tools(row)
        row = self.fmt.prepare(row)
        template = self.fmt.template_for(row, tools, self.template)
        if self.source == "prefix rendering":
            try:
                return [self.fmt.prefix_masks(row, template, tools)], None
            except ChatTemplateError:  # earlier turns render unlike the chat's prompts: each turn on its own
                whole = len(self.fmt.tokenizer(self.fmt.render(row, template, tools=tools),
                                               add_special_tokens=False)["input_ids"])
                return self.fmt.turn_examples(row, tools), whole
        return [self._whole_row(row, template, tools)], None

    def _whole_row(self, row: Row, template: str | None, tools: list[dict] | None) -> Example:
        tok = self.fmt.tokenizer
        if self.source == "whole sequence":
            ids = list(tok.apply_chat_template(row, chat_template=template, tools=tools, return_dict=True)["input_ids"])
            return ids, [1] * len(ids)
        out = tok.apply_chat_template(row, chat_template=template, tools=tools, return_dict=True,
                                      return_assistant_tokens_mask=True)
        return self.fmt.trim_to_turns(row, list(out["input_ids"]), list(out["assistant_masks"]), tools)


class ChatFormat:
    """A tokenizer's chat template, probed once: system support, end-of-turn tokens, prompts, training masks."""

    def __init__(self, tokenizer: Any, generation_config: Any = None) -> None:
        self.tokenizer = tokenizer
        self.template: str = self._own_template()
        self.supports_system = self._probe_system()
        last, between = self._probe_end_of_turn()
        self.end_of_turn_text: str = last or between
        found = [tokenizer.convert_tokens_to_ids(t) for t in (last, between) if t]
        gen_eos = _as_list(getattr(generation_config, "eos_token_id", None))
        self.end_of_turn_ids: list[int] = _unique([*found, tokenizer.eos_token_id, *gen_eos])
        special = self._special_ids()
        self._end_texts = list(dict.fromkeys(
            str(tokenizer.convert_ids_to_tokens(i)) for i in self.end_of_turn_ids if i in special))
        self._folded_logged = False

    @cached_property
    def family(self) -> str | None:
        """trl's name for this template, if trl ships it (imports trl, so only asked when training)."""
        return template_family(self.template)

    # ---- probing -------------------------------------------------------------------------------------------
    def _own_template(self) -> str:
        try:
            return str(self.tokenizer.get_chat_template())
        except ValueError:  # no chat template at all: rendering will raise transformers' own error
            return ""

    def render(self, messages: Row, template: str | None = None, generation_prompt: bool = False,
               tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The template's text for `messages` (no tokenization, no `prepare`)."""
        return str(self.tokenizer.apply_chat_template(messages, chat_template=template or None, tokenize=False,
                                                      add_generation_prompt=generation_prompt, tools=tools, **kwargs))

    def _probe_system(self) -> bool:
        messages = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
        try:
            return _PROBE_SYSTEM in self.render(messages, generation_prompt=True)
        except TemplateError:
            return False
        except ValueError:  # no template
            return True

    def _probe_end_of_turn(self) -> tuple[str, str]:
        """The special token right after assistant content: as the last message, and before a next user turn."""
        one = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
        two = [*one, {"role": "user", "content": _PROBE_USER}]
        return self._token_after_answer(one), self._token_after_answer(two)

    def _token_after_answer(self, messages: Row) -> str:
        try:
            text = self.render(messages)
        except (TemplateError, ValueError):
            return ""
        at = text.rfind(_PROBE_ANSWER)
        if at < 0:
            return ""
        ids = self.tokenizer(text[at + len(_PROBE_ANSWER):], add_special_tokens=False)["input_ids"]
        return str(self.tokenizer.convert_ids_to_tokens(ids[0])) if ids and ids[0] in self._special_ids() else ""

    def _special_ids(self) -> set[int]:
        return set(self.tokenizer.get_added_vocab().values()) | set(self.tokenizer.all_special_ids)

    # ---- chat ----------------------------------------------------------------------------------------------
    def prepare(self, messages: Row, system_prompt: str | None = None) -> Row:
        """The system message chat and training both use; folded into the first user turn if there is no role."""
        rows = [dict(m) for m in messages]
        if system_prompt and not (rows and rows[0].get("role") == "system"):
            rows.insert(0, {"role": "system", "content": system_prompt})
        if self.supports_system or not rows or rows[0].get("role") != "system":
            return rows
        return self._fold_system(rows)

    def _fold_system(self, rows: Row) -> Row:
        system, rest = text_of(rows[0].get("content")), rows[1:]
        if not self._folded_logged:
            self._folded_logged = True
            log.info("The chat template has no system role: the system text goes into the first user turn.")
        for i, m in enumerate(rest):
            if m.get("role") == "user":
                rest[i] = {**m, "content": _with_text_before(m.get("content"), system + "\n\n")}
                return rest
        return [{"role": "user", "content": system}, *rest]

    def render_prompt(self, messages: Row, system_prompt: str | None = None, tools: list[dict] | None = None,
                      **kwargs: Any) -> Any:
        """Tokenized prompt (input_ids, attention_mask as tensors) ending with the assistant generation prompt."""
        prepared = self.prepare(messages, system_prompt)
        return self.tokenizer.apply_chat_template(prepared, chat_template=self.template_for(prepared, tools),
                                                  tools=tools, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt", **kwargs)

    def prompt_text(self, messages: Row, tools: list[dict] | None = None) -> str:
        """The prompt as text (what a response parser needs to know where the reply starts)."""
        prepared = self.prepare(messages)
        return self.render(prepared, self.template_for(prepared, tools), generation_prompt=True, tools=tools)

    # ---- tools ---------------------------------------------------------------------------------------------
    def template_for(self, messages: Row, tools: list[dict] | None = None, default: str | None = None) -> str | None:
        """The template to render `messages` with: the tool-capable one when tools or tool turns are involved."""
        if uses_tools(messages, tools) and self.tool_template and self.tool_template != self.template:
            return self.tool_template
        return default

    @cached_property
    def tool_template(self) -> str | None:
        """A template that renders tool schemas, calls and results. The model's own when it can (trl's
        `supports_tool_calling`); for ChatML models whose own template cannot (SmolLM2), trl's copy of Qwen2.5's
        template (same <|im_start|>/<|im_end|> tokens, Hermes `<tool_call>{json}</tool_call>` calls) with this
        model's default system prompt, used only if it renders conversations without tools exactly like the
        model's own; else None (tools cannot be offered to this model)."""
        from trl.chat_template_utils import supports_tool_calling

        if supports_tool_calling(self.tokenizer):
            return self.template
        hermes = self._hermes_template()
        if hermes is None:
            log.warning("This model's chat template cannot render tool calls, and it is not ChatML-shaped: tools "
                        "are not offered to it. Use a model whose template supports tools (Qwen2.5, Llama 3.1, ...).")
            return None
        log.info("This model's chat template cannot render tool calls: using the Hermes tool format of Qwen2.5's "
                 "template (same special tokens; identical to the model's own without tools) in chat and training.")
        return hermes

    def _hermes_template(self) -> str | None:
        source = _trl_template_text("qwen2_5.jinja")
        if source is None or "<|im_start|>" not in self.template:
            return None
        qwen_default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        default = self._default_system_text()
        if default is None:  # the model's own injects no system prompt: neither may the stand-in
            source = source.replace("{{- '<|im_start|>system\n" + qwen_default + "<|im_end|>\n' }}", "")
            source = source.replace("{{- '" + qwen_default + "' }}", "")
        else:
            source = source.replace(qwen_default, default.replace("\\", "\\\\").replace("'", "\\'"))
        probes = [[{"role": "user", "content": _PROBE_USER}],
                  [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER},
                   {"role": "assistant", "content": _PROBE_ANSWER}, {"role": "user", "content": _PROBE_USER}]]
        try:
            same = all(self.render(p, source, generation_prompt=g) == self.render(p, generation_prompt=g)
                       for p in probes for g in (False, True))
        except TemplateError:
            return None
        return source if same else None

    def _default_system_text(self) -> str | None:
        """The system prompt the model's own template injects when a conversation has none (SmolLM2's), or None."""
        text = self.render([{"role": "user", "content": _PROBE_USER}])
        match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", text, re.S)
        return match.group(1) if match else None

    @cached_property
    def response_template(self) -> dict | None:
        """transformers' response template for parsing replies into text and tool calls (trl knows the families)."""
        import copy

        from trl import chat_template_utils as ctu

        if self.tool_template is None:
            return None
        if self.tool_template != self.template:
            return dict(ctu.qwen3_template)  # the Hermes format of the stand-in template
        probe = copy.copy(self.tokenizer)
        try:
            ctu.add_response_schema(probe)
        except ValueError:
            native = getattr(self.tokenizer, "response_template", None)
            if native:
                return dict(native)
            log.warning("No response parser is known for this chat template: tool calls in replies cannot be read, "
                        "so tools are not offered. Set `tokenizer.response_template` to enable them.")
            return None
        return dict(probe.response_template)

    def tools_supported(self) -> bool:
        return self.tool_template is not None and self.response_template is not None

    def parse_reply(self, text: str, prompt: str, tools: list[dict] | None) -> tuple[str, list[dict], str | None]:
        """(text, tool calls [{name, arguments}], problem): the reply split by the response parser. A reply that
        does not parse (malformed call markup) comes back whole as text, with the reason."""
        try:
            parsed = self.tokenizer.parse_response(text, self.response_template, prefix=prompt, tools=tools)
        except (ValueError, TypeError, KeyError) as e:
            return text, [], f"{type(e).__name__}: {e}"
        return message_parts(parsed, text)

    def call_start_tokens(self, tools: list[dict]) -> list[int]:
        """The first token of a reply that opens with a tool call (`<` of `<tool_call>` in the Hermes format), or none
        if the template does not show one: what to forbid at the start of a reply that must be words."""
        function = tools[0].get("function", tools[0]) if tools else {}
        user = [{"role": "user", "content": _PROBE_USER}]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": str(function.get("name", "")), "arguments": {}}}]}
        template = self.template_for(user, tools)
        try:
            prompt = self.render(self.prepare(user), template, generation_prompt=True, tools=tools)
            full = self.render(self.prepare([*user, call]), template, tools=tools)
        except (TemplateError, ValueError, TypeError):
            return []
        if not full.startswith(prompt) or not full[len(prompt):].strip():
            return []
        return list(self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"][:1])

    def reply_parser(self, prompt: str, tools: list[dict] | None) -> Any:
        """A streaming parser (transformers' ResponseParser): feed() text pieces, finalize() at the end."""
        return self.tokenizer.get_response_parser(self.response_template, prefix=prompt, tools=tools)

    # ---- training ------------------------------------------------------------------------------------------
    def mask_plan(self, rows: list[Row], assistant_only: bool = True) -> MaskPlan:
        """Choose how rows are tokenized and masked (checked on up to MAX_CHECKED_ROWS rows)."""
        if not assistant_only:
            return MaskPlan("whole sequence", self.template, self)
        checked = checked_rows(rows)
        sample = [split_tools(r) for r in checked]
        if any(uses_tools(r, t) for r, t in sample) and self.tool_template not in (None, self.template):
            return self._checked_prefix_plan(checked, str(self.tool_template))  # the stand-in has no markers
        if has_generation_markers(self.template) and self._stop_token_marked(self.template):
            return MaskPlan("generation markers", self.template, self)
        training = self._trl_training_template()
        if training and self._renders_like_own(sample, training) and self._stop_token_marked(training):
            return MaskPlan("trl training template", training, self)
        self._log_trl_prefix_verdict()
        return self._checked_prefix_plan(checked, self.template)

    def _checked_prefix_plan(self, checked: list[Row], template: str) -> MaskPlan:
        plan = MaskPlan("prefix rendering", template, self)
        for row in checked:
            plan.examples(row)  # raises ChatTemplateError when a turn is not rendered verbatim or never ends
        return plan

    def _trl_training_template(self) -> str | None:
        from trl.chat_template_utils import get_training_chat_template

        try:
            return get_training_chat_template(self.tokenizer)
        except (ValueError, TemplateError, TypeError):  # no patch for this family, or a probe the template rejects
            return None

    def _renders_like_own(self, rows: list[tuple[Row, list[dict] | None]], template: str) -> bool:
        try:
            prepared = [(self.prepare(r), t) for r, t in rows]
            return all(self.render(r, template, tools=t) == self.render(r, tools=t) for r, t in prepared)
        except TemplateError:
            return False

    def _stop_token_marked(self, template: str) -> bool:
        from trl.chat_template_utils import is_chat_template_stop_token_trained

        if is_chat_template_stop_token_trained(self.tokenizer, chat_template=template):
            return True
        log.info("The marked assistant span leaves out the end-of-turn token; masking by prefix rendering instead.")
        return False

    def _log_trl_prefix_verdict(self) -> None:
        from trl.chat_template_utils import is_chat_template_prefix_preserving

        try:
            verdict: Any = is_chat_template_prefix_preserving(self.tokenizer)
        except (TemplateError, TypeError, ValueError) as exc:
            verdict = f"not testable ({type(exc).__name__})"
        log.debug("trl is_chat_template_prefix_preserving (tool-call probe): %s; checking each row instead", verdict)

    # ---- marked templates: keep what chat generates ----------------------------------------------------------
    def trim_to_turns(self, row: Row, ids: list[int], marked: list[int], tools: list[dict] | None = None
                      ) -> tuple[list[int], list[int]]:
        """Of each marked turn keep the tokens after the prompt chat sends, up to its first end-of-turn token.

        Training templates often mark part of the turn header (trl's Qwen2.5/DeepSeek/gpt-oss ones) or text after
        the end-of-turn token (ChatML's newline, Phi-3's trailing eos); chat never generates those tokens.
        """
        keep = [0] * len(ids)
        stops, pos = set(self.end_of_turn_ids), 0
        for i in _assistant_indices(row):
            start = max(pos, _common_prefix(ids, self._prompt_ids(row[:i], tools)))
            j = next((p for p in range(start, len(ids)) if marked[p]), len(ids))
            while j < len(ids) and marked[j]:
                keep[j], j = int(trained(row[i])), j + 1
                if ids[j - 1] in stops:
                    break
            pos = j
        return ids, keep

    def _prompt_ids(self, messages: Row, tools: list[dict] | None = None) -> list[int]:
        try:
            prompt = self.render(messages, generation_prompt=True, tools=tools)
        except TemplateError:
            return []
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    # ---- prefix rendering ----------------------------------------------------------------------------------
    def prefix_masks(self, row: Row, template: str | None = None, tools: list[dict] | None = None
                     ) -> tuple[list[int], list[int]]:
        """(input_ids, mask) of a prepared row from the model's own template (or `template`), by rendering each
        turn's prompt. Tool results are never trained on; tool calls are, like any assistant text."""
        full = self.render(row, template, tools=tools)
        pieces: list[tuple[str, int]] = []
        pos = 0
        assistant_at = _assistant_indices(row)
        for n, i in enumerate(assistant_at):
            start = self._turn_start(row, i, full, pos, template, tools)
            last = n == len(assistant_at) - 1
            calls = bool(row[i].get("tool_calls"))
            end, appended = self._turn_end(full, start, text_of(row[i].get("content")), last, calls)
            pieces += [(full[pos:start], 0), (full[start:end] + appended, int(trained(row[i])))]
            pos = end
        pieces.append((full[pos:], 0))
        return self._tokenize_pieces(pieces)

    def _turn_start(self, row: Row, i: int, full: str, pos: int, template: str | None = None,
                    tools: list[dict] | None = None) -> int:
        prompt = self.render(row[:i], template, generation_prompt=True, tools=tools)
        if not full.startswith(prompt) or len(prompt) < pos:
            raise self._error(f"it renders earlier turns differently once later turns follow (the prompt chat sends "
                              f"before message {i} is not a prefix of the whole conversation), so no mask can match "
                              f"what chat generates")
        return len(prompt)

    def _error(self, why: str) -> ChatTemplateError:
        """One line: which template, why, and the fixes."""
        family = f"the {self.family} chat template" if self.family else "this chat template"
        return ChatTemplateError(f"Assistant-only loss is impossible with {family}: {why}; {_FIX}.")

    # ---- one example per turn ------------------------------------------------------------------------------
    def turn_examples(self, row: Row, tools: list[dict] | None = None) -> list[Example]:
        """A prepared row as one example per trained assistant turn: the prompt exactly as the chat renders it before
        that turn (`render_prompt`, the generation path), then the turn up to its end-of-turn token, the only tokens
        with loss. For templates that rewrite earlier turns once later ones follow (see the module docstring)."""
        return [self._turn_example(row, i, tools) for i in _assistant_indices(row) if trained(row[i])]

    def _turn_example(self, row: Row, i: int, tools: list[dict] | None) -> Example:
        prompt_ids = self.render_prompt(row[:i], tools=tools)["input_ids"][0].tolist()
        prompt = self.prompt_text(row[:i], tools)
        full = self.render(row[:i + 1], self.template_for(row[:i + 1], tools), tools=tools)
        if not full.startswith(prompt):
            raise self._error(f"even the conversation that ends with message {i} does not start with the prompt chat "
                              f"sends before it")
        calls = bool(row[i].get("tool_calls"))
        end, appended = self._turn_end(full, len(prompt), text_of(row[i].get("content")), True, calls)
        turn_ids = self.tokenizer(full[len(prompt):end] + appended, add_special_tokens=False)["input_ids"]
        return prompt_ids + list(turn_ids), [0] * len(prompt_ids) + [1] * len(turn_ids)

    def _turn_end(self, full: str, start: int, content: str, last: bool, calls: bool = False) -> tuple[int, str]:
        """Where the turn's end-of-turn marker ends; for a final turn the template leaves open, the text to add."""
        needle = content.split("</think>")[-1].strip()
        found = full.find(needle, start)
        if found < 0:
            raise self._error("it does not render the assistant content verbatim")
        after = found + len(needle)
        if needle and not calls:  # the marker follows the content (after optional whitespace)
            at = len(full) - len(full[after:].lstrip())
            hits = [(at, -len(m)) for m in self._end_texts if full.startswith(m, at)]
        else:  # tool calls (after any content): the first marker after them
            hits = [(full.find(m, after), -len(m)) for m in self._end_texts if m in full[after:]]
        if hits:
            at, minus_len = min(hits)  # the earliest, and the longest there
            return at - minus_len, ""
        if last and not full[after:].strip():
            return after, self.end_of_turn_text
        raise self._error("it puts no end-of-turn token after an assistant turn")

    def _tokenize_pieces(self, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
        encoded = self.tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        mask: list[int] = []
        for piece_ids, (_, bit) in zip(encoded, pieces, strict=True):
            ids += piece_ids
            mask += [bit] * len(piece_ids)
        return ids, mask
