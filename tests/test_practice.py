"""Practice (RFT / GRPO from verified outcomes) on the tiny model: tasks, verifiers, rollouts through a real AgentScope
agent and toolkit, the accepted attempts as SFT rows, rounds, Ctrl-C, and `/practice` in the chat."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import make_wrapper, write_jsonl

from chat.tools import calculator
from finetune_dialogagent import Finetune_DialogAgent
from hfmodel import practice
from hfmodel.practice import Task, answer_matches, load_tasks
from huggingface_model import FineTuneInterrupted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_strategy": "no"}
QUESTION = re.compile(r"What is (\d+) plus (\d+)\?")


def tasks_rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"What is {i + 2} plus {i + 3}?", "answer": 2 * i + 5} for i in range(n)]


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """The tiny model with a window that holds the tool schemas."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("practice") / "tiny-llama", context=4096)


def scripted_solver(wrapper, calls: list[str] | None = None):
    """Replace generate() by a 'model' that calls the calculator with the right sum or (by a seeded coin) a wrong
    difference, then answers with the tool's result: attempts differ by seed, and repeat with it."""
    tok = wrapper.tokenizer

    def generate(input_ids=None, attention_mask=None, streamer=None, **kwargs):
        prompt = tok.decode(input_ids[0])
        turn = prompt.rsplit("<|im_start|>user", 1)[-1]
        if "<tool_response>" in prompt.rsplit("<|im_start|>assistant", 1)[-1] or prompt.count("<tool_response>") > \
                prompt.rsplit("<|im_start|>user", 1)[0].count("<tool_response>"):
            result = prompt.rsplit("<tool_response>\n", 1)[-1].split("\n", 1)[0]
            text = f"The answer is {result}."
        elif (m := QUESTION.search(turn)):
            right = not kwargs.get("do_sample") or bool(torch.randint(0, 2, (1,)).item())
            expression = f"{m[1]} + {m[2]}" if right else f"{m[1]} - {m[2]}"
            if calls is not None:
                calls.append(expression)
            call = {"name": "calculator", "arguments": {"expression": expression}}
            text = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        else:
            text = "Hello there."
        new = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if streamer is not None:  # the chat's own replies stream
            streamer.put(input_ids.cpu())
            for i in range(new.shape[1]):
                streamer.put(new[:, i])
            streamer.end()
        return torch.cat([input_ids, new], dim=1)

    wrapper.hf_model.generate = generate


@pytest.fixture
def agent(tool_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    scripted_solver(wrapper)
    return Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper, toolkit=[calculator])


def ft_config(tmp_path: Path) -> dict:
    return {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST}}


# ------------------------------------------------------------------------------------------ tasks and verifiers


def test_the_default_verifier_checks_the_last_number_or_the_text():
    assert answer_matches(12, "3 plus 9: the answer is 12.")
    assert answer_matches("12", "It is 12.0")
    assert answer_matches(1234567, "That makes 1,234,567.")
    assert not answer_matches(12, "12 is wrong, it is 13.")
    assert not answer_matches(12, "no number here")
    assert answer_matches("Ember", "I am ember, your assistant!")
    assert not answer_matches("Ember", "I am SmolLM.")


def test_bad_task_rows_are_skipped_and_counted(tmp_path):
    rows = tasks_rows(2) + [{"prompt": "no answer"}, {"messages": [{"role": "assistant", "content": "hi"}],
                                                    "answer": 1}, {"answer": 3}, {"prompt": "x", "answer": [1]},
                            {"prompt": "Hello!", "plain": True}]
    loaded = load_tasks(str(write_jsonl(tmp_path / "tasks.jsonl", rows)))
    assert len(loaded.tasks) == 3 and sum(t.plain for t in loaded.tasks) == 1
    assert sum(loaded.skipped.values()) == 4
    text = loaded.describe()
    assert "2 tasks + 1 plain prompts" in text and "skipped 4" in text and "without answer" in text


