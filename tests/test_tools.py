"""Tool calling: a local model drives an AgentScope agent's toolkit (rendering, parsing, streaming, permission),
and the shipped calculator."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import make_wrapper, scripted_generate

from chat.tools import calculator, make_toolkit
from finetune_dialogagent import Finetune_DialogAgent, ToolLine
from hfmodel.replies import template_messages

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "97 * 91"}}\n</tool_call>'


def run_reply(agent, text: str, confirm=None) -> list[str]:
    from agentscope.message import UserMsg

    async def collect():
        return [piece async for piece in agent.stream_reply(UserMsg(name="User", content=text), confirm=confirm)]

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """The tiny model with a window that holds the tool schemas (its byte-level vocabulary spends many tokens)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tools") / "tiny-llama", context=4096)


@pytest.fixture
def agent(tool_model_dir):
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)  # a call is ~80 byte-level tokens
    return Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])


def test_a_tool_call_runs_through_the_agent_and_its_result_comes_back_through_the_template(agent):
    prompts: list[str] = []
    scripted_generate(agent.model, [CALL, "97 times 91 is 8827."], prompts)
    pieces = run_reply(agent, "What is 97 times 91?")
    lines = [p for p in pieces if isinstance(p, ToolLine)]
    text = "".join(p for p in pieces if not isinstance(p, ToolLine))
    assert lines == ['-> calculator(expression="97 * 91") = 8827']
    assert text == "97 times 91 is 8827."
    assert "<tool_call>" not in text
    # The tool schemas were rendered for the model; the result went back as a tool response.
    assert '"name": "calculator"' in prompts[0] and "<tools>" in prompts[0]
    assert "<tool_response>\n8827\n</tool_response>" in prompts[1]
    kinds = [b.type for m in agent.state.context for b in m.get_content_blocks()]
    assert "tool_call" in kinds and "tool_result" in kinds


def test_text_before_a_call_streams_and_markup_never_shows(agent):
    scripted_generate(agent.model, ["Let me compute that.\n" + CALL, "It is 8827."], [])
    pieces = run_reply(agent, "What is 97 times 91?")
    text = "".join(p for p in pieces if not isinstance(p, ToolLine))
    assert text.startswith("Let me compute that.") and text.endswith("It is 8827.")
    assert "tool_call" not in text and "{" not in text


def test_a_malformed_call_becomes_text_and_a_warning_not_a_crash(agent, caplog):
    broken = '<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call>'
    scripted_generate(agent.model, [broken], [])
    pieces = run_reply(agent, "What is 97 times 91?")
    assert not any(isinstance(p, ToolLine) for p in pieces)
    assert "calculator" in "".join(pieces)
    assert "could not be read" in caplog.text


def test_a_call_to_an_unknown_tool_is_not_run(agent, caplog):
    scripted_generate(agent.model, ['<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'], [])
    pieces = run_reply(agent, "Delete everything.")
    assert not any(isinstance(p, ToolLine) for p in pieces)
    assert "not one of the offered tools" in caplog.text


def test_tool_choice_none_renders_no_tools_and_named_choice_filters(tool_model_dir):
    from agentscope.message import UserMsg
    from agentscope.tool import ToolChoice

    wrapper = make_wrapper(tool_model_dir, max_length=4, do_sample=False, stream=False)
    prompts: list[str] = []
    schemas = [{"type": "function", "function": {"name": n, "description": n, "parameters": {
        "type": "object", "properties": {}}}} for n in ("calculator", "weather")]
    scripted_generate(wrapper, ["Hi.", "Hi.", "Hi."], prompts)
    for choice in (ToolChoice(mode="none"), ToolChoice(mode="auto", tools=["weather"]), None):
        asyncio.run(wrapper([UserMsg(name="User", content="Hello")], tools=schemas, tool_choice=choice))
    assert "<tools>" not in prompts[0]
    assert '"weather"' in prompts[1] and '"calculator"' not in prompts[1]
    assert '"weather"' in prompts[2] and '"calculator"' in prompts[2]


