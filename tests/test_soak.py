"""Soak: a 200-turn scripted chat on the tiny model stays inside the context window and does not leak.

Resident memory (VmRSS) is measured after a warm-up of 20 turns and again after turn 200: it may grow by
at most 10 %. Every prompt the model sees is recorded (by wrapping `encode`) and must fit the window
with room for the reply. Generation threads and the event loop must not pile up either.
"""

from __future__ import annotations

import gc
import io
import logging
import threading

import pytest
from helpers import make_wrapper

TURNS = 200
WARM_UP = 20
NEW_TOKENS = 8


def rss_kib() -> int:
    """Current resident set size in KiB (not the peak that resource.getrusage reports)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss // 1024


def generation_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "hf-generate" and t.is_alive())


def other_threads() -> list[str]:
    """Live threads, leaving out asyncio's default executor (it grows on demand up to min(32, cpus + 4))."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("asyncio_"))


@pytest.mark.slow
def test_200_turn_chat_keeps_memory_flat_and_every_prompt_inside_the_window(tiny_model_dir, monkeypatch, caplog,
                                                                            record_property):
    from rich.console import Console

    from chat.commands import ChatSession
    from finetune_dialogagent import Finetune_DialogAgent, UserAgent

    wrapper = make_wrapper(tiny_model_dir, max_length=NEW_TOKENS)  # sampling with a seed, as in the chat
    prompt_lengths: list[int] = []
    encode = wrapper.engine.encode

    def recording_encode(messages, max_new_tokens, tools=None):
        enc = encode(messages, max_new_tokens, tools)
        prompt_lengths.append(int(enc["input_ids"].shape[1]))
        return enc

    monkeypatch.setattr(wrapper.engine, "encode", recording_encode)
    agent = Finetune_DialogAgent(name="Assistant", sys_prompt="You are Ember. Answer briefly.", model=wrapper)
    samples: dict[int, dict[str, int]] = {}
    asked = 0

    def script(prompt: str) -> str:
        nonlocal asked
        if asked in (WARM_UP, TURNS):  # `asked` turns have been answered completely
            gc.collect()
            samples[asked] = {"rss_kib": rss_kib(), "threads": other_threads(), "generating": generation_threads()}
        if asked == TURNS:
            return "exit"
        asked += 1
        return f"Tell me fact number {asked} about the quick brown fox, please."

    out = io.StringIO()
    session = ChatSession(agent, UserAgent(input_fn=script), console=Console(file=io.StringIO()), out=out)
    with caplog.at_level(logging.WARNING, logger="huggingface_model"):
        assert session.run() == 0

    warm, end = samples[WARM_UP], samples[TURNS]
    growth = (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"]
    figures = (f"{TURNS} turns: VmRSS {warm['rss_kib'] / 1024:.1f} MiB after turn {WARM_UP} -> "
               f"{end['rss_kib'] / 1024:.1f} MiB after turn {TURNS} ({growth:+.1%}); "
               f"prompt tokens max {max(prompt_lengths)} of window {wrapper.context_size}")
    print(figures)
    record_property("soak", figures)

    assert asked == TURNS and len(prompt_lengths) == TURNS
    assert out.getvalue().count("Assistant: ") == TURNS  # every turn got its reply
    assert len(agent.history()) == 2 * TURNS  # the whole conversation is kept ...
    # ... but no prompt ever exceeds the window minus the reply's tokens.
    assert max(prompt_lengths) <= wrapper.context_size - NEW_TOKENS
    assert "left out the" in caplog.text  # the conversation did outgrow the window, and the user was told
    assert growth <= 0.10, figures
    assert len(end["threads"]) <= len(warm["threads"]), (warm["threads"], end["threads"])
    assert end["generating"] == 0


def test_trimming_a_long_conversation_renders_it_a_bounded_number_of_times(tiny_wrapper, monkeypatch):
    history = [{"role": "system", "content": "You are Ember."}]
    for i in range(200):
        history += [{"role": "user", "content": f"Tell me fact number {i} about the fox."},
                    {"role": "assistant", "content": f"Fact {i}: it is quick and brown."}]
    history.append({"role": "user", "content": "And the last one?"})
    calls = 0
    render = tiny_wrapper.tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return render(*args, **kwargs)

    monkeypatch.setattr(tiny_wrapper.tokenizer, "apply_chat_template", counting)
    enc = tiny_wrapper.encode(history, NEW_TOKENS)
    assert enc["input_ids"].shape[1] <= tiny_wrapper.context_size - NEW_TOKENS
    assert calls <= 20  # e.g. a binary search over the cut point, or per-turn token counts
