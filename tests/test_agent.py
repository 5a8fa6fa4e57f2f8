"""Finetune_DialogAgent over the tiny model, and the terminal UserAgent."""

from __future__ import annotations

import asyncio

import pytest
from agentscope.message import UserMsg
from helpers import SYSTEM_PROMPT, TAUGHT_ANSWER, TAUGHT_QUESTION, fast_config, identity_rows, write_jsonl

from finetune_dialogagent import Finetune_DialogAgent, UserAgent, build_model
from huggingface_model import HuggingFaceWrapper


def reply(agent, text: str) -> list[str]:
    async def run():
        return [piece async for piece in agent.stream_reply(UserMsg("User", text))]

    return asyncio.run(run())


class PromptSpy:
    """Records the decoded prompt of every `hf_model.generate` call."""

    def __init__(self, wrapper, monkeypatch):
        self.prompts: list[list[int]] = []
        original = wrapper.hf_model.generate

        def spy(*args, **kwargs):
            self.prompts.append(kwargs["input_ids"][0].tolist())
            return original(*args, **kwargs)

        monkeypatch.setattr(wrapper.hf_model, "generate", spy)


def test_reply_streams_and_history_has_both_turns(taught_wrapper):
    agent = Finetune_DialogAgent("Assistant", SYSTEM_PROMPT, taught_wrapper)
    pieces = reply(agent, TAUGHT_QUESTION)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces).strip() == TAUGHT_ANSWER
    assert [(m.role, m.get_text_content()) for m in agent.state.context] == [
        ("user", TAUGHT_QUESTION), ("assistant", TAUGHT_ANSWER)]
    assert agent.history() == [{"role": "user", "content": TAUGHT_QUESTION},
                               {"role": "assistant", "content": TAUGHT_ANSWER}]
    assert "<system-reminder>" not in agent.state.model_dump_json()


def test_model_sees_system_prompt_and_history(taught_wrapper, monkeypatch):
    agent = Finetune_DialogAgent("Assistant", SYSTEM_PROMPT, taught_wrapper)
    spy = PromptSpy(taught_wrapper, monkeypatch)
    reply(agent, TAUGHT_QUESTION)
    reply(agent, "What is two plus two?")
    tok = taught_wrapper.tokenizer
    first = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": TAUGHT_QUESTION}],
                                    add_generation_prompt=True, return_dict=True)["input_ids"]
    second = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": TAUGHT_QUESTION},
                                      {"role": "assistant", "content": TAUGHT_ANSWER},
                                      {"role": "user", "content": "What is two plus two?"}],
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    assert spy.prompts == [list(first), list(second)]
    assert len(agent.state.context) == 4
    assert "<system-reminder>" not in agent.state.model_dump_json()


def test_history_survives_fine_tune(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_wrapper.parameters.do_sample = False
    agent = Finetune_DialogAgent("Assistant", SYSTEM_PROMPT, tiny_wrapper)
    reply(agent, "Hello!")
    before = agent.state.model_dump()["context"]
    assert len(before) == 2
    data = write_jsonl(tmp_path / "a.jsonl", identity_rows())
    result = agent.fine_tune(str(data), fast_config(tmp_path, max_steps=4))
    assert result.adapter_name == "ft1" and tiny_wrapper.active_adapter == "ft1"
    assert agent.state.model_dump()["context"] == before
    reply(agent, TAUGHT_QUESTION)
    assert [m.role for m in agent.state.context] == ["user", "assistant", "user", "assistant"]
    assert agent.state.context[2].get_text_content() == TAUGHT_QUESTION
    assert "<system-reminder>" not in agent.state.model_dump_json()


def test_sys_prompt_reaches_the_model_and_training_rows(taught_wrapper, monkeypatch):
    agent = Finetune_DialogAgent("Assistant", SYSTEM_PROMPT, taught_wrapper)
    spy = PromptSpy(taught_wrapper, monkeypatch)
    agent.sys_prompt = "You are Blaze."
    assert taught_wrapper.system_prompt == "You are Blaze."  # training rows without a system prompt get it
    reply(agent, "Hi")
    assert taught_wrapper.tokenizer.decode(spy.prompts[-1]).startswith("<|im_start|>system\nYou are Blaze.<|im_end|>")


def test_agent_built_from_model_configs(tiny_model_dir):
    configs = [{"model_type": "huggingface", "config_name": "tiny-from-config",
                "local_model_path": str(tiny_model_dir), "max_length": 8}]
    agent = Finetune_DialogAgent("Assistant", "Be brief.", "tiny-from-config", model_configs=configs)
    assert isinstance(agent.model, HuggingFaceWrapper)
    assert agent.model.config_name == "tiny-from-config" and agent.model.parameters.max_length == 8
    assert agent.model.system_prompt == "Be brief."
    with pytest.raises(ValueError, match="tiny-from-config"):  # the error lists the known names
        build_model("no-such-config")
    with pytest.raises(ValueError, match="config_name"):
        build_model("x", [{"model_type": "huggingface"}])


# ------------------------------------------------------------------------------------------ UserAgent


def feeder(*items):
    """An input function returning items in order; exception classes/instances are raised."""
    queue = list(items)
    prompts = []

    def input_fn(prompt):
        prompts.append(prompt)
        item = queue.pop(0)
        if isinstance(item, BaseException) or (isinstance(item, type) and issubclass(item, BaseException)):
            raise item
        return item

    input_fn.prompts = prompts
    input_fn.queue = queue
    return input_fn


@pytest.mark.parametrize("word", ["exit", "EXIT", " exit ", "Exit\n"])
def test_exit_words_end_the_chat(word):
    assert UserAgent(input_fn=feeder(word, "never read")).read() is None


@pytest.mark.parametrize("error", [EOFError, KeyboardInterrupt])
def test_eof_and_ctrl_c_end_the_chat(error):
    assert UserAgent(input_fn=feeder(error)).read() is None


def test_empty_lines_are_skipped():
    fn = feeder("", "   ", "\t", "  hello there  ", "next")
    user = UserAgent(input_fn=fn, prompt="You: ")
    assert user.read() == "hello there"
    assert fn.queue == ["next"]  # stopped reading after the first real line
    assert fn.prompts == ["You: "] * 4


def test_exit_inside_a_sentence_is_a_message():
    assert UserAgent(input_fn=feeder("exit the loop please")).read() == "exit the loop please"


def test_call_returns_a_user_message():
    user = UserAgent(name="Alice", input_fn=feeder("hi", "exit"))
    msg = user()
    assert msg.role == "user" and msg.name == "Alice" and msg.get_text_content() == "hi"
    assert user() is None
