"""Chat templates for training: which template marks the assistant tokens so that only they carry loss."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hfmodel.common import FineTuneError

Conversation = list[dict[str, str]]

# ChatML, with {% generation %} markers so trl can mask everything but assistant turns (end-of-turn
# token included, so a tuned model still stops). Used (a) to train models whose own template renders
# the same text but cannot mark assistant tokens (SmolLM2, Qwen2, ...), checked row by row before
# training, and (b) as the documented fallback for tokenizers that ship no chat template at all.
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
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template or "") is not None


def training_template(tokenizer: Any, rows: list[Conversation]) -> str:
    """A template that marks assistant tokens and renders every row exactly like the chat template."""
    own = tokenizer.chat_template
    if has_generation_markers(own):
        return own
    mismatches = [r for r in rows if render(tokenizer, r, own) != render(tokenizer, r, CHATML_TEMPLATE)]
    if not mismatches:
        return CHATML_TEMPLATE
    try:
        from trl.chat_template_utils import get_training_chat_template

        patched = get_training_chat_template(tokenizer)
    except (ValueError, NotImplementedError, ImportError):
        patched = None
    if patched and all(render(tokenizer, r, own) == render(tokenizer, r, patched) for r in rows[:50]):
        return patched
    example = render(tokenizer, mismatches[0], own)[:200]
    raise FineTuneError(
        "This model's chat template cannot mark assistant tokens and does not render like ChatML, so "
        "assistant-only loss is impossible. Set training_args.assistant_only_loss=False (loss on whole "
        f"conversations), or give the tokenizer a template with {{% generation %}} markers. Rendered: {example!r}"
    )


def template_name(tokenizer: Any, template: str | None) -> str:
    """How /dryrun names the template a run trains with."""
    if template == CHATML_TEMPLATE:
        return "ChatML + generation markers"
    return "the tokenizer's own" if template == tokenizer.chat_template else "trl-patched"


def render(tokenizer: Any, messages: Conversation, template: str | None) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


@contextmanager
def swapped_template(tokenizer: Any, template: str) -> Iterator[None]:
    """The tokenizer renders with `template` inside the block (trl reads `tokenizer.chat_template`)."""
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = original
