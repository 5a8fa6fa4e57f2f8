"""The AgentScope side of the wrapper: `await model(messages)` streams ChatResponse chunks."""

from __future__ import annotations

import asyncio
import threading

from agentscope.message import SystemMsg, UserMsg
from agentscope.model import ChatResponse
from helpers import SYSTEM_PROMPT, TAUGHT_ANSWER, TAUGHT_QUESTION, TINY_MAX_LENGTH, chat


def msgs(question: str = TAUGHT_QUESTION):
    return [SystemMsg("system", SYSTEM_PROMPT), UserMsg("user", question)]


def text_of(response: ChatResponse) -> str:
    return "".join(block.text for block in response.content if getattr(block, "type", None) == "text")


async def collect(model, messages) -> list[ChatResponse]:
    stream = await model(messages=messages)
    assert not isinstance(stream, ChatResponse), "stream=True must give an async generator"
    return [chunk async for chunk in stream]


def test_stream_chunks_hold_only_new_text(taught_wrapper):
    chunks = asyncio.run(collect(taught_wrapper, msgs()))
    assert chunks[-1].is_last and all(not c.is_last for c in chunks[:-1])
    deltas = [c for c in chunks[:-1] if c.content]
    assert len(deltas) > 1, "the reply must arrive in several pieces"
    pieces = [text_of(c) for c in deltas]
    assert all(pieces), "no empty deltas"
    final = text_of(chunks[-1])
    assert "".join(pieces) == final  # each chunk is only the new text: no repeats, nothing lost
    assert final.strip() == TAUGHT_ANSWER
    # One text block, growing: every delta and the final chunk share its id.
    ids = {block.id for c in deltas + [chunks[-1]] for block in c.content}
    assert len(ids) == 1


def test_stream_final_chunk_has_usage(taught_wrapper):
    chunks = asyncio.run(collect(taught_wrapper, msgs()))
    usage = chunks[-1].usage
    assert usage is not None
    prompt = taught_wrapper.tokenizer.apply_chat_template(chat(), add_generation_prompt=True, return_dict=True)
    assert usage.input_tokens == len(prompt["input_ids"])
    assert 0 < usage.output_tokens < TINY_MAX_LENGTH  # stopped at <|im_end|>
    answer_tokens = len(taught_wrapper.tokenizer(TAUGHT_ANSWER, add_special_tokens=False)["input_ids"])
    assert usage.output_tokens >= answer_tokens
    assert usage.time > 0


def test_stream_matches_sync_generate(tiny_wrapper):
    tiny_wrapper.parameters.do_sample = False
    expected = tiny_wrapper.generate(chat())
    chunks = asyncio.run(collect(tiny_wrapper, msgs()))
    assert text_of(chunks[-1]).strip() == expected
    assert 0 < chunks[-1].usage.output_tokens <= TINY_MAX_LENGTH


def test_non_streaming_call(taught_wrapper):
    taught_wrapper.stream = False
    response = asyncio.run(taught_wrapper(messages=msgs()))
    assert isinstance(response, ChatResponse) and response.is_last
    assert text_of(response) == TAUGHT_ANSWER
    assert 0 < response.usage.output_tokens < TINY_MAX_LENGTH


def test_closing_the_stream_early_stops_generation(tiny_wrapper):
    tiny_wrapper.parameters.max_length = 400
    tiny_wrapper.parameters.do_sample = False

    async def first_chunk_then_close():
        stream = await tiny_wrapper(messages=msgs())
        first = await stream.__anext__()
        await stream.aclose()
        return first

    first = asyncio.run(first_chunk_then_close())
    assert text_of(first)
    assert not [t for t in threading.enumerate() if t.name == "hf-generate" and t.is_alive()]
    # The generation lock was released: the next reply works at once.
    assert isinstance(tiny_wrapper.generate(chat(), max_new_tokens=2), str)


def test_count_tokens_uses_the_tokenizer(tiny_wrapper):
    n = asyncio.run(tiny_wrapper.count_tokens(msgs()))
    expected = tiny_wrapper.tokenizer.apply_chat_template(chat(), return_dict=True)
    assert n == len(expected["input_ids"])
