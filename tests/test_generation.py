"""Replies: chat-template prompts, determinism, stopping at the end of the turn, window handling."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import SYSTEM_PROMPT, TAUGHT_ANSWER, TAUGHT_QUESTION, TINY_MAX_LENGTH, chat, make_wrapper


class GenerateSpy:
    """Wraps `hf_model.generate` to record the prompt ids and the full output of every call."""

    def __init__(self, wrapper, monkeypatch):
        self.calls: list[dict] = []
        original = wrapper.hf_model.generate

        def spy(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append({"input_ids": kwargs["input_ids"].clone(), "output": out.clone(), "kwargs": kwargs})
            return out

        monkeypatch.setattr(wrapper.hf_model, "generate", spy)

    @property
    def last(self) -> dict:
        return self.calls[-1]

    def new_tokens(self, call: dict | None = None) -> torch.Tensor:
        call = call or self.last
        return call["output"][0, call["input_ids"].shape[1]:]


def test_generate_returns_text(tiny_wrapper):
    reply = tiny_wrapper.generate(chat())
    assert isinstance(reply, str)
    assert reply == reply.strip()


def test_greedy_is_deterministic(tiny_wrapper, tiny_model_dir):
    first = tiny_wrapper.generate(chat(), do_sample=False)
    assert first  # the random tiny model still produces some text in 16 tokens
    assert tiny_wrapper.generate(chat(), do_sample=False) == first
    assert make_wrapper(tiny_model_dir).generate(chat(), do_sample=False) == first


def test_sampling_with_a_seed_is_reproducible(tiny_wrapper):
    assert tiny_wrapper.parameters.do_sample and tiny_wrapper.parameters.seed == 1234
    first = tiny_wrapper.generate(chat(), temperature=1.0)
    torch.manual_seed(999)  # global RNG state in between must not matter: the wrapper reseeds
    assert tiny_wrapper.generate(chat(), temperature=1.0) == first


def test_prompt_is_the_tokenizers_chat_template(tiny_wrapper, monkeypatch):
    spy = GenerateSpy(tiny_wrapper, monkeypatch)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What is two plus two?"},
    ]
    tiny_wrapper.generate(messages, do_sample=False)
    expected = tiny_wrapper.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert spy.last["input_ids"][0].tolist() == list(expected["input_ids"])
    text = tiny_wrapper.tokenizer.decode(spy.last["input_ids"][0])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_generation_settings_reach_generate(tiny_wrapper, monkeypatch):
    spy = GenerateSpy(tiny_wrapper, monkeypatch)
    tiny_wrapper.generate(chat(), do_sample=False, max_new_tokens=3)
    kwargs = spy.last["kwargs"]
    assert kwargs["max_new_tokens"] == 3 and kwargs["do_sample"] is False
    assert "temperature" not in kwargs and "top_p" not in kwargs  # greedy: no sampling warnings
    assert len(spy.new_tokens()) <= 3
    im_end = tiny_wrapper.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in kwargs["eos_token_id"]


def test_the_repetition_penalty_counts_the_reply_only_and_spares_digits(tiny_wrapper, monkeypatch):
    """The prompt holds what a reply must copy (the question's numbers, tool results, the call format): only the
    reply's own tokens are penalised, and digit tokens never (they repeat inside any number)."""
    from hfmodel.generation import ReplyRepetitionPenalty, digit_tokens

    penalty = ReplyRepetitionPenalty(2.0, prompt_length=4, spared=torch.tensor([3]))
    scores = torch.full((1, 10), 2.0)
    out = penalty(torch.tensor([[1, 2, 3, 5, 3, 6]]), scores.clone())  # prompt 1 2 3 5; reply so far 3 6
    assert out[0, 6] == 1.0  # a token of the reply: penalised
    assert out[0, 1] == 2.0 and out[0, 5] == 2.0  # tokens of the prompt only: not
    assert out[0, 3] == 2.0  # a digit token in the reply: spared
    tok = tiny_wrapper.tokenizer
    digits = set(tok.convert_ids_to_tokens(digit_tokens(tok).tolist()))
    assert set("0123456789") <= digits and not digits & {"a", "<|im_end|>"}

    spy = GenerateSpy(tiny_wrapper, monkeypatch)
    tiny_wrapper.generate(chat(), do_sample=False, max_new_tokens=3, repetition_penalty=1.3)
    kwargs = spy.last["kwargs"]
    assert kwargs["repetition_penalty"] == 1.0  # transformers' own (which counts the prompt) is off
    [ours] = kwargs["logits_processor"]
    assert ours.penalty == 1.3 and ours.prompt_ignore_length == spy.last["input_ids"].shape[1]


def test_max_length_caps_new_tokens(tiny_wrapper, monkeypatch):
    spy = GenerateSpy(tiny_wrapper, monkeypatch)
    tiny_wrapper.generate(chat(), do_sample=False)
    assert 0 < len(spy.new_tokens()) <= TINY_MAX_LENGTH


def test_reply_stops_at_end_of_turn(taught_wrapper, monkeypatch):
    spy = GenerateSpy(taught_wrapper, monkeypatch)
    reply = taught_wrapper.generate(chat(TAUGHT_QUESTION))
    assert reply == TAUGHT_ANSWER
    new = spy.new_tokens()
    assert len(new) < TINY_MAX_LENGTH  # it stopped by itself, not at the length cap
    assert taught_wrapper.tokenizer.convert_ids_to_tokens(int(new[-1])) == "<|im_end|>"
    assert "<|im" not in reply


def test_long_conversation_drops_oldest_turns_but_keeps_system(tiny_wrapper, monkeypatch, caplog):
    spy = GenerateSpy(tiny_wrapper, monkeypatch)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i in range(40):
        messages += [{"role": "user", "content": f"Question number {i}: the quick brown fox jumps over the lazy dog?"},
                     {"role": "assistant", "content": f"Answer {i}: the quick brown fox jumps over the lazy dog."}]
    messages.append({"role": "user", "content": "Last question: what is two plus two?"})
    full = tiny_wrapper.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert len(full["input_ids"]) > tiny_wrapper.context_size  # the conversation really overflows
    with caplog.at_level(logging.WARNING, logger="huggingface_model"):
        tiny_wrapper.generate(messages, do_sample=False, max_new_tokens=4)
    prompt_ids = spy.last["input_ids"][0]
    assert len(prompt_ids) <= tiny_wrapper.context_size - 4
    text = tiny_wrapper.tokenizer.decode(prompt_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
    assert "Question number 0:" not in text
    assert "Question number 39:" in text and "Answer 39:" in text
    assert text.endswith("Last question: what is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    # Whole turns are dropped: every kept question still has its answer.
    kept = [i for i in range(40) if f"Question number {i}:" in text]
    assert kept == list(range(kept[0], 40))
    assert all(f"Answer {i}:" in text for i in kept)
    assert any("left out" in r.getMessage() for r in caplog.records)


def test_generation_after_the_wrapper_switches_to_base(taught_wrapper):
    assert taught_wrapper.generate(chat()) == TAUGHT_ANSWER
    taught_wrapper.use_adapter("base")
    assert taught_wrapper.generate(chat()) != TAUGHT_ANSWER
    taught_wrapper.undo()
    assert taught_wrapper.active_adapter == "ft1"
    assert taught_wrapper.generate(chat()) == TAUGHT_ANSWER


@pytest.mark.parametrize("name", ["nope", "ft9"])
def test_unknown_adapter_name(taught_wrapper, name):
    from huggingface_model import ModelLoadError

    with pytest.raises(ModelLoadError, match="Available: base, ft1"):
        taught_wrapper.use_adapter(name)