def test_a_scripted_verifier_scores_and_a_raising_one_scores_zero_reported_once(tmp_path, caplog):
    checks = tmp_path / "checks.py"
    checks.write_text("def strict(prompt, reply, calls):\n    return 1.0 if calls and '+' in calls[0]['arguments']"
                      " else 0.0\n\ndef broken(prompt, reply, calls):\n    raise ValueError('oops')\n")
    strict = practice.Scorer(practice.load_verifier(f"{checks}:strict"))
    task = Task([{"role": "user", "content": "What is 2 plus 3?"}], None)
    assert strict(task, "5", [{"name": "calculator", "arguments": '{"expression": "2 + 3"}'}]) == 1.0
    assert strict(task, "5", []) == 0.0
    broken = practice.Scorer(practice.load_verifier(f"{checks}:broken"))
    assert broken(task, "5", []) == 0.0 and broken(task, "5", []) == 0.0
    assert broken.failures == 2 and caplog.text.count("oops") == 1
    with pytest.raises(practice.PracticeError, match="no function 'strictt'.*strict"):
        practice.load_verifier(f"{checks}:strictt")


# ------------------------------------------------------------------------------------------ rollouts and RFT


def test_rollouts_run_the_tool_through_the_agent_and_only_accepted_attempts_become_rows(agent, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(4))
    served = agent.model.parameters
    result = agent.practice(str(tasks), {"k": 4, "keep": 2, "replay": False}, ft_config(tmp_path))
    assert agent.model.parameters is served  # the chat's settings are untouched
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 16
    for r in rollouts:
        tool = [m for m in r["messages"] if m["role"] == "tool"]
        assert len(tool) == 1  # the calculator ran
        expression = r["messages"][2]["tool_calls"][0]["function"]["arguments"]["expression"]
        assert tool[0]["content"] == calculator(expression)
        assert r["score"] == (1.0 if "+" in expression else 0.0)
    accepted = [r for r in rollouts if r["score"] == 1.0]
    assert 0 < len(accepted) < 16  # the seeded coin gives both kinds
    rows = [json.loads(line) for line in (result.run_dir / "round1-train.jsonl").read_text().splitlines()]
    assert rows and all("+" in r["messages"][2]["tool_calls"][0]["function"]["arguments"]["expression"] for r in rows)
    assert all(r["tools"][0]["function"]["name"] == "calculator" for r in rows)
    per_task = {}
    for r in rows:
        per_task[r["messages"][1]["content"]] = per_task.get(r["messages"][1]["content"], 0) + 1
    assert max(per_task.values()) <= 2
    assert result.adapter == agent.model.active_adapter and result.rounds[0].rows == len(rows)
    # Same seeds, same attempts.
    again = agent.practice(str(tasks), {"k": 4, "keep": 2, "replay": False}, ft_config(tmp_path))
    first = [r["score"] for r in rollouts]
    second = [json.loads(line)["score"] for line in (again.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert first == second


def test_rounds_continue_from_the_last_adapter(agent, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(4))
    result = agent.practice(str(tasks), {"k": 2, "rounds": 2, "replay": False}, ft_config(tmp_path))
    first, second = result.rounds
    assert first.adapter and second.adapter and first.adapter != second.adapter
    records = agent.model.adapters
    assert records[second.adapter].parent == first.adapter  # round 2 trained from round 1's adapter
    assert records[first.adapter].parent is None
    assert agent.model.active_adapter == second.adapter
    rounds = {json.loads(line)["round"] for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()}
    assert rounds == {1, 2}


def test_ctrl_c_in_the_second_round_leaves_the_served_adapter_unchanged(agent, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(4))
    agent.fine_tune(str(write_jsonl(tmp_path / "rows.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 4)),
        ft_config(tmp_path))
    served = agent.model.active_adapter
    weights = {k: v.clone() for k, v in agent.model.hf_model.state_dict().items() if "lora" in k}

    def interrupt(info: dict) -> None:
        if info.get("stage") == "round 2: training" and info.get("step", 0) >= 1:
            raise KeyboardInterrupt

    with pytest.raises(FineTuneInterrupted, match="still serving " + served):
        agent.practice(str(tasks), {"k": 2, "rounds": 2, "replay": False}, ft_config(tmp_path), progress=interrupt)
    assert agent.model.active_adapter == served
    assert agent.model.hf_model.active_adapters == [served]
    now = agent.model.hf_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())


def test_ctrl_c_while_sampling_stops_before_any_training(agent, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(4))

    def interrupt(info: dict) -> None:
        if info.get("attempts", 0) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(FineTuneInterrupted, match="still serving the base model"):
        agent.practice(str(tasks), {"k": 2}, ft_config(tmp_path), progress=interrupt)
    assert agent.model.active_adapter is None and agent.model.adapters == {}


def test_held_out_tasks_are_scored_before_and_after_and_reported(agent, tmp_path):
    rows = tasks_rows(10) + [{"prompt": "Hello!", "plain": True}]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    result = agent.practice(str(tasks), {"k": 2, "replay": False, "eval_fraction": 0.2}, ft_config(tmp_path))
    assert len([t for t in result.held_out if not t.plain]) == 2
    before = result.before
    assert before is not None and result.after is not None
    assert before.pass1_greedy == 1.0  # the scripted model is right when greedy
    assert before.valid_calls == 1.0 and before.spurious == (0, 1)
    assert 0 <= before.pass_k <= 1 and 0 <= before.mean_reward <= 1
    report = (result.run_dir / "report.md").read_text()
    assert "pass@1, greedy" in report and "pass@2" in report and "tokens/s" in report
    assert "plain prompts with a spurious call (greedy) | 0/1 | 0/1" in report
    assert "-> calculator(" in report  # the probes show the calls
    assert (result.run_dir / "loss.png").stat().st_size > 0


def test_grpo_with_tools_and_lora_completes_two_steps_on_cpu(tool_model_dir, tmp_path, monkeypatch):
    from agentscope.tool import Toolkit  # noqa: F401 - the agent's toolkit type

    from chat.tools import make_toolkit

    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tool_model_dir, max_length=48)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(2))
    result = wrapper.practice(str(tasks), {"method": "grpo", "k": 2}, ft_config(tmp_path),
                              toolkit=make_toolkit([calculator]))
    (round_,) = result.rounds
    steps = [e for e in round_.log_history if "reward" in e]
    assert len(steps) == 2
    assert wrapper.active_adapter == round_.adapter == result.adapter
    assert (result.run_dir / "grpo-adapter" / "adapter_config.json").exists()


# ------------------------------------------------------------------------------------------ the chat


def chat_session(agent, tmp_path: Path, lines: list[str]):
    import io

    from rich.console import Console

    from chat.commands import ChatSession
    from finetune_dialogagent import UserAgent

    queue = list(lines)

    def typed(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    base = {"fine_tune_config": ft_config(tmp_path)}
    session = ChatSession(agent, UserAgent(input_fn=typed), base_config=base,
                          console=Console(file=io.StringIO(), width=250), out=io.StringIO())
    session.run()
    return session, session.console.file.getvalue()


def test_practice_in_the_chat_shows_the_tasks_the_report_and_serves_the_new_adapter(agent, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(3) + [{"prompt": "no answer"}])
    session, shown = chat_session(agent, tmp_path, [f"/practice {tasks} k=2 replay=false"])
    assert "error" not in shown
    assert "3 tasks; skipped 1 (1 without answer)" in shown
    assert "Practice report" in shown and "round 1: accepted attempts" in shown
    assert agent.model.active_adapter is not None and f"Now serving adapter {agent.model.active_adapter}" in shown


def test_practice_mistakes_are_one_line(agent, tmp_path):
    _, shown = chat_session(agent, tmp_path, ["/practice", "/practice missing.jsonl", "/practice session",
                                              f"/practice {tmp_path} k=0", "/practice x.jsonl verifier=nope.py:f"])
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, shown
    assert "Usage: /practice" in errors[0]
    assert "not found" in errors[1]
    assert "Nothing to practise" in errors[2]
    assert "k = 0" in errors[3]
    assert "nope.py is not a file" in errors[4]
    assert "Traceback" not in shown


def test_practice_session_builds_tasks_from_taught_and_good_replies(agent, tmp_path, monkeypatch):
    seen: list[list[Task]] = []
    real = practice.practice

    def spy(model, tasks, *args, **kwargs):
        seen.append(list(tasks))
        return real(model, tasks, *args, **kwargs)

    monkeypatch.setattr(practice, "practice", spy)
    _, shown = chat_session(agent, tmp_path, ["What is 2 plus 3?", "/teach", "Hello!", "/good",
                                              "/practice session k=2 replay=false"])
    assert "error" not in shown, shown
    (tasks,) = seen
    assert [(t.prompt, t.answer) for t in tasks] == [("What is 2 plus 3?", 5.0), ("Hello!", "Hello there.")]
    assert "Practising 2 question(s)" in shown


# ------------------------------------------------------------------------------------------ finetune.py


def test_finetune_py_runs_rft_from_a_config(tool_model_dir, tmp_path, monkeypatch, capsys):
    import finetune

    monkeypatch.chdir(tmp_path)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", tasks_rows(2))
    config = tmp_path / "practice.yaml"
    config.write_text(json.dumps({"model": {"config_name": "tiny", "local_model_path": str(tool_model_dir),
                                            "max_length": 24}, "data_path": str(tasks),
                                  "fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs"),
                                                                         **FAST}}}))
    rc = finetune.main(["--config", str(config), "--set", "method=rft", "--set", "practice.k=2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "round 1: accepted attempts" in out.out and "Report:" in out.out
    (report,) = (tmp_path / "runs").glob("*practice*/report.md")
    rollouts = (report.parent / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 4
    assert finetune.main(["--config", str(config), "--set", "method=rft", "--set", "practice.k=0"]) == 2
    assert "k = 0" in capsys.readouterr().err


def test_typed_keys_split_into_practice_settings_and_fine_tune_settings_over_the_practice_defaults():
    base = {"training_args": {"max_steps": 18, "learning_rate": 1e-3, "output_dir": "runs"}}
    settings, config = practice.parse_practice_args(["k=8", "rounds=2", "lora.r=16", "warmup_steps=2"], base)
    assert (settings.k, settings.rounds, settings.method) == (8, 2, "rft")
    assert config["training_args"] == {"max_steps": 12, "learning_rate": 5e-4, "output_dir": "runs", "warmup_steps": 2}
    assert config["lora_config"] == {"loraplus_lr_ratio": 8, "r": 16}
    _, typed = practice.parse_practice_args(["max_steps=30"], base)
    assert typed["training_args"]["max_steps"] == 30
    with pytest.raises(practice.PracticeError, match="Unknown setting 'kk'"):
        practice.parse_practice_args(["kk=3"])


def test_grpo_trains_at_a_grpo_learning_rate_without_loraplus_unless_told(caplog):
    """SFT's learning rates wreck a policy-gradient run (SmolLM2 lost its tool calls at 1e-3 with LoRA+ 8)."""
    base = {"training_args": {"max_steps": 18, "learning_rate": 1e-3}, "lora_config": {"loraplus_lr_ratio": 8}}
    _, config = practice.parse_practice_args(["method=grpo"], base)
    assert config["training_args"]["learning_rate"] == practice.GRPO_TRAINING_ARGS["learning_rate"] < 1e-4
    assert config["lora_config"]["loraplus_lr_ratio"] is None
    _, typed = practice.parse_practice_args(["method=grpo", "learning_rate=5e-5"], base)
    assert typed["training_args"]["learning_rate"] == 5e-5
    from_python = practice.training_config({"training_args": {"max_steps": 3}}, "grpo")
    assert from_python["training_args"]["learning_rate"] == practice.GRPO_TRAINING_ARGS["learning_rate"]
    assert practice.training_config(None, "rft")["training_args"]["learning_rate"] == 5e-4


def test_the_docs_list_every_practice_setting_with_its_default():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "practice.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", docs, re.M))
    assert set(rows) == set(practice.PRACTICE_KEYS)
    defaults = practice.PracticeSettings()
    for key, shown in rows.items():
        value = getattr(defaults, key)
        if value is not None and key != "top_p":
            expected = str(value).lower() if isinstance(value, bool) else str(value)
            assert shown.strip().strip("`") == expected, key


def test_a_failed_call_and_a_reply_cut_at_max_length_score_zero(tool_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tool_model_dir, max_length=8)
    tok = wrapper.tokenizer

    def generate(input_ids=None, attention_mask=None, streamer=None, **kwargs):
        prompt = tok.decode(input_ids[0])
        if "broken" in prompt.rsplit("<|im_start|>user", 1)[-1]:
            raise RuntimeError("the device fell over")
        new = tok("It is 5 and more words than fit", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new[:, :kwargs["max_new_tokens"]]], dim=1)

    wrapper.hf_model.generate = generate
    tasks = [Task([{"role": "user", "content": "Say 5"}], 5), Task([{"role": "user", "content": "broken"}], 5)]
    sampling = practice.Sampling(practice.agent_factory("a", None), None, None, False, 4)
    attempts = __import__("asyncio").run(practice.sample(wrapper, sampling, tasks, 2, lambda t, a: {"seed": a},
                                                         practice.Scorer(None)))
    cut = [a for a in attempts if a.task == 0]
    failed = [a for a in attempts if a.task == 1]
    assert all(a.cut and a.reply.startswith("It is 5") and a.score == 0 for a in cut)
    assert all(a.error and "fell over" in a.error and a.score == 0 for a in failed)


