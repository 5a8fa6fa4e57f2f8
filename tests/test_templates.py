"""training_template: renders exactly like the model's own chat template and marks only assistant tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from huggingface_model import CHATML_TEMPLATE, FineTuneError, has_generation_markers, training_template

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


def assistant_spans(tokenizer, row, template) -> list[str]:
    """The decoded runs of consecutive tokens that the template marks as assistant tokens."""
    out = tokenizer.apply_chat_template(row, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert len(ids) == len(mask)
    assert ids == list(tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"])
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
    template = training_template(tokenizer, [row])
    assert has_generation_markers(template)
    assert render(tokenizer, row, template) == render(tokenizer, row)
    # The chat prompt (generation prompt after a user turn) agrees too.
    prompt = row[:-1]
    assert render(tokenizer, prompt, template, add_generation_prompt=True) == \
        render(tokenizer, prompt, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(ROWS))
def test_mask_covers_assistant_content_and_end_of_turn(tokenizer, name):
    row = ROWS[name]
    template = training_template(tokenizer, list(ROWS.values()))
    expected = [m["content"] + "<|im_end|>" for m in row if m["role"] == "assistant"]
    assert assistant_spans(tokenizer, row, template) == expected


def test_rows_without_system_prompt_never_get_a_mismatching_template(tokenizer):
    # The tiny template (like SmolLM2's) injects a default system prompt; ChatML does not.
    row = ROWS["single"][1:]
    try:
        template = training_template(tokenizer, [row])
    except FineTuneError as e:
        assert "assistant_only_loss" in str(e)
    else:
        assert render(tokenizer, row, template) == render(tokenizer, row)


def test_template_with_markers_is_used_as_is(tokenizer):
    own = tokenizer.chat_template
    try:
        tokenizer.chat_template = CHATML_TEMPLATE
        assert training_template(tokenizer, [ROWS["single"]]) == CHATML_TEMPLATE
    finally:
        tokenizer.chat_template = own


def test_non_chatml_template_is_refused_with_the_fix(tokenizer):
    own = tokenizer.chat_template
    try:
        tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %} {{ m['content'] }}</s>{% else %}<<SYS>>{{ m['content'] }}<</SYS>>"
            "{% endif %}{% endfor %}"
        )
        with pytest.raises(FineTuneError, match="assistant_only_loss=False"):
            training_template(tokenizer, [ROWS["single"]])
    finally:
        tokenizer.chat_template = own
