"""Batched generation: `generate_batch` rows equal single replies, each row stops and reads its tool calls on its
own, and concurrent replies through AgentScope meet on the compute thread as one batch."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from agentscope.message import UserMsg
from agentscope.model import ChatResponse
from helpers import SYSTEM_PROMPT, TAUGHT_ANSWER, TAUGHT_QUESTION, TINY_MAX_LENGTH, chat, make_wrapper

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [TAUGHT_QUESTION, "What is two plus two?", "Hi", "Tell me a long story about a cat and a dog, please."]
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "97 * 91"}}\n</tool_call>'


def singles(wrapper, questions=QUESTIONS):
    return [wrapper.engine.generate(chat(q), wrapper.parameters, {}) for q in questions]


def test_a_greedy_batch_gives_each_row_its_single_reply(tiny_wrapper):
    tiny_wrapper.parameters.do_sample = False
    alone = singles(tiny_wrapper)
    batch = tiny_wrapper.generate_batch([chat(q) for q in QUESTIONS])
    assert tiny_wrapper.handle.compute.batches[-1] == len(QUESTIONS)  # one generate() for all four
    assert [b.text for b in batch] == [g.text for g in alone]
    assert [(b.input_tokens, b.output_tokens) for b in batch] == [(g.input_tokens, g.output_tokens) for g in alone]


def test_seeded_sampling_rows_equal_single_replies_and_n_samples_differ(tiny_wrapper):
    """The chat's settings (temperature 0.3, top-p 0.9). A padded row's logits can differ from the single reply's in
    the last bits (other matmul shapes), which at temperature 1 on random weights can flip a draw now and then."""
    assert tiny_wrapper.parameters.do_sample
    alone = singles(tiny_wrapper)
    batch = tiny_wrapper.generate_batch([chat(q) for q in QUESTIONS])
    assert [b.text for b in batch] == [g.text for g in alone]
    samples = tiny_wrapper.generate_batch([chat(QUESTIONS[0])], n=4)
    assert samples[0].text == alone[0].text  # sample 0 is seeded like the single reply
    assert len({s.text for s in samples}) > 1  # the others have seeds of their own
    seed = tiny_wrapper.parameters.seed
    tiny_wrapper.parameters.seed = seed + 2
    assert tiny_wrapper.generate(chat(QUESTIONS[0])) == samples[2].text


def test_a_batch_of_one_is_exactly_the_single_reply(tiny_wrapper, monkeypatch):
    """Same prompt tensor, same generate() arguments, same output tokens (sampling: the global seeded generator)."""
    calls = []
    original = tiny_wrapper.hf_model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs["input_ids"].clone(), {k: v for k, v in kwargs.items() if k != "input_ids"}, out))
        return out

    monkeypatch.setattr(tiny_wrapper.hf_model, "generate", spy)
    tiny_wrapper.generate(chat())
    [one] = tiny_wrapper.generate_batch([chat()])
    (ids_a, kw_a, out_a), (ids_b, kw_b, out_b) = calls
    assert torch.equal(ids_a, ids_b) and torch.equal(out_a, out_b)
    assert kw_a["do_sample"] is kw_b["do_sample"] is True and set(kw_a) == set(kw_b)
    assert one.output_tokens == out_a.shape[1] - ids_a.shape[1]


def test_rows_that_share_a_long_start_run_it_once_and_still_give_their_single_replies(tiny_wrapper, monkeypatch):
    """Practice rollouts and agents with one prompt share the system prompt and tool schemas: that part is computed
    once for the batch (its cache repeated per row), and every row still gets its own single reply, greedy and
    seeded-sampled."""
    from hfmodel.generation import SHARED_PREFIX_MIN

    system = "You are a careful assistant who checks every step twice before answering. " * 4
    conversations = [chat(q, system=system) for q in QUESTIONS]
    shared: list[int] = []
    original = tiny_wrapper.engine._prefix_cache
    monkeypatch.setattr(tiny_wrapper.engine, "_prefix_cache",
                        lambda ids, n: shared.append(n) or original(ids, n))
    tiny_wrapper.parameters.do_sample = False
    alone = [tiny_wrapper.engine.generate(c, tiny_wrapper.parameters, {}) for c in conversations]
    assert not shared  # a single reply has nothing to share
    batch = tiny_wrapper.generate_batch(conversations)
    assert len(shared) == 1 and shared[0] >= SHARED_PREFIX_MIN
    assert [(b.text, b.output_tokens) for b in batch] == [(g.text, g.output_tokens) for g in alone]
    # Seeded sampling: the same draws as the left-padded batch (on random weights a padded row can differ from its
    # single reply in the last bits, see above, so the padded batch is the reference here).
    tiny_wrapper.parameters.do_sample = True
    sampled = [b.text for b in tiny_wrapper.generate_batch(conversations)]
    monkeypatch.setattr("hfmodel.generation.SHARED_PREFIX_MIN", 10**6)
    assert sampled == [b.text for b in tiny_wrapper.generate_batch(conversations)]
    assert len(shared) == 2


def test_rows_with_little_in_common_are_left_padded_as_before(tiny_wrapper, monkeypatch):
    called = []
    monkeypatch.setattr(tiny_wrapper.engine, "_prefix_cache", lambda ids, n: called.append(n))
    tiny_wrapper.generate_batch([chat(q, system=None) for q in QUESTIONS])
    assert not called


def test_each_row_stops_at_its_own_end_of_turn(taught_wrapper):
    alone = singles(taught_wrapper, [TAUGHT_QUESTION, "Tell me a long story about a cat and a dog, please."])
    taught, other = taught_wrapper.generate_batch([chat(TAUGHT_QUESTION),
                                                   chat("Tell me a long story about a cat and a dog, please.")])
    assert taught.text == TAUGHT_ANSWER and taught.output_tokens == alone[0].output_tokens < TINY_MAX_LENGTH
    assert (other.text, other.output_tokens) == (alone[1].text, alone[1].output_tokens)
    assert other.output_tokens != taught.output_tokens  # one row ran on after the other had stopped


def scripted_rows(wrapper, replies_by_question: dict[str, str], batch_sizes: list[int]):
    """Replace generate() by one that 'generates' a scripted reply per row (looked up by the row's question),
    left-padded batches included, and records the batch sizes."""
    tok = wrapper.tokenizer
    pad = tok.pad_token_id

    def generate(input_ids=None, attention_mask=None, streamer=None, **kwargs):
        batch_sizes.append(int(input_ids.shape[0]))
        rows = []
        for ids in input_ids:
            prompt = tok.decode(ids)
            reply = next(r for q, r in replies_by_question.items() if q in prompt)
            rows.append(tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        if streamer is not None:
            streamer.put(input_ids.cpu())
            for i in range(width):
                streamer.put(new[:, i])
            streamer.end()
        return torch.cat([input_ids, new], dim=1)

    wrapper.hf_model.generate = generate


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tools") / "tiny-llama", context=4096)


def test_each_row_reads_its_own_tool_calls(tool_model_dir):
    from chat.tools import calculator, make_toolkit

    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    schemas = asyncio.run(make_toolkit([calculator]).get_tool_schemas())
    sizes: list[int] = []
    scripted_rows(wrapper, {"97 times 91": "Let me compute.\n" + CALL, "Hello": "Hi there."}, sizes)
    called, plain = wrapper.generate_batch([chat("What is 97 times 91?"), chat("Hello")], tools=schemas)
    assert sizes == [2]
    assert [(c.name, c.input) for c in called.tool_calls] == [("calculator", '{"expression": "97 * 91"}')]
    assert called.text == "Let me compute." and "<tool_call>" not in called.text
    assert (plain.text, plain.tool_calls) == ("Hi there.", [])


def test_concurrent_calls_coalesce_into_one_batch(tiny_wrapper):
    tiny_wrapper.parameters.do_sample = False
    messages = [[UserMsg(name="user", content=q)] for q in QUESTIONS]

    async def whole():
        tiny_wrapper.stream = False
        return [r.content[0].text for r in await asyncio.gather(*(tiny_wrapper(messages=m) for m in messages))]

    async def streamed():
        tiny_wrapper.stream = True

        async def one(m):
            chunks = [chunk async for chunk in await tiny_wrapper(messages=m)]
            assert len(chunks) > 2  # it streamed
            return "".join(b.text for b in chunks[-1].content if b.type == "text").strip()  # the whole reply

        return await asyncio.gather(*(one(m) for m in messages))

    with_system = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = [tiny_wrapper.generate(c) for c in with_system]
    before = len(tiny_wrapper.handle.compute.batches)
    assert asyncio.run(whole()) == expected
    assert asyncio.run(streamed()) == expected
    assert tiny_wrapper.handle.compute.batches[before:] == [len(QUESTIONS), len(QUESTIONS)]


def test_the_compute_thread_survives_a_failing_request(tiny_wrapper, monkeypatch):
    """A batch that fails runs its rows again one by one: only the bad request's caller gets the error."""
    tiny_wrapper.parameters.do_sample = False
    tiny_wrapper.stream = False
    original = tiny_wrapper.hf_model.generate
    tok = tiny_wrapper.tokenizer

    def generate(**kwargs):
        if any("poison" in tok.decode(ids) for ids in kwargs["input_ids"]):
            raise RuntimeError("boom")
        return original(**kwargs)

    monkeypatch.setattr(tiny_wrapper.hf_model, "generate", generate)
    questions = ["Hi", "poison", "What is two plus two?"]

    async def gather():
        return await asyncio.gather(*(tiny_wrapper(messages=[UserMsg(name="user", content=q)]) for q in questions),
                                    return_exceptions=True)

    first, bad, third = asyncio.run(gather())
    assert isinstance(bad, RuntimeError) and str(bad) == "boom"
    assert isinstance(first, ChatResponse) and isinstance(third, ChatResponse)
    assert first.content[0].text == tiny_wrapper.generate([{"role": "user", "content": "Hi"}])
    compute = tiny_wrapper.handle.compute
    assert compute._thread is not None and compute._thread.is_alive()
    with pytest.raises(RuntimeError, match="boom"):  # a streamed reply gets its error too
        asyncio.run(_drain(tiny_wrapper, "poison"))


async def _drain(wrapper, question):
    wrapper.stream = True
    async for _ in await wrapper(messages=[UserMsg(name="user", content=question)]):
        pass


def test_generation_runs_on_one_long_lived_thread(tiny_wrapper, monkeypatch):
    seen: set[int] = set()
    original = tiny_wrapper.hf_model.generate

    def spy(**kwargs):
        seen.add(threading.get_ident())
        return original(**kwargs)

    monkeypatch.setattr(tiny_wrapper.hf_model, "generate", spy)
    tiny_wrapper.generate(chat(), max_new_tokens=2)
    asyncio.run(_drain(tiny_wrapper, "Hi"))
    tiny_wrapper.stream = False
    asyncio.run(tiny_wrapper(messages=[UserMsg(name="user", content="Hi")]))
    assert len(seen) == 1 and threading.get_ident() not in seen


def test_a_wrapper_that_is_gone_leaves_no_model_behind_on_the_compute_thread(tiny_model_dir):
    """The compute thread waits for its next job holding nothing of the last: a job holds its engine and so the whole
    model (the background fine-tune's copy shares the host's thread and would stay in memory until the next reply)."""
    import gc
    import weakref

    wrapper = make_wrapper(tiny_model_dir)
    wrapper.generate(chat(), max_new_tokens=2)
    wrapper.generate_batch([chat(), chat("Hi")], max_new_tokens=2)
    compute, model = wrapper.handle.compute, weakref.ref(wrapper.hf_model)
    del wrapper
    gc.collect()
    assert model() is None
    assert compute._thread is not None and compute._thread.is_alive()  # the thread itself lives on, idle


def test_n_must_be_positive(tiny_wrapper):
    from huggingface_model import UserError

    with pytest.raises(UserError, match="n must be at least 1"):
        tiny_wrapper.generate_batch([chat()], n=0)


def test_the_docs_example_runs_on_the_tiny_model(tool_model_dir, capsys, tmp_path, monkeypatch):
    """docs/batched-generation.md's examples, as written, with the tiny model in place of SmolLM2."""
    import re
    from pathlib import Path

    from huggingface_model import DEFAULT_MODEL_ID

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)  # the fine-tune writes its run folder here
    (tmp_path / "data").symlink_to(root / "data")
    first, mixed = re.findall(r"```python\n(.*?)```", (root / "docs" / "batched-generation.md").read_text(), re.S)
    assert f'model_id="{DEFAULT_MODEL_ID}"' in first
    namespace: dict = {}
    exec(compile(first.replace(f'model_id="{DEFAULT_MODEL_ID}"', f'local_model_path="{tool_model_dir}"'),  # noqa: S102
                  "batched-generation.md", "exec"), namespace)
    assert len(namespace["samples"]) == 4 and namespace["reply"].input_tokens > 0
    assert len(capsys.readouterr().out.splitlines()) == 5  # three replies, the samples, the tool-call line
    exec(compile(mixed, "batched-generation.md", "exec"), namespace)  # noqa: S102
    model, name = namespace["model"], namespace["result"].adapter_name
    assert model.active_adapter == name and model.handle.compute.batches[-1] == 2  # base and adapter: one batch
    assert capsys.readouterr().out.startswith("base: ")


