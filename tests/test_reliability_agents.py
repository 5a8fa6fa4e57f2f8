"""The cases of issue 30 (the agent surfaces), one test each: what the user rejected is never trained on, calls fit
their tool's schema, one current agent, a chat that starts whatever the disk does. Each failed before its fix.

The chat-level ones go through the real script (`load_finetune_huggingface_model.main`) with typed input.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import SYSTEM_PROMPT, identity_rows, make_wrapper, script_logging_restored, scripted_generate, write_jsonl
from test_chat_commands import make_chat
from test_tools import SCHEMA, run_reply, tool_row

from chat.tools import calculator
from finetune_dialogagent import Finetune_DialogAgent, ToolLine
from hfmodel.chat_format import trained
from hfmodel.data import DatasetFormatError, load_chat_dataset

CRITIC_PROMPT = "You are Critic. Review the last answer in one short sentence."
TWO_AGENTS = [{"name": "First", "sys_prompt": SYSTEM_PROMPT}, {"name": "Critic", "sys_prompt": CRITIC_PROMPT}]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """The tiny model with a window that holds the calculator's schema."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tools30") / "tiny-llama", context=4096)


@pytest.fixture
def chat_script(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The real script in this process, in `tmp_path`: `chat_script(lines, agents=..., flags=...)` -> (status,
    stdout + stderr). A line may be a callable: it runs between two turns (e.g. to break the disk) and types nothing.
    Its global logging changes are undone afterwards."""

    import load_finetune_huggingface_model as script

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap long lines at 80 columns

    def run(lines: list[str | Callable[[], None]], agents: list[dict] | None = None, flags: tuple[str, ...] = (),
            model_dir: Path | None = None, replies: list[str] | None = None) -> tuple[int, str]:
        """`replies`: what the model "generates", in turn (the tiny model's own replies run to max_length, and a
        reply cut there is not logged)."""
        queue = list(lines)
        if replies is not None:
            import finetune_dialogagent

            real_build = finetune_dialogagent.build_model

            def build_scripted(*args: Any, **kwargs: Any) -> Any:
                model = real_build(*args, **kwargs)
                scripted_generate(model, replies, [])
                return model

            monkeypatch.setattr(finetune_dialogagent, "build_model", build_scripted)

        def typed(prompt: str = "") -> str:
            while queue and callable(queue[0]):
                queue.pop(0)()  # type: ignore[operator]
            if not queue:
                raise EOFError
            return str(queue.pop(0))

        monkeypatch.setattr(builtins, "input", typed)
        monkeypatch.setattr(script, "agents", agents or [{"name": "First", "sys_prompt": SYSTEM_PROMPT}])
        capsys.readouterr()
        with script_logging_restored():
            status = script.main(["--local-model-path", str(model_dir or tiny_model_dir), "--no-finetune",
                                  *(flags or ("--no-tools",))])
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    return run


def flat(text: str) -> str:
    return " ".join(text.split())


def session_rows(folder: Path) -> list[dict[str, Any]]:
    (path,) = sorted((folder / "runs").glob("session-*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


# ================================================================================== bugs


def test_bug1_at_name_agent_use_makes_that_agent_current_for_everything(chat_script):
    status, out = chat_script(["/agent use Critic", "@Critic /agent use First", "/agents", "Hello there",
                               "@Critic /history", "/history", "@First /agent use Critic", "@First /history",
                               "/agents"], agents=TWO_AGENTS)
    assert status == 0 and "Traceback" not in out
    assert "Now talking to First" in out
    tables = out.split("Agents (one base model")
    star = [next(line for line in table.splitlines() if "*" in line) for table in tables[1:]]
    assert "First" in star[0] and "Critic" in star[1]  # /agents stars the agent that /agent use named
    assert "\nFirst: " in out and "\nCritic: " not in out  # the plain message went to First
    # `@Critic /history` showed Critic's (empty) conversation; `/history` and, with Critic current again,
    # `@First /history` showed First's, who answered.
    assert out.count("(no messages yet)") == 1 and out.count("user: Hello there") == 2


def test_bug2_a_runs_file_is_one_warning_and_the_chat_goes_on_without_a_log(chat_script, tmp_path):
    (tmp_path / "runs").write_text("my notes")
    status, out = chat_script(["Hello", "Hello again"])
    assert status == 0, out
    assert "Traceback" not in out and "FileExistsError" not in out and "The reply failed" not in out
    assert flat(out).count("warning: cannot write the session log") == 1
    assert out.count("\nFirst: ") == 2 and (tmp_path / "runs").read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_bug2_a_read_only_runs_folder_is_one_warning(chat_script, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        status, out = chat_script(["Hello"])
    finally:
        runs.chmod(0o700)
    assert status == 0 and "Traceback" not in out
    assert flat(out).count("warning: cannot write the session log") == 1 and "\nFirst: " in out


def test_bug2_runs_breaking_mid_chat_never_fails_a_reply(chat_script, tmp_path):
    def break_runs() -> None:
        shutil.rmtree(tmp_path / "runs")
        (tmp_path / "runs").write_text("now a file")

    status, out = chat_script(["Hello", break_runs, "Hello again", "And again"], replies=["Hi.", "Hi again.", "Hi."])
    assert status == 0
    assert "The reply failed" not in out and "NotADirectoryError" not in out
    assert flat(out).count("warning: cannot write the session log") == 1  # once; then the chat goes on without it
    assert out.count("\nFirst: ") == 3 and (tmp_path / "runs").read_text() == "now a file"


def test_bug3_the_session_log_keeps_what_the_user_accepted(chat_script, tmp_path):
    status, out = chat_script(["Who are you?", "/teach I am Ember, taught.", "Second question", "/bad",
                               "Third question", "/good", "Fourth question", "/bad", "/good"],
                              replies=["I am a model.", "Second answer.", "Third answer.", "Fourth answer."])
    assert status == 0 and "error" not in out, out
    rows = session_rows(tmp_path)
    assert len(rows) == 4
    first = rows[0]["messages"]
    assert first[-1] == {"role": "assistant", "content": "I am Ember, taught."}  # the taught answer replaced it
    assert all(m.get("weight") == 0 for m in rows[1]["messages"] if m["role"] == "assistant")  # /bad: untrained
    assert "weight" not in rows[2]["messages"][-1] and "weight" not in rows[3]["messages"][-1]  # /good: kept
    # The context of later rows holds the taught answer too (what the model saw in its conversation).
    assert {"role": "assistant", "content": "I am Ember, taught.", "weight": 0} in rows[2]["messages"]
    # What /finetune runs/session-....jsonl trains on: the taught answer and the /good replies, nothing rejected.
    data = load_chat_dataset(str(sorted((tmp_path / "runs").glob("session-*.jsonl"))[0]))
    taught = [m["content"] for row in data.rows for m in row if m["role"] == "assistant" and trained(m)]
    assert taught[0] == "I am Ember, taught." and len(taught) == 3
    assert rows[1]["messages"][-1]["content"] not in taught


def test_bug4_teach_call_refuses_arguments_that_do_not_fit_the_schema(chat_script, tool_model_dir, tmp_path):
    status, out = chat_script(["What is 2+2?", '/teach call calculator {"foo": "bar"}', "/teach call calculator {}",
                               '/teach call calculator {"expression": 4}',
                               '/teach call calculator {"expression": "2+2"}'],
                              flags=("--no-session-log",), model_dir=tool_model_dir)
    assert status == 0
    text = flat(out)
    assert "calculator arguments do not fit its schema: unknown argument 'foo'" in text
    assert "calculator arguments do not fit its schema: 'expression' is a required property" in text
    assert "calculator arguments do not fit its schema: expression: 4 is not of type 'string'" in text
    assert text.count("Taught example") == 1 and "Taught example 1" in text
    (taught,) = (tmp_path / "runs").glob("taught-*.jsonl")
    assert len(taught.read_text().splitlines()) == 1


def test_bug4_data_rows_whose_calls_do_not_fit_the_schema_are_skipped_and_counted(tmp_path):
    rows = [tool_row(), tool_row(arguments={"foo": "bar"}), tool_row(arguments={}),
            tool_row(arguments={"expression": 4})]
    data = load_chat_dataset(str(write_jsonl(tmp_path / "tools.jsonl", rows)))
    assert len(data.rows) == 1
    assert data.skipped == {"a tool call whose arguments do not fit its tool's schema": 3}


def test_bug4_a_model_call_that_does_not_fit_the_schema_stays_text(tool_model_dir, caplog):
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])
    bad = '<tool_call>\n{"name": "calculator", "arguments": {"foo": "bar"}}\n</tool_call>'
    scripted_generate(wrapper, [bad], [])
    pieces = run_reply(agent, "What is 2+2?")
    assert not any(isinstance(p, ToolLine) for p in pieces)
    assert '"foo"' in "".join(pieces) and "could not be read" in caplog.text and "unknown argument 'foo'" in caplog.text
    assert agent.reply_unread
    # The whole-reply path reads it the same way.
    from agentscope.message import UserMsg

    whole = make_wrapper(tool_model_dir, max_length=256, do_sample=False, stream=False)
    scripted_generate(whole, [bad], [])
    reply = asyncio.run(whole([UserMsg(name="User", content="What is 2+2?")], tools=[SCHEMA]))
    assert [b.type for b in reply.content] == ["text"] and '"foo"' in reply.content[0].text


DEEP = '<tool_call>\n{"name": "calculator", "arguments": {"expression": ' + "[" * 5000 + "]" * 5000 + "}}\n</tool_call>"


def test_bug5_a_call_nested_5000_deep_stays_text_with_the_usual_warning(tool_model_dir, caplog):
    from agentscope.message import UserMsg

    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])
    scripted_generate(wrapper, [DEEP], [])
    pieces = run_reply(agent, "What is 2+2?")  # streamed
    assert not any(isinstance(p, ToolLine) for p in pieces) and "[[[[" in "".join(pieces)
    assert "could not be read" in caplog.text
    whole = make_wrapper(tool_model_dir, max_length=256, do_sample=False, stream=False)
    scripted_generate(whole, [DEEP], [])
    reply = asyncio.run(whole([UserMsg(name="User", content="What is 2+2?")], tools=[SCHEMA]))
    assert [b.type for b in reply.content] == ["text"] and "[[[[" in reply.content[0].text


def test_bug6_agent_add_grows_the_default_chat_into_a_team(chat_script, tmp_path):
    status, out = chat_script(["Who are you?", '/agent add Critic "You are Critic. Review tersely."',
                               "@Critic review that", "/agents", "/history"], flags=("--no-tools",))
    assert status == 0 and "Unknown command" not in out and "Traceback" not in out, out
    assert "Added Critic" in out and "\nCritic: " in out
    table = out.split("Agents (one base model")[1]
    star = next(line for line in table.splitlines() if "*" in line)
    assert "First" in star  # the first agent stays current
    history = out.split("Agents (one base model")[1]
    assert "user: Who are you?" in history  # and keeps its history


def test_bug6_the_first_agent_keeps_its_adapter_when_the_chat_grows(tiny_model_dir, tmp_path, monkeypatch):
    from rich.console import Console

    from chat.team import build_team
    from chat.team_chat import TeamChatSession
    from finetune_dialogagent import UserAgent

    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows())
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    team = build_team(wrapper, TWO_AGENTS[:1])
    import io

    console = Console(file=io.StringIO(), width=300)
    session = TeamChatSession(team, UserAgent(), console=console, out=io.StringIO(), base_config={
        "data_path": None, "fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs"),
                                                                  "max_steps": 1, "save_strategy": "no"}}})
    queue = [f"/finetune {data}", "Hello", '/agent add Critic "You review."', "@Critic hi", "/adapters"]
    session.user.input_fn = lambda prompt: queue.pop(0) if queue else (_ for _ in ()).throw(EOFError())
    session.run()
    assert wrapper.active_adapter == "ft1" and team.agent("Critic").model.active_adapter is None
    assert len(team.agent("First").state.context) == 2


# ================================================================================== unclear


@pytest.mark.parametrize("expression, message", [
    ("10.0 ** 300 * 10.0 ** 300", "error: the result is too large (beyond about 1e308)"),
    ("10.0 ** 400", "error: the result is too large (beyond about 1e308)"),
    ("-" * 1000 + "1", "error: the expression is too long (1001 characters, at most 1000)"),
    ("-" * 300 + "1", "error: the expression is too deeply nested"),
    ("+".join(["1"] * 1000), "error: the expression is too long"),
    ("9" * 5000, "error: the expression is too long"),
    ("(" * 200 + "1" + ")" * 200, "error: the expression is too deeply nested"),
])
def test_unclear_the_calculator_bounds_size_and_depth_up_front(expression, message):
    result = calculator(expression)
    assert result.startswith(message), result


def test_unclear_the_calculator_still_reads_ordinary_sums():
    assert calculator("+".join(["1"] * 90)) == "90" and calculator("-(-(-3))") == "-3"
    assert calculator("9" * 400 + " - " + "9" * 400) == "0"


def test_unclear_an_unknown_train_method_is_named_first(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run(["/train method=ppo"])
    text = flat(c.steps[0].console)
    assert "method = 'ppo': must be one of sft, dpo, orpo, kto" in text and "Nothing taught" not in text


def test_unclear_method_in_capitals_is_read_in_lower_case(tiny_wrapper, tmp_path, monkeypatch):
    from hfmodel.settings import parse_overrides

    assert parse_overrides(["method=DPO"])["method"] == "dpo"
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run(["/train method=DPO"])
    assert flat(c.steps[0].console) == "error: Nothing taught yet: ask something, then /teach <better answer>."


def test_unclear_a_huge_loraplus_ratio_is_refused_naming_the_ratio(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows())
    c = make_chat(tiny_wrapper, tmp_path).run([f"/finetune {data} lora.loraplus_lr_ratio=1e30"])
    text = flat(c.steps[0].console)
    assert "lora_config.loraplus_lr_ratio = 1e+30: must be a number from 1 to 1000" in text
    assert tiny_wrapper.active_adapter is None


@pytest.mark.parametrize("layers, message", [
    ("[999]", "lora_config.layers_to_transform = [999]: this model has 2 layers (0 to 1)"),
    ("[-1]", "lora_config.layers_to_transform = [-1]: layer indices count from 0 (this model has 2 layers, 0 to 1)"),
])
def test_unclear_lora_layers_are_checked_against_the_model_before_the_run(tiny_wrapper, tmp_path, monkeypatch,
                                                                          layers, message):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows())
    c = make_chat(tiny_wrapper, tmp_path).run([f"/finetune {data} lora.layers_to_transform={layers}"])
    text = flat(c.steps[0].console)
    assert message in text and "failed" not in text, text
    assert not (c.runs.exists() and any(c.runs.iterdir())), list(c.runs.iterdir())  # no empty run folder
    assert not (tmp_path / "errors.log").exists()


def test_unclear_at_all_runs_team_level_commands_once(chat_script):
    status, out = chat_script(['@all /agent add Bar "You are Bar."', "/agents"], agents=TWO_AGENTS)
    assert status == 0
    assert out.count("Added Bar") == 1 and "used twice" not in out and "error" not in out


def test_unclear_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    good = "".join(json.dumps(r) + "\n" for r in identity_rows(2))
    path = tmp_path / "session.jsonl"
    path.write_text(good + '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assis')
    with caplog.at_level(logging.WARNING, logger="huggingface_model"):
        data = load_chat_dataset(str(path))
    assert len(data.rows) == 2 and data.skipped == {"torn last line (an interrupted write)": 1}
    assert "line 3 is cut off" in caplog.text
    middle = tmp_path / "middle.jsonl"
    lines = good.splitlines()
    middle.write_text(lines[0] + "\n" + '{"messages": [' + "\n" + lines[1] + "\n")
    with pytest.raises(DatasetFormatError, match="Malformed JSON in .*line 2"):
        load_chat_dataset(str(middle))



def test_a_one_agent_chat_sends_an_at_word_that_names_no_agent_as_typed():
    """Every chat is a team chat now (so `/agent add` works in it): "@home ..." must stay a message while no agent
    has that name, and a team of two still refuses an unknown @Name."""
    from chat.team import Team, TeamError

    first, critic = object(), object()
    assert Team({"First": first}, "First").route("@home is where I am") == ([first], "@home is where I am")
    assert Team({"First": first}, "First").route("@first hi") == ([first], "hi")
    with pytest.raises(TeamError, match="No agent named 'home'"):
        Team({"First": first, "Critic": critic}, "First").route("@home is where I am")