def test_a_tool_that_needs_permission_asks_and_a_refusal_is_respected(tool_model_dir):
    ran = []

    def shout(text: str) -> str:
        """Upper-case a text.

        Args:
            text (str): the text.
        """
        ran.append(text)
        return text.upper()

    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[shout])
    call = '<tool_call>\n{"name": "shout", "arguments": {"text": "hi"}}\n</tool_call>'
    asked = []
    scripted_generate(wrapper, [call, "Done."], [])
    run_reply(agent, "Shout hi.", confirm=lambda c: asked.append(c.name) or False)
    assert asked == ["shout"] and ran == []
    scripted_generate(wrapper, [call, "Done."], [])
    pieces = run_reply(agent, "Shout hi.", confirm=lambda c: True)
    assert ran == ["hi"] and '-> shout(text="hi") = HI' in pieces


def test_history_with_calls_renders_as_tool_calls_and_tool_messages():
    formatted = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "a", "arguments": {}}}]},
                 {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "b",
                                                                                    "arguments": '{"x": 1}'}}]},
                 {"role": "tool", "tool_name": "a", "content": "1"}, {"role": "tool", "tool_name": "b", "content": "2"}]
    messages = template_messages(formatted)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["function"]["name"] for c in messages[1]["tool_calls"]] == ["a", "b"]
    assert messages[1]["tool_calls"][1]["function"]["arguments"] == {"x": 1}
    assert messages[2]["name"] == "a"


@pytest.mark.parametrize("expression, expected", [
    ("97 * 91", "8827"), ("(2.5 + 3) / 2", "2.75"), ("2 ** 10", "1024"), ("-3.5 * 2", "-7"), ("7 / 3", "2.333333333"),
])
def test_calculator_does_arithmetic(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os').system('touch pwned')", "not allowed"), ("open('x')", "not allowed"), ("1 / 0", "division"),
    ("2 ** 100000", "too large"), ("(10 ** 1000) ** 1000", "digits"), ("abc", "not allowed"), ("1 +", "not an"),
    ("[1] * 10", "not allowed"),
])
def test_calculator_refuses_what_is_not_arithmetic(expression, problem):
    result = calculator(expression)
    assert result.startswith("error:") and problem in result


def test_shipped_tools_run_without_asking_and_others_ask():
    def mine(x: str) -> str:
        """Echo.

        Args:
            x (str): text.
        """
        return x

    toolkit = make_toolkit([calculator, mine])
    tools = {name: asyncio.run(toolkit.get_tool(name)) for name in ("calculator", "mine")}
    schemas = asyncio.run(toolkit.get_tool_schemas())
    assert {"calculator", "mine"} <= {s["function"]["name"] for s in schemas}
    assert asyncio.run(tools["calculator"].check_permissions()).behavior.name == "ALLOW"
    assert asyncio.run(tools["mine"].check_permissions()).behavior.name == "ASK"
    assert tools["calculator"].is_read_only and not tools["mine"].is_read_only
    assert json.loads(calculator("1+1")) == 2


# ------------------------------------------------------------------------------------------ training on tool use

SCHEMA = {"type": "function", "function": {"name": "calculator", "description": "Arithmetic.", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def tool_row(question="What is 97 times 91?", expression="97 * 91", result="8827", answer="It is 8827.",
             arguments=None, name="calculator", tools=(SCHEMA,)):
    row = {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": name, "arguments": arguments if arguments is not None else {"expression": expression}}}]},
        {"role": "tool", "name": name, "content": result},
        {"role": "assistant", "content": answer}]}
    if tools is not None:
        row["tools"] = list(tools)
    return row


def test_tool_datasets_are_read_and_bad_calls_are_skipped_and_counted(tmp_path):
    from hfmodel.chat_format import split_tools
    from hfmodel.data import load_chat_dataset

    rows = [tool_row(), tool_row(arguments='{"expression": "1 + 1"}'),  # arguments as JSON text
            tool_row(name="weather"),  # a tool missing from `tools`
            tool_row(arguments="[1, 2]"),  # not a JSON object
            {**tool_row(), "tools": json.dumps([SCHEMA])}]  # tools as JSON text
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_chat_dataset(str(path))
    assert len(data.rows) == 3
    assert data.skipped == {"a call to a tool missing from 'tools'": 1, "tool call arguments not a JSON object": 1}
    messages, tools = split_tools(data.rows[1])
    assert tools[0]["function"]["name"] == "calculator"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"expression": "1 + 1"}
    assert messages[2] == {"role": "tool", "name": "calculator", "content": "8827"}