def test_team_agents_on_different_adapters_share_one_batch_and_each_gets_its_own_reply(tiny_model_dir, taught_adapter,
                                                                                    monkeypatch):
    """@all: Ember serves the base, Critic the taught adapter; both replies come from one generate() (peft serves each
    row its own adapter), equal to each agent's reply alone, and each agent keeps serving its own adapter."""
    from chat.team import build_team

    wrapper = make_wrapper(tiny_model_dir, do_sample=False, stream=False)
    team = build_team(wrapper, [{"name": "Ember", "sys_prompt": SYSTEM_PROMPT},
                                {"name": "Critic", "sys_prompt": SYSTEM_PROMPT, "adapter": str(taught_adapter)}])
    models = [team.agent("Ember").model, team.agent("Critic").model]
    ask = [UserMsg(name="user", content=TAUGHT_QUESTION)]

    async def both():
        return [r.content[0].text for r in await asyncio.gather(*(m(messages=ask) for m in models))]

    async def alone(model):
        return (await model(messages=ask)).content[0].text

    singles_ = [asyncio.run(alone(m)) for m in models]
    assert singles_[0] != singles_[1]  # the adapter changes the reply
    compute, generated = wrapper.handle.compute, []
    original = wrapper.handle.module.generate
    monkeypatch.setattr(wrapper.handle.module, "generate", lambda **kw: generated.append(kw) or original(**kw))
    before = len(compute.batches)
    assert asyncio.run(both()) == singles_
    assert compute.batches[before:] == [2] and len(generated) == 1
    assert generated[0]["adapter_names"][0] == "__base__" and generated[0]["adapter_names"][1].startswith("Critic-")
    # Where peft cannot mix adapters in one batch (merged layers, DoRA), the group runs once per adapter.
    monkeypatch.setattr("hfmodel.speedups.can_mix_adapters", lambda model, names: False)
    generated.clear()
    assert asyncio.run(both()) == singles_
    assert len(generated) == 2 and all("adapter_names" not in kw for kw in generated)
    assert [asyncio.run(alone(m)) for m in models] == singles_  # each agent still serves its own adapter