@pytest.fixture(scope="module")
def taught_with_tools(tool_model_dir, tmp_path_factory):
    """An adapter of the tool-sized tiny model that answers TAUGHT_QUESTION with TAUGHT_ANSWER, the calculator
    offered (as finetune.py's practice offers it)."""
    from helpers import TAUGHT_ANSWER, TAUGHT_QUESTION, identity_rows

    from chat.tools import make_toolkit

    tmp = tmp_path_factory.mktemp("taught-tools")
    schema = __import__("asyncio").run(make_toolkit([calculator]).get_tool_schemas())
    rows = [{**r, "tools": schema} for r in identity_rows(8)]
    assert rows[0]["messages"][0]["content"] == TAUGHT_QUESTION and TAUGHT_ANSWER
    wrapper = make_wrapper(tool_model_dir)
    config = {"training_args": {"output_dir": str(tmp / "runs"), "max_steps": 16, "learning_rate": 1e-2,
                                "per_device_train_batch_size": 4, "save_strategy": "no"}}
    return wrapper.fine_tune(str(write_jsonl(tmp / "rows.jsonl", rows)), config).adapter_dir


@pytest.mark.slow
def test_rft_under_accelerate_launch_splits_the_attempts_across_two_processes(taught_with_tools, tmp_path):
    from helpers import TAUGHT_ANSWER, TAUGHT_QUESTION
    from test_distributed import _ddp, _run

    taught_adapter = taught_with_tools

    write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": TAUGHT_QUESTION, "answer": TAUGHT_ANSWER}] * 4)
    (tmp_path / "practice.yaml").write_text(json.dumps({
        "model": {"config_name": "tiny", "local_model_path": str(taught_adapter), "device": "cpu", "max_length": 24,
                  "system_prompt": "You are Ember."},
        "data_path": "tasks.jsonl", "practice": {"k": 2, "temperature": 0.1},
        "fine_tune_config": {"method": "rft", "training_args": {
            "output_dir": "runs", "max_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 2,
            "save_strategy": "no", "bf16": False}}}))
    result = _run([*_ddp(), "--config", "practice.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (rollouts,) = (tmp_path / "runs").glob("*practice*/rollouts.jsonl")
    rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert len(rows) == 8 and {r["rank"] for r in rows} == {0, 1}
    assert sorted((r["task"], r["attempt"]) for r in rows) == [(t, a) for t in range(4) for a in range(2)]
    assert result.stdout.count("practice done") == 2
    assert all(r["score"] == 1.0 for r in rows)  # the taught answer, from both processes
    # Both processes trained one adapter together on the accepted attempts (DDP, like SFT).
    assert "round 1: rows trained: 4 accepted" in result.stdout
    (run,) = [p.parent.parent for p in (tmp_path / "runs").glob("*/adapter/adapter_config.json")]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_grpo_under_accelerate_launch_trains_one_adapter_on_two_processes(taught_with_tools, tmp_path):
    from helpers import TAUGHT_ANSWER, TAUGHT_QUESTION
    from test_distributed import _ddp, _run

    write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": TAUGHT_QUESTION, "answer": TAUGHT_ANSWER}] * 4)
    (tmp_path / "practice.yaml").write_text(json.dumps({
        "model": {"config_name": "tiny", "local_model_path": str(taught_with_tools), "device": "cpu",
                  "max_length": 24, "system_prompt": "You are Ember."},
        "data_path": "tasks.jsonl", "practice": {"k": 2, "temperature": 0.7},
        "fine_tune_config": {"method": "grpo", "training_args": {
            "output_dir": "runs", "max_steps": 2, "save_strategy": "no", "bf16": False}}}))
    result = _run([*_ddp(), "--config", "practice.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("practice done") == 2
    (run,) = (tmp_path / "runs").glob("*practice*/grpo-run.json")
    record = json.loads(run.read_text())
    assert record["status"] == "completed" and record["steps"] == 2 and record["processes"] == 2
    assert (run.parent / "grpo-adapter" / "adapter_config.json").exists()
    # Both processes scored completions; the report counts all of them (2 steps x 2 processes x k=2 ... per step).
    assert "GRPO: completions accepted" in result.stdout


# ------------------------------------------------------------------------------------------ per-task tools


def word_count(text: str) -> str:
    """Count the words of a text.

    Args:
        text (str): The text.
    """
    return str(len(text.split()))


CALCULATOR_ONLY = "What is 4 plus 5?"
BY_SCHEMA = "What is 6 plus 7?"
NO_TOOLS = "Say hello, no tools."
WHOLE_TOOLKIT = "What is 2 plus 3?"


def per_task_tool_rows() -> list[dict]:
    return [{"prompt": WHOLE_TOOLKIT, "answer": 5},
            {"prompt": CALCULATOR_ONLY, "answer": 9, "tools": ["calculator"]},
            {"prompt": BY_SCHEMA, "answer": 13, "tools": [{"type": "function", "function": {
                "name": "calculator", "description": "not the agent's words: only the name counts"}}]},
            {"prompt": NO_TOOLS, "answer": "Hello there", "tools": []},
            {"prompt": "What is 1 plus 1?", "answer": 2, "tools": ["abacus"]}]


def test_each_task_samples_with_its_own_tools_and_its_rows_carry_exactly_their_schemas(tool_model_dir, tmp_path,
                                                                                       monkeypatch):
    import asyncio

    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tool_model_dir, max_length=256, do_sample=False)
    scripted_solver(wrapper)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt="You are Ember.", model=wrapper,
                                 toolkit=[calculator, word_count])
    prompts: list[str] = []
    solve = wrapper.hf_model.generate

    def recorded(input_ids=None, **kwargs):
        prompts.append(wrapper.tokenizer.decode(input_ids[0]))
        return solve(input_ids=input_ids, **kwargs)

    wrapper.hf_model.generate = recorded
    schemas = {s["function"]["name"]: s for s in asyncio.run(agent.toolkit.get_tool_schemas())}
    tasks = write_jsonl(tmp_path / "tasks.jsonl", per_task_tool_rows())
    result = agent.practice(str(tasks), {"k": 2, "keep": 2, "replay": False}, ft_config(tmp_path))

    assert result.tasks.skipped == {"naming the tool 'abacus' the agent does not have (its tools: calculator, "
                                    "word_count)": 1}
    first_turn = {p: next(x for x in prompts if x.rstrip().endswith(f"{p}<|im_end|>\n<|im_start|>assistant"))
                  for p in (WHOLE_TOOLKIT, CALCULATOR_ONLY, BY_SCHEMA, NO_TOOLS)}
    assert "calculator" in first_turn[WHOLE_TOOLKIT] and "word_count" in first_turn[WHOLE_TOOLKIT]
    for prompt in (CALCULATOR_ONLY, BY_SCHEMA):
        assert "calculator" in first_turn[prompt] and "word_count" not in first_turn[prompt]
    assert "<tools>" not in first_turn[NO_TOOLS] and "calculator" not in first_turn[NO_TOOLS]

    expected = {WHOLE_TOOLKIT: [schemas["calculator"], schemas["word_count"]],
                CALCULATOR_ONLY: [schemas["calculator"]], BY_SCHEMA: [schemas["calculator"]], NO_TOOLS: None}
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["prompt"] for r in rollouts}) == sorted(expected)
    for r in rollouts:
        assert r.get("tools") == expected[r["prompt"]], r["prompt"]
    assert all(r["score"] == 1.0 for r in rollouts if r["prompt"] == NO_TOOLS)
    assert all(not [m for m in r["messages"] if m["role"] == "tool"] for r in rollouts if r["prompt"] == NO_TOOLS)
    rows = [json.loads(line) for line in (result.run_dir / "round1-train.jsonl").read_text().splitlines()]
    trained = {r["messages"][1]["content"] for r in rows}
    assert NO_TOOLS in trained and trained & {CALCULATOR_ONLY, BY_SCHEMA}  # accepted with a subset, and with none
    for row in rows:
        assert row.get("tools") == expected[row["messages"][1]["content"]]