def test_sharegpt_function_call_and_observation_rows(tmp_path):
    from hfmodel.chat_format import split_tools
    from hfmodel.data import normalize_rows

    row = {"conversations": [
        {"from": "human", "value": "What is 2 plus 2?"},
        {"from": "function_call", "value": json.dumps({"name": "calculator", "arguments": {"expression": "2 + 2"}})},
        {"from": "observation", "value": "4"}, {"from": "gpt", "value": "4."}], "tools": json.dumps([SCHEMA])}
    data = normalize_rows([row])
    messages, tools = split_tools(data.rows[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "2 + 2"}}
    assert tools == [SCHEMA]


def test_loss_covers_the_call_and_the_answer_but_never_the_tool_result(tool_model_dir):
    from transformers import AutoTokenizer

    from hfmodel.chat_format import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(str(tool_model_dir))
    fmt = ChatFormat(tokenizer)
    row = [{"role": "system", "content": "You are Ember."}, *tool_row()["messages"]]
    row[0]["tools"] = [SCHEMA]
    ids, mask = fmt.mask_plan([row]).tokenize(row)
    spans, current = [], []
    for token, bit in zip(ids, mask, strict=True):
        if bit:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "97 * 91"}}\n</tool_call>'
                     '<|im_end|>', "It is 8827.<|im_end|>"]
    # Training renders exactly what the chat renders for the same conversation (the tool result included).
    chat_prompt = fmt.prompt_text(row[:4], [SCHEMA])
    assert tokenizer.decode(ids).startswith(chat_prompt)


def test_a_short_fine_tune_on_tool_rows_teaches_the_call(tool_model_dir, tmp_path):
    from helpers import fast_config, write_jsonl

    wrapper = make_wrapper(tool_model_dir, max_length=96, do_sample=False)
    schemas = asyncio.run(make_toolkit([calculator]).get_tool_schemas())  # what the agent will offer
    data = write_jsonl(tmp_path / "tools.jsonl", [tool_row(tools=schemas)] * 8)
    result = wrapper.fine_tune(str(data), fast_config(tmp_path, max_steps=40, learning_rate=2e-2))
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0] / 2
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])
    pieces = run_reply(agent, "What is 97 times 91?")
    assert '-> calculator(expression="97 * 91") = 8827' in pieces, pieces


def test_a_session_log_round_trips_into_fine_tune(agent, tmp_path):
    from chat.session_log import SessionLog

    log = SessionLog(tmp_path / "runs")
    scripted_generate(agent.model, [CALL, "97 times 91 is 8827."], [])
    before = len(agent.state.context)
    run_reply(agent, "What is 97 times 91?")
    schemas = asyncio.run(agent.toolkit.get_tool_schemas())
    asyncio.run(log.record(agent.sys_prompt, agent.state.context[before:], schemas))
    row = json.loads(log.path.read_text())
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert row["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"expression": "97 * 91"}
    from hfmodel.data import load_chat_dataset

    data = load_chat_dataset(str(log.path))
    assert len(data.rows) == 1 and not data.skipped
    plan = agent.model.handle.format.mask_plan(data.rows)
    ids, mask = plan.tokenize(data.rows[0])
    assert sum(mask) > 0


# ------------------------------------------------------------------------------------------ in the chat


def tool_chat(tool_model_dir, tmp_path, lines, replies, session_log=True, max_length=256):
    import io

    from rich.console import Console

    from chat.commands import ChatSession
    from finetune_dialogagent import UserAgent

    wrapper = make_wrapper(tool_model_dir, max_length=max_length, do_sample=False)
    scripted_generate(wrapper, replies, [])
    agent = Finetune_DialogAgent(name="Assistant", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])
    feed = iter(lines)
    user = UserAgent(input_fn=lambda prompt: next(feed))
    out, console = io.StringIO(), io.StringIO()
    base = {"fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs")}}}
    session = ChatSession(agent, user, base_config=base, console=Console(file=console, width=200),
                          out=out, session_log=session_log)
    assert session.run() == 0
    return session, out.getvalue(), console.getvalue()