def test_rows_for_different_adapters_share_one_batch_and_each_equals_its_single_reply(taught_wrapper, monkeypatch):
    name = taught_wrapper.active_adapter
    questions = [TAUGHT_QUESTION, TAUGHT_QUESTION, "Hi"]
    adapters = [None, name, "base"]
    expected = []
    for q, adapter in zip(questions, adapters, strict=True):
        with taught_wrapper.serving(None if adapter == "base" else adapter):
            expected.append(taught_wrapper.generate(chat(q)))
    assert expected[1] == TAUGHT_ANSWER != expected[0]
    generated = []
    original = taught_wrapper.hf_model.generate
    monkeypatch.setattr(taught_wrapper.hf_model, "generate", lambda **kw: generated.append(kw) or original(**kw))
    batch = taught_wrapper.generate_batch([chat(q) for q in questions], adapters=adapters)
    assert [b.text for b in batch] == expected
    assert [kw["adapter_names"] for kw in generated] == [["__base__", name, "__base__"]]
    assert taught_wrapper.active_adapter == name and taught_wrapper.generate(chat()) == TAUGHT_ANSWER


def test_a_reply_adapter_serves_one_task_while_the_active_adapter_stays(taught_wrapper):
    """`reply_adapter` picks the adapter of the replies made inside it (per asyncio task): the base here, the taught
    adapter in the task next to it; both run as one batch."""
    name = taught_wrapper.active_adapter
    ask = [UserMsg(name="user", content=TAUGHT_QUESTION)]

    async def reply(adapter):
        with taught_wrapper.reply_adapter(adapter):
            chunks = [chunk async for chunk in await taught_wrapper(messages=ask)]  # streamed, as in the chat
            return "".join(b.text for b in chunks[-1].content if b.type == "text").strip()

    async def both():
        return await asyncio.gather(reply("base"), reply(name))

    with taught_wrapper.serving(None):
        base = taught_wrapper.generate(chat(TAUGHT_QUESTION, system=None))
    tuned = taught_wrapper.generate(chat(TAUGHT_QUESTION, system=None))
    assert base != tuned
    compute = taught_wrapper.handle.compute
    before = len(compute.batches)
    assert asyncio.run(both()) == [base, tuned]
    assert compute.batches[before:] == [2]
    assert taught_wrapper.active_adapter == name


def test_unknown_or_miscounted_adapters_are_refused_in_one_line(taught_wrapper):
    from huggingface_model import UserError

    with pytest.raises(UserError, match="No adapter named 'nope'. Available: base, ft1"):
        taught_wrapper.generate_batch([chat()], adapters=["nope"])
    with pytest.raises(UserError, match="one adapter per conversation"):
        taught_wrapper.generate_batch([chat(), chat()], adapters=[None])
    with pytest.raises(UserError, match="No adapter named 'nope'"):
        taught_wrapper.reply_adapter("nope")
