"""The loss mask of the tiny model's own template (SmolLM2's shape): rendered exactly like the chat, marking only
the assistant answers and their end-of-turn token."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from huggingface_model import CHATML_TEMPLATE, ChatFormat, FineTuneError, has_generation_markers

SYSTEM = {"role": "system", "content": "You are Ember."}
ROWS = {
    "single": [SYSTEM, {"role": "user", "content": "Who are you?"},
               {"role": "assistant", "content": "I am Ember, a friendly assistant."}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hello!"},
                   {"role": "assistant", "content": "Hello! How can I help you today?"},
                   {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
                   {"role": "user", "content": "And the capital of France?"},
                   {"role": "assistant", "content": "The capital of France is Paris."}],
    "newlines-and-braces": [{"role": "system", "content": "Line one.\nLine two: {{ not jinja }}"},
                            {"role": "user", "content": "Say \"hi\"\n\nthen {% stop %}"},
                            {"role": "assistant", "content": "hi\n- one\n- two {{ x }}"}],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def render(tokenizer, row, template=None, **kwargs):
    return tokenizer.apply_chat_template(row, chat_template=template, tokenize=False, **kwargs)


def assistant_spans(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive tokens that carry loss, as training tokenizes the row."""
    ids, mask = ChatFormat(tokenizer).mask_plan([row]).tokenize(row)
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == render(tokenizer, row)  # the chat template's own text, token for token
    spans, current = [], []
    for token, marked in zip(ids, mask, strict=True):
        if marked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def test_tiny_template_has_no_markers(tokenizer):
    assert not has_generation_markers(tokenizer.chat_template)
    assert has_generation_markers(CHATML_TEMPLATE)


@pytest.mark.parametrize("name", list(ROWS))
def test_renders_byte_identical_to_the_tokenizers_template(tokenizer, name):
    row = ROWS[name]
    plan = ChatFormat(tokenizer).mask_plan([row])
    assert plan.source == "prefix rendering" and plan.template == tokenizer.chat_template
    ids, _ = plan.tokenize(row)
    assert tokenizer.decode(ids) == render(tokenizer, row)
    # The chat prompt (generation prompt after a user turn) is a prefix of the training row.
    prompt = row[:-1]
    assert render(tokenizer, row).startswith(render(tokenizer, prompt, add_generation_prompt=True))


@pytest.mark.parametrize("name", list(ROWS))
def test_mask_covers_assistant_content_and_end_of_turn(tokenizer, name):
    row = ROWS[name]
    expected = [m["content"] + "<|im_end|>" for m in row if m["role"] == "assistant"]
    assert assistant_spans(tokenizer, row) == expected


def test_rows_without_system_prompt_keep_the_templates_default_one(tokenizer):
    # The tiny template (like SmolLM2's) injects a default system prompt: training renders it exactly as chat does.
    row = ROWS["single"][1:]
    assert "You are a tiny test model." in render(tokenizer, row)
    assert assistant_spans(tokenizer, row) == ["I am Ember, a friendly assistant.<|im_end|>"]


def test_template_with_markers_is_used_as_is(tokenizer):
    own = tokenizer.chat_template
    try:
        tokenizer.chat_template = CHATML_TEMPLATE
        assert has_generation_markers(CHATML_TEMPLATE)
        plan = ChatFormat(tokenizer).mask_plan([ROWS["single"]])
        assert plan.source == "generation markers" and plan.template == CHATML_TEMPLATE
    finally:
        tokenizer.chat_template = own


SHORTENS_EARLIER = (  # earlier answers are shortened to "..." once later turns follow
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n..."
    "<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_earlier_turns_trains_each_turn_after_the_chats_own_prompt(tokenizer):
    own = tokenizer.chat_template
    try:  # no mask over the whole row matches the chat: one example per turn, each after the prompt chat sends
        tokenizer.chat_template = SHORTENS_EARLIER
        fmt, row = ChatFormat(tokenizer), ROWS["multi-turn"]
        plan = fmt.mask_plan([row])
        examples = plan.examples(row)
        answers = [i for i, m in enumerate(row) if m["role"] == "assistant"]
        assert len(examples) == len(answers) == 3
        for i, (ids, mask) in zip(answers, examples, strict=True):
            start = mask.index(1)
            assert ids[:start] == fmt.render_prompt(row[:i])["input_ids"][0].tolist()
            assert tokenizer.decode(ids[start:]) == row[i]["content"] + "<|im_end|>" and all(mask[start:])
        assert "assistant\n...<|im_end|>" in tokenizer.decode(examples[2][0])  # earlier answers as the chat shows
    finally:
        tokenizer.chat_template = own


def test_a_template_that_never_renders_the_answer_is_refused_with_the_fix(tokenizer):
    own = tokenizer.chat_template
    try:  # every answer becomes "...": no example can hold what the chat generates
        tokenizer.chat_template = SHORTENS_EARLIER.replace(" and not loop.last", "")
        with pytest.raises(FineTuneError, match="assistant_only_loss=False"):
            ChatFormat(tokenizer).mask_plan([ROWS["multi-turn"]])
    finally:
        tokenizer.chat_template = own