def test_the_chat_shows_a_call_as_one_line_then_streams_the_reply_and_logs_the_session(tool_model_dir, tmp_path):
    session, out, console = tool_chat(tool_model_dir, tmp_path, ["What is 97 times 91?", "/history", "exit"],
                                      [CALL, "97 times 91 is 8827."])
    assert '-> calculator(expression="97 * 91") = 8827' in console
    assert out.rstrip().endswith("Assistant: 97 times 91 is 8827.")
    assert out.count("Assistant:") == 1  # the call's line first, then the named reply: no empty "Assistant:" line
    assert "<tool_call>" not in out + console
    assert "Tools: calculator." in console and str(session.session_log.path) in console.replace("\n", "")
    row = json.loads(session.session_log.path.read_text())
    assert row["tools"][0]["function"]["name"] == "calculator"
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert "= 8827" in console  # /history shows the call's result


def test_session_log_rows_carry_the_earlier_exchanges_as_untrained_context(tool_model_dir, tmp_path):
    """Each logged exchange comes after the chat's previous two (their assistant turns with weight 0): training
    sees the conversation the model answered in and learns each exchange once. /reset starts afresh."""
    from hfmodel.data import load_chat_dataset

    session, _, _ = tool_chat(tool_model_dir, tmp_path, [
        "What is 97 times 91?", "Who are you?", "And 97 times 91?", "Thanks!", "/reset", "Hi", "exit"],
        [CALL, "8827.", "I am Ember.", CALL, "It is 8827.", "You're welcome.", "Hello."])
    rows = [json.loads(line) for line in session.session_log.path.read_text().splitlines()]
    users = [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in rows]
    assert users == [["What is 97 times 91?"], ["What is 97 times 91?", "Who are you?"],
                     ["What is 97 times 91?", "Who are you?", "And 97 times 91?"],
                     ["Who are you?", "And 97 times 91?", "Thanks!"], ["Hi"]]
    weights = [m.get("weight", 1) for m in rows[2]["messages"] if m["role"] == "assistant"]
    assert weights == [0, 0, 0, 1, 1]  # context: call turn + answer, answer; this exchange: call turn + answer

    data = load_chat_dataset(str(session.session_log.path))
    assert len(data.rows) == 5 and not data.skipped
    fmt = session.model.handle.format
    plan = fmt.mask_plan(data.rows)
    ids, mask = plan.tokenize(data.rows[2])
    trained = session.model.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == CALL + "<|im_end|>It is 8827.<|im_end|>"  # this exchange only: not "8827." nor "I am Ember."


def test_a_reply_cut_at_max_length_is_flagged_and_kept_out_of_the_session_log(tool_model_dir, tmp_path):
    long_reply = "Once upon a time there was a tiny model. " * 6  # over 128 tokens: stopped by the limit
    session, out, console = tool_chat(tool_model_dir, tmp_path, ["Tell me a story.", "What is 97 times 91?", "exit"],
                                      [long_reply, CALL, "8827."], max_length=128)
    assert "Once upon a time" in out  # the user still sees what was generated
    assert "reply cut at max_length = 128 new tokens" in console and "not saved to the session log" in console
    rows = [json.loads(line) for line in session.session_log.path.read_text().splitlines()]
    assert [r["messages"][1]["content"] for r in rows] == ["What is 97 times 91?"]  # the finished exchange only
    assert not session.assistant.reply_cut