def test_task_rows_with_unknown_or_malformed_tools_are_skipped_and_counted(tool_model_dir, tmp_path, monkeypatch):
    rows = [{"prompt": "What is 1 plus 2?", "answer": 3, "tools": '["calculator"]'},  # JSON text, as in a CSV
            {"prompt": "What is 2 plus 2?", "answer": 4, "tools": [{"name": "calculator"}, "calculator"]},
            {"prompt": "What is 3 plus 2?", "answer": 5},
            {"prompt": "What is 4 plus 2?", "answer": 6, "tools": ["abacus"]},
            {"prompt": "What is 5 plus 2?", "answer": 7, "tools": "calculator"},
            {"prompt": "What is 6 plus 2?", "answer": 8, "tools": [3]},
            {"prompt": "What is 7 plus 2?", "answer": 9, "tools": {"name": "calculator"}},
            {"prompt": "What is 8 plus 2?", "answer": 10, "tools": [{"type": "function"}]}]
    loaded = load_tasks(str(write_jsonl(tmp_path / "tasks.jsonl", rows)), tool_names=["calculator"])
    assert [t.tools for t in loaded.tasks] == [["calculator"], ["calculator"], None]
    assert loaded.skipped == {"with tools not a list of tool names or function schemas": 4,
                              "naming the tool 'abacus' the agent does not have (its tools: calculator)": 1}
    assert "skipped 5 (4 with tools not a list" in loaded.describe()
    bare = load_tasks(str(write_jsonl(tmp_path / "one.jsonl", rows[:3])))  # an agent without tools
    assert len(bare.tasks) == 1 and "(its tools: it has none)" in bare.describe()

    monkeypatch.chdir(tmp_path)
    from chat.tools import make_toolkit

    wrapper = make_wrapper(tool_model_dir)
    with pytest.raises(practice.PracticeError, match="abacus.*its tools: calculator"):
        wrapper.practice([Task([{"role": "user", "content": "1 + 1?"}], 2, tools=["abacus"])], {"k": 2},
                         ft_config(tmp_path), toolkit=make_toolkit([calculator]))


