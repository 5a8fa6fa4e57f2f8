"""Multi-turn rows under chat templates that render earlier turns unlike the chat's prompt (trl's Qwen3.5 / Qwen3.6
templates drop the think block that the prompt opens): each trained assistant turn becomes its own example, and
every example's tokens are exactly what the chat sends and generates at that turn.

The tiny model (2-layer Llama, byte-level BPE) carries the real template from the installed trl package. "What the
chat generates" is measured through the chat's own generation path (`engine.generate`: prompt rendering, stop ids),
with the model's choices forced to the reply the template's family writes (hand-written below), so the comparison
does not depend on random weights.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import trl
from helpers import SYSTEM_PROMPT, fast_config, make_wrapper, write_jsonl
from transformers import LogitsProcessor, LogitsProcessorList

from hfmodel import training

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE_DIR = Path(trl.__file__).parent / "chat_templates"
EXPANDING = sorted(p.stem for p in TEMPLATE_DIR.glob("qwen3_[56]*.jinja") if not p.stem.endswith("_training"))
# What the model writes after the chat's prompt, before the answer: the thinking templates' prompt ends with
# "<think>\n", the non-thinking one's with an empty think block.
BEFORE_ANSWER = {"qwen3_5_nothink": "", "qwen3_5_think": "\n</think>\n\n", "qwen3_6": "\n</think>\n\n"}
EOT = "<|im_end|>"
TURNS = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ember."},
         {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."}]
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TOOL_TURNS = [*TURNS[:2], {"role": "user", "content": "What is 97 times 91?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "97 * 91"}}}]},
              {"role": "tool", "content": "8827"},
              {"role": "assistant", "content": "97 times 91 is 8827."}]


def test_the_templates_under_test_are_trls_qwen3_5_and_qwen3_6():
    assert EXPANDING == ["qwen3_5_nothink", "qwen3_5_think", "qwen3_6"]


@pytest.fixture(scope="module", params=EXPANDING)
def model_dir(request, tmp_path_factory) -> tuple[str, Path]:
    from tiny_model import build_tiny_model

    template = (TEMPLATE_DIR / f"{request.param}.jinja").read_text(encoding="utf-8")
    return request.param, build_tiny_model(tmp_path_factory.mktemp(request.param) / "tiny", template, context=4096)


class ForceReply(LogitsProcessor):
    """Makes generate() pick `reply_ids` one after the other (then anything): what a model that learned them does."""

    def __init__(self, reply_ids: list[int]) -> None:
        self.reply_ids, self.prompt_length = reply_ids, None

    def __call__(self, input_ids, scores):
        self.prompt_length = self.prompt_length or input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.reply_ids):
            scores = torch.full_like(scores, -math.inf)
            scores[:, self.reply_ids[step]] = 0.0
        return scores


def chat_sequence(wrapper, messages: list[dict], reply: str, tools: list[dict] | None = None) -> list[int]:
    """The token ids (prompt + reply) of one chat turn through the chat's own generation path, the model's choices
    forced to `reply`: the prompt as the chat renders it, the reply cut where the chat stops generating."""
    reply_ids = wrapper.tokenizer(reply, add_special_tokens=False)["input_ids"]
    seen: list[list[int]] = []
    module = wrapper.handle.module
    real = module.generate

    def recorded(**kwargs):
        out = real(**kwargs)
        seen.append(out[0].tolist())
        return out

    module.generate = recorded
    try:
        overrides = {"logits_processor": LogitsProcessorList([ForceReply(reply_ids)]), "repetition_penalty": 1.0,
                     "do_sample": False, "max_new_tokens": len(reply_ids) + 8}
        wrapper.engine.generate(messages, wrapper.parameters, overrides, tools)
    finally:
        del module.generate
    return seen[0]


def trained_examples(wrapper, data: Path, tmp_path: Path, monkeypatch, caplog) -> list[tuple[list[int], list[int]]]:
    """Fine-tune (2 steps) on `data`; the examples the run trained on, in row order."""
    plans, plan_run = [], training.plan_run

    def spy(*args, **kwargs):
        plans.append(plan_run(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(training, "plan_run", spy)
    with caplog.at_level(logging.INFO, logger="huggingface_model"):
        result = wrapper.fine_tune(str(data), fast_config(tmp_path, max_steps=2, max_length=4096))
    assert result.steps == 2 and math.isfinite(result.train_loss)
    return plans[0].train


def test_each_example_is_exactly_what_the_chat_sends_and_generates_at_that_turn(model_dir, tmp_path, monkeypatch,
                                                                                   caplog):
    name, folder = model_dir
    wrapper = make_wrapper(folder, max_length=64, do_sample=False)
    data = write_jsonl(tmp_path / "multi.jsonl", [{"messages": TURNS}])
    examples = trained_examples(wrapper, data, tmp_path, monkeypatch, caplog)
    answers = [i for i, m in enumerate(TURNS) if m["role"] == "assistant"]
    assert len(examples) == len(answers) == 3
    system = [{"role": "system", "content": SYSTEM_PROMPT}]  # training gives rows the chat's system prompt
    for i, (ids, mask) in zip(answers, examples, strict=True):
        reply = BEFORE_ANSWER[name] + TURNS[i]["content"] + EOT
        assert ids == chat_sequence(wrapper, system + TURNS[:i], reply), (name, i)
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(ids) - start)  # the loss is on the reply, all of it
        assert wrapper.tokenizer.decode(ids[start:]) == reply
    expanded = [r.getMessage() for r in caplog.records if "expanded" in r.getMessage()]
    assert len(expanded) == 1, expanded
    whole = len(wrapper.tokenizer.apply_chat_template(system + TURNS, tokenize=True, return_dict=True)["input_ids"])
    extra = sum(len(ids) for ids, _ in examples) - whole
    assert "1 multi-turn row(s) expanded into 3 example(s)" in expanded[0]
    assert f"{extra:+,} tokens ({whole:,} rendered whole -> {whole + extra:,})" in expanded[0] and extra > 0


def test_tool_calls_in_an_expanded_row_are_what_the_chat_generates_and_reads(model_dir, tmp_path, monkeypatch,
                                                                              caplog):
    name, folder = model_dir
    wrapper = make_wrapper(folder, max_length=128, do_sample=False)
    fmt = wrapper.handle.format
    assert fmt.tools_supported()
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_TURNS, "tools": [CALCULATOR]}])
    examples = trained_examples(wrapper, data, tmp_path, monkeypatch, caplog)
    system = [{"role": "system", "content": SYSTEM_PROMPT}]
    answers = [i for i, m in enumerate(TOOL_TURNS) if m["role"] == "assistant"]
    assert len(examples) == len(answers) == 3  # the first answer, the call, the answer after the call's result
    for i, (ids, mask) in zip(answers, examples, strict=True):
        start = mask.index(1)
        reply = wrapper.tokenizer.decode(ids[start:])
        assert ids == chat_sequence(wrapper, system + TOOL_TURNS[:i], reply, [CALCULATOR]), (name, i)
        prompt = fmt.prompt_text(system + TOOL_TURNS[:i], [CALCULATOR])
        content, calls, problem = fmt.parse_reply(reply, prompt, [CALCULATOR])  # as the chat reads the reply
        assert problem is None
        if TOOL_TURNS[i].get("tool_calls"):
            assert calls == [{"name": "calculator", "arguments": {"expression": "97 * 91"}}]
        else:
            assert calls == [] and content.strip() == TOOL_TURNS[i]["content"]


def test_dryrun_says_rows_were_expanded_and_what_it_costs(tmp_path, monkeypatch):
    from rich.console import Console
    from test_chat_commands import ANSI, make_chat
    from tiny_model import build_tiny_model

    name = "qwen3_6"  # one template is enough for the chat command
    template = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(build_tiny_model(tmp_path / "tiny", template))
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": TURNS}, {"messages": TURNS[:2]},
                                                  {"messages": TURNS[:4]}])
    console = Console(file=io.StringIO(), width=400, force_terminal=True, color_system="standard")
    c = make_chat(wrapper, tmp_path, data=data, console=console)
    c.run(["/dryrun"])
    step = c.step("/dryrun")
    assert not step.errors, c.console_text
    plain = ANSI.sub("", step.console)
    dry = wrapper.dry_run(str(data))
    assert (dry.expansion.rows, dry.expansion.examples) == (2, 5)
    extra = dry.expansion.tokens - dry.expansion.whole_tokens
    assert extra > 0
    assert ("2 multi-turn row(s) expanded into 5 example(s), one per trained assistant turn" in plain
            and f"{extra:+,} tokens" in plain), plain
    assert "of 6 rows longer than max_length" in plain  # 5 examples from the two multi-turn rows + the one-turn row
    # The first example shown is the first turn after the chat's own prompt, the loss on that turn only.
    marked = "".join(re.findall(r"\x1b\[[0-9;]*42m([^\x1b]*)", step.console))
    assert marked == (BEFORE_ANSWER[name] + TURNS[1]["content"] + EOT).replace("\n", "")  # rich styles by line
    assert json.loads(data.read_text().splitlines()[0])["messages"] == TURNS  # the data file is left as it was