def test_a_call_that_could_not_be_read_is_flagged_and_kept_out_of_the_session_log(tool_model_dir, tmp_path):
    broken = '<tool_call>\n{"name": "calculator", "arguments": "97 * 91"}}\n</tool_call>'  # seen from SmolLM2
    session, out, console = tool_chat(tool_model_dir, tmp_path, ["What is 97 times 91?", "What is 97 times 91?",
                                                                 "exit"], [broken, CALL, "8827."])
    assert '"arguments": "97 * 91"' in out  # the user still sees what was generated
    assert "could not be read" in console and "/teach call" in console and "not saved to the session log" in console
    rows = [json.loads(line) for line in session.session_log.path.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["messages"][2]["tool_calls"][0]["function"]["name"] == "calculator"
    assert not session.assistant.reply_unread and session.assistant.model.unread_calls == 1


def test_a_call_that_could_not_be_read_is_left_out_of_what_the_model_sees_next(agent):
    prompts: list[str] = []
    scripted_generate(agent.model, ['<tool_call>\n{"name": "calculator", "arguments": "97 * 91"}}\n</tool_call>',
                                    CALL, "8827."], prompts)
    run_reply(agent, "What is 97 times 91?")
    assert agent.reply_unread
    run_reply(agent, "And 97 times 91 again?")
    assert '"arguments": "97 * 91"' not in prompts[1]  # the broken markup is not in the next prompt
    assert "What is 97 times 91?" in prompts[1]  # the question is
    assert [(m.role, [b.type for b in m.get_content_blocks()]) for m in agent.state.context] == [
        ("user", ["text"]), ("user", ["text"]), ("assistant", ["tool_call", "tool_result", "text"])]


def test_an_unread_call_after_a_call_that_worked_leaves_only_its_own_text_out(agent):
    prompts: list[str] = []
    broken = '<tool_call>\n{"name": "calculator", "arguments": "8827 + 1"}}\n</tool_call>'
    scripted_generate(agent.model, [CALL, broken, "It is 8828."], prompts)
    run_reply(agent, "What is 97 times 91, plus one?")
    assert agent.reply_unread
    assert [b.type for b in agent.state.context[-1].get_content_blocks()] == ["tool_call", "tool_result"]
    run_reply(agent, "Say it again.")
    assert '"arguments": "8827 + 1"' not in prompts[2]  # the broken markup is not in the next prompt
    assert "<tool_response>\n8827\n</tool_response>" in prompts[2]  # the call that worked and its result are


@pytest.mark.parametrize("stream", [True, False])
def test_a_call_that_failed_is_not_run_again_in_the_same_turn(tool_model_dir, stream):
    """A small model repeats a failing call until the agent's round limit (SmolLM2: calculator("cold") five times in
    one turn); the repeat is not run, and the model answers without tools instead."""
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False, stream=stream)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])
    cold = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "cold"}}\n</tool_call>'
    prompts: list[str] = []
    scripted_generate(wrapper, [cold, cold, "The opposite of cold is hot."], prompts)
    pieces = run_reply(agent, "What is the opposite of cold?")
    lines = [p for p in pieces if isinstance(p, ToolLine)]
    assert len(lines) == 1 and lines[0].startswith('-> calculator(expression="cold") = error')
    assert "".join(p for p in pieces if not isinstance(p, ToolLine)) == "The opposite of cold is hot."
    assert len(prompts) == 3 and "<tools>" in prompts[1] and "<tools>" not in prompts[2]  # asked again, no tools
    assert [b.type for b in agent.state.context[-1].get_content_blocks()] == ["tool_call", "tool_result", "text"]

    # In the next turn the same call may run again
    scripted_generate(wrapper, [cold, "Not a number."], prompts)
    assert sum(isinstance(p, ToolLine) for p in run_reply(agent, "And cold?")) == 1


@pytest.mark.parametrize("stream", [True, False])
def test_a_pure_tool_that_answered_is_not_called_again_in_the_same_turn(tool_model_dir, stream):
    """SmolLM2 after a short fine-tune sometimes repeats a calculator call that worked, up to the round limit, and
    ends with call markup instead of an answer. The calculator's result depends only on its arguments: the repeat is
    not run and the model answers from the result it has. Other tools (a die) may repeat a call that worked."""
    from agentscope.permission import PermissionBehavior, PermissionDecision
    from agentscope.tool import FunctionTool

    rolls = iter([4, 2])

    def roll_die() -> str:
        """Roll a six-sided die."""
        return str(next(rolls))

    allow = PermissionDecision(behavior=PermissionBehavior.ALLOW, message="test")
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False, stream=stream)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper,
                                 toolkit=[calculator, FunctionTool(roll_die, permission=allow)])
    assert wrapper.pure_tools == {"calculator"}
    prompts: list[str] = []
    scripted_generate(wrapper, [CALL, CALL, "That's 8827."], prompts)
    pieces = run_reply(agent, "What is 97 times 91?")
    assert [p for p in pieces if isinstance(p, ToolLine)] == ['-> calculator(expression="97 * 91") = 8827']
    assert "".join(p for p in pieces if not isinstance(p, ToolLine)) == "That's 8827."
    assert len(prompts) == 3 and "<tools>" in prompts[1] and "<tools>" not in prompts[2]  # asked again, no tools

    roll = '<tool_call>\n{"name": "roll_die", "arguments": {}}\n</tool_call>'
    scripted_generate(wrapper, [roll, roll, "You rolled 4 and 2."], prompts)
    lines = [p for p in run_reply(agent, "Roll the die twice.") if isinstance(p, ToolLine)]
    assert [line.rsplit(" = ", 1)[1] for line in lines] == ["4", "2"]