def test_grpo_gives_each_task_its_own_tools_when_the_sets_differ(tool_model_dir, tmp_path, monkeypatch):
    from chat.tools import make_toolkit
    from hfmodel import practice_grpo

    monkeypatch.chdir(tmp_path)
    toolkit = make_toolkit([calculator])
    schemas = __import__("asyncio").run(toolkit.get_tool_schemas())
    sampling = practice.Sampling(practice.agent_factory("a", None), None, schemas, False, 4, toolkit)
    same = [Task([{"role": "user", "content": "1?"}], 1), Task([{"role": "user", "content": "2?"}], 2,
                                                               tools=["calculator"])]
    assert practice_grpo.task_tools(same, sampling) == ([calculator], None)  # one set: trl's plain `tools`
    mixed = [same[0], Task([{"role": "user", "content": "3?"}], 3, tools=[])]
    assert practice_grpo.task_tools(mixed, sampling) == ([], {"calculator": [calculator], "(no tools)": []})
    asking = make_toolkit([calculator, word_count])  # word_count asks for permission: GRPO leaves it out
    sampling_asking = practice.Sampling(practice.agent_factory("a", None), None,
                                        __import__("asyncio").run(asking.get_tool_schemas()), False, 4, asking)
    assert practice_grpo.task_tools(same, sampling_asking) == ([calculator], None)

    rendered: list[tuple[str, list[str] | None]] = []
    make_tokenizer = practice_grpo._tool_tokenizer

    def recording_tokenizer(handle, with_tools):
        tokenizer = make_tokenizer(handle, with_tools)
        render = tokenizer.apply_chat_template

        def apply_chat_template(conversation, tools=None, **kwargs):
            if kwargs.get("add_generation_prompt") and isinstance(conversation[0], list):  # trl renders a prompt
                rendered.append((conversation[0][-1]["content"],
                                 None if tools is None else [getattr(t, "__name__", t) for t in tools]))
            return render(conversation, tools=tools, **kwargs)

        tokenizer.apply_chat_template = apply_chat_template
        return tokenizer

    monkeypatch.setattr(practice_grpo, "_tool_tokenizer", recording_tokenizer)
    wrapper = make_wrapper(tool_model_dir, max_length=48)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "What is 2 plus 3?", "answer": 5},
                                                   {"prompt": "Say hello.", "answer": "hello", "tools": []}])
    result = wrapper.practice(str(tasks), {"method": "grpo", "k": 2}, ft_config(tmp_path), toolkit=toolkit)
    (round_,) = result.rounds
    assert len([e for e in round_.log_history if "reward" in e]) == 2
    assert wrapper.active_adapter == round_.adapter
    assert {("What is 2 plus 3?", ("calculator",)), ("Say hello.", None)} == {
        (prompt, tuple(tools) if tools else None) for prompt, tools in rendered}


def test_the_docs_example_task_rows_load_with_their_tools(tmp_path):
    docs = (Path(__file__).resolve().parent.parent / "docs" / "practice.md").read_text()
    (block,) = [b for b in re.findall(r"```text\n(.*?)```", docs, re.S) if '"tools"' in b]
    path = tmp_path / "tasks.jsonl"
    path.write_text(block)
    loaded = load_tasks(str(path), tool_names=["calculator"])
    assert not loaded.skipped and [t.tools for t in loaded.tasks] == [["calculator"], []]