def test_no_session_log_writes_nothing(tool_model_dir, tmp_path):
    session, _, _ = tool_chat(tool_model_dir, tmp_path, ["What is 97 times 91?", "exit"],
                              [CALL, "8827."], session_log=False)
    assert session.session_log is None
    assert not list((tmp_path / "runs").glob("session-*")) if (tmp_path / "runs").exists() else True


def test_teach_call_records_a_corrected_tool_call_that_training_reads(tool_model_dir, tmp_path):
    from hfmodel.chat_format import split_tools
    from hfmodel.data import load_chat_dataset

    session, _, console = tool_chat(tool_model_dir, tmp_path, [
        "What is 97 times 91?", '/teach call calculator {"expression": "97*91"}', "/teach call weather {}",
        '/teach call calculator [1]', "exit"], ["It is 8000."])
    assert "Taught example 1" in console and "calculator(expression=\"97*91\")" in console
    assert "No tool named 'weather'" in console and "must be a JSON object" in console
    data = load_chat_dataset(str(session.taught_path))
    messages, tools = split_tools(data.rows[0])
    assert messages[-1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "97*91"}}
    assert tools[0]["function"]["name"] == "calculator"


def test_teach_keeps_a_tool_reply_with_its_calls_and_marks_refuse_one(tool_model_dir, tmp_path):
    """/teach with no text keeps the reply as taught: for a reply that called a tool, the call, its result and the
    answer (the answer alone would teach skipping the call). /good and /bad, which train without tools (KTO),
    refuse such a reply; a reply it replaced is no DPO rejected answer; KTO rows leave tool examples out."""
    from hfmodel.data import load_chat_dataset

    session, _, console = tool_chat(tool_model_dir, tmp_path, [
        "What is 97 times 91?", "/teach", "/good", "/teach It is 8827.", "exit"], [CALL, "97 times 91 is 8827."])
    assert "with its 1 tool call turn(s)" in console and "That reply called a tool" in console
    assert "kept as the rejected answer" not in console and session.marks == []
    kept, typed = session.taught
    assert typed.rejected is None and typed.steps is None
    data = load_chat_dataset(str(session.taught_path))
    assert not data.skipped
    row = data.rows[0]
    assert [m["role"] for m in row] == ["user", "assistant", "tool", "assistant"]
    assert row[1]["tool_calls"][0]["function"]["arguments"] == {"expression": "97 * 91"}
    assert row[2]["content"] == "8827" and row[3]["content"] == "97 times 91 is 8827."
    ids, mask = session.model.handle.format.mask_plan(data.rows).tokenize(data.rows[0])
    trained = session.model.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == CALL + "<|im_end|>97 times 91 is 8827.<|im_end|>"
    kto = session._preference_rows("kto")
    assert [r["completion"][0]["content"] for r in kto] == ["It is 8827."]  # the kept tool reply is left out


def test_report_probes_and_compare_answer_with_the_agents_tools(tool_model_dir, tmp_path):
    """A probe answers as the chat would: the call runs and shows as its line, then the reply; the conversation and
    the generation settings are untouched."""
    session, _, _ = tool_chat(tool_model_dir, tmp_path, ["exit"], [])
    session.loop = asyncio.new_event_loop()  # the chat closed its own on exit
    prompts: list[str] = []
    scripted_generate(session.model, [CALL, "97 times 91 is 8827."], prompts)
    max_length = session.model.parameters.max_length
    answer = session._answers(["What is 97 times 91?"], [None])[0]
    assert answer == '-> calculator(expression="97 * 91") = 8827\n97 times 91 is 8827.'
    assert "calculator" in prompts[0] and "8827" in prompts[1]  # the tools were offered; the result came back
    assert session.assistant.state.context == [] and session.model.parameters.max_length == max_length


def test_train_replays_tool_rows_with_their_tools_and_taught_answers_carry_the_offered_tools(tool_model_dir, tmp_path):
    """/train's mix keeps every replayed row's `tools` (without them the tool rows were skipped and the model forgot
    its calls), and a taught answer is trained with the tools the chat offered, as the chat renders it."""
    from hfmodel.chat_format import split_tools
    from hfmodel.data import load_chat_dataset
    from hfmodel.training import taught_mix

    session, _, _ = tool_chat(tool_model_dir, tmp_path, ["Who are you?", "/teach I am Ember.", "exit"],
                              ["I am a model."])
    taught = json.loads(session.taught_path.read_text())
    assert [t["function"]["name"] for t in taught["tools"]] == ["calculator"]
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "97 * 91"}}}
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(row) + "\n" for row in [
        {"messages": [{"role": "user", "content": "What is 97 times 91?"},
                      {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "name": "calculator", "content": "8827"},
                      {"role": "assistant", "content": "That's 8827."}], "tools": taught["tools"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "tools": taught["tools"]}]))
    mix = load_chat_dataset(str(taught_mix(session.taught_path, str(replay), 8)))
    assert not mix.skipped and len(mix.rows) == 8 + 2
    assert all(split_tools(row)[1] == taught["tools"] for row in mix.rows)
    assert sum(any(m.get("tool_calls") for m in row) for row in mix.rows) == 1


def test_a_second_agent_on_the_shared_base_reads_calls_like_the_first(tool_model_dir):
    """Agents after the first run on a SharedBaseModel: an unreadable call is counted (it crashed before: the
    shared model had no counter) and a repeated calculator call is not run again."""
    from chat.team import build_team

    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    team = build_team(wrapper, [{"name": "Ember", "sys_prompt": "You are Ember."},
                                {"name": "Critic", "sys_prompt": "You are Critic."}], [calculator])
    critic = team.agent("Critic")
    assert critic.model is not wrapper and critic.model.pure_tools == {"calculator"}
    broken = '<tool_call>\n{"name": "calculator", "arguments": "97 * 91"}}\n</tool_call>'
    scripted_generate(critic.model, [broken], [])
    run_reply(critic, "What is 97 times 91?")
    assert critic.reply_unread and critic.model.unread_calls == 1
    scripted_generate(critic.model, [CALL, CALL, "That's 8827."], [])
    assert sum(isinstance(p, ToolLine) for p in run_reply(critic, "What is 97 times 91?")) == 1


@pytest.mark.parametrize("stream", [True, False])
def test_the_answer_after_a_repeated_call_may_not_open_with_a_call_nor_run_one(tool_model_dir, stream):
    """Asked for an answer without tools, a tuned SmolLM2 wrote the call's markup again, which showed as the reply.
    The answer's first token may not open a call, and call markup later in it is held back and not run."""
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False, stream=stream)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])
    opener = wrapper.tokenizer("<tool_call>", add_special_tokens=False)["input_ids"][:1]
    prompts: list[str] = []
    settings: list[dict] = []
    scripted_generate(wrapper, [CALL, CALL, "It is 8827. " + CALL], prompts, settings)
    pieces = run_reply(agent, "What is 97 times 91?")
    assert sum(isinstance(p, ToolLine) for p in pieces) == 1
    assert "".join(p for p in pieces if not isinstance(p, ToolLine)).strip() == "It is 8827."
    assert "begin_suppress_tokens" not in settings[0] and settings[2]["begin_suppress_tokens"] == opener


def test_transformers_honours_the_forbidden_first_token(tool_model_dir):
    wrapper = make_wrapper(tool_model_dir, max_length=4, do_sample=False)
    chat = [{"role": "user", "content": "Hi"}]

    def first_token(overrides):
        enc, kwargs = wrapper.engine._prepare(chat, wrapper.parameters, overrides)  # the engine's own arguments
        return wrapper.hf_model.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1]].item()

    token = first_token({})
    assert first_token({"begin_suppress_tokens": [token]}) != token
