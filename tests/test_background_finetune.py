"""The start-up fine-tune in the background (chat/background.py), through the real script on the tiny model: the
prompt appears while it runs, replies are answered meanwhile, the adapter is swapped in (with the report) between
replies once it finishes; a failing, interrupted or exited run leaves the chat on its weights with one line."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import SYSTEM_PROMPT, TAUGHT_QUESTION, identity_rows, write_jsonl

from chat.background import THREAD_NAME, Turns
from chat.startup import START_THREAD

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def background_thread() -> threading.Thread | None:
    """The run's thread, once the chat's start has built the session behind the first prompt (chat/startup.py:
    the run starts there, while the user types)."""
    start = next((t for t in threading.enumerate() if t.name == START_THREAD), None)
    if start is not None:
        start.join(120)
    return next((t for t in threading.enumerate() if t.name == THREAD_NAME), None)


def scripted_input(monkeypatch, steps):
    """builtins.input answering with `steps` in turn: each a line, or a function called at that prompt (it may
    check or wait for the run, and returns the line)."""
    queue = list(steps)
    seen: list[str] = []

    def fake_input(prompt=""):
        seen.append(prompt)
        if not queue:
            raise EOFError
        step = queue.pop(0)
        return step() if callable(step) else step

    monkeypatch.setattr(builtins, "input", fake_input)
    return seen


def argv(model_dir, data, steps, *more):
    return ["--local-model-path", str(model_dir), "--data", str(data), "--max-steps", str(steps), "--no-tools",
            "--sys-prompt", SYSTEM_PROMPT, "--startup-finetune", "background", *more]


def only_run(tmp_path) -> dict:
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    return json.loads((run / "run.json").read_text())


def test_the_prompt_comes_first_a_reply_is_answered_meanwhile_and_exit_stops_the_run(script, tiny_model_dir,
                                                                                       tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))
    alive_at_prompt = []

    def first():
        alive_at_prompt.append(background_thread() is not None)  # the fine-tune has not finished: it runs
        return TAUGHT_QUESTION

    scripted_input(monkeypatch, [first, "exit"])
    code = script.main(argv(tiny_model_dir, data, 100_000))
    out = capsys.readouterr().out
    assert code == 0
    assert alive_at_prompt == [True]
    assert "start-up fine-tune running in the background" in out
    assert out.count("Ember: ") == 1  # answered while the run was going
    # exit stopped the run at a step boundary: one line, the base weights kept, the run recorded as interrupted
    assert "Fine-tuning stopped at step" in out and "still serving the previous weights" in out
    assert not [line for line in out.splitlines() if line.startswith("error:")]  # leaving is not a failure
    assert "Traceback" not in out and out.rstrip().endswith("Bye.")
    assert only_run(tmp_path)["status"] == "interrupted"
    assert background_thread() is None


def test_the_adapter_is_swapped_in_between_replies_with_the_report(script, tiny_model_dir, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))

    def after_the_run():
        thread = background_thread()
        if thread is not None:
            thread.join(300)  # the chat is at its prompt: the run has the CPU to itself
        return "/adapters"

    scripted_input(monkeypatch, [TAUGHT_QUESTION, after_the_run, "exit"])
    code = script.main(argv(tiny_model_dir, data, 4))
    out = capsys.readouterr().out
    assert code == 0
    swap = out.index("now serving adapter ft1")
    assert out.index("Ember: ") < out.index("Fine-tune report") < swap  # reply first, then the report
    table = out[swap:]
    assert "Adapters" in table and "│ * │ ft1" in table  # /adapters: the new adapter is active
    assert "(background)" in table
    info = only_run(tmp_path)
    assert info["status"] == "completed" and info["steps"] == 4
    assert "Stopping the start-up fine-tune" not in out


def test_a_failing_background_run_leaves_the_chat_on_its_weights_with_one_line(script, tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no messages here"}\n')

    def after_the_run():
        thread = background_thread()
        if thread is not None:
            thread.join(300)
        return TAUGHT_QUESTION

    scripted_input(monkeypatch, [after_the_run, "/adapters", "exit"])
    code = script.main(argv(tiny_model_dir, bad, 4))
    out = capsys.readouterr().out
    assert code == 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No known dataset format" in errors[0]
    assert "Chatting with the weights loaded before it." in out.replace("\n", " ")
    assert out.count("Ember: ") == 1  # the chat went on
    assert "│ * │ base" in out  # still the base weights
    assert "Traceback" not in out


def test_ctrl_c_at_the_prompt_while_training_exits_cleanly(tiny_model_dir, tmp_path):
    """The real script in a subprocess: SIGINT at the prompt while the run trains ends the chat with one line."""
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "load_finetune_huggingface_model.py"),
                             *argv(tiny_model_dir, data, 100_000)], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    assert proc.stdout is not None
    while b"User: " not in seen:
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    text = (seen + out).decode(errors="replace")
    assert proc.returncode == 0, err.decode(errors="replace")
    assert "Traceback" not in err.decode(errors="replace") + text
    assert "still serving the previous weights" in text.replace("\n", " ") or "stopped before it finished" in text
    assert text.rstrip().endswith("Bye.")


def test_wait_mode_trains_before_the_prompt(script, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))
    alive_at_prompt = []
    scripted_input(monkeypatch, [lambda: alive_at_prompt.append(background_thread()) or "exit"])
    code = script.main(argv(tiny_model_dir, data, 3)[:-2] + ["--startup-finetune", "wait"])
    assert code == 0 and alive_at_prompt == [None]
    assert only_run(tmp_path)["status"] == "completed"


def test_an_unknown_mode_is_one_line(script, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(script, "startup_fine_tune", "later")
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))
    scripted_input(monkeypatch, ["exit"])
    assert script.main(argv(tiny_model_dir, data, 3)[:-2]) == 2
    assert "startup_fine_tune must be one of background, wait" in capsys.readouterr().out


def test_turns_a_reply_waits_for_the_step_and_the_run_waits_for_the_reply():
    turns, order = Turns(), []
    turns.take()  # the run holds the CPU
    replied = threading.Event()

    def reply():
        with turns.reply():
            order.append("reply")
        replied.set()

    thread = threading.Thread(target=reply)
    thread.start()
    assert not replied.wait(0.2)  # the step in progress is not cut short
    order.append("step ends")
    turns.take()  # step boundary: the waiting reply goes first, then the run continues
    order.append("next step")
    thread.join(5)
    turns.release()
    assert order == ["step ends", "reply", "next step"]


def test_a_team_chat_swaps_the_first_agents_adapter_in(script, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(script, "agents", [{"name": "Ember", "sys_prompt": SYSTEM_PROMPT},
                                           {"name": "Critic", "sys_prompt": "You review answers tersely."}])
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))

    def after_the_run():
        thread = background_thread()
        if thread is not None:
            thread.join(300)
        return "@Critic review that"

    scripted_input(monkeypatch, [TAUGHT_QUESTION, after_the_run, "/adapters", "exit"])
    code = script.main(argv(tiny_model_dir, data, 3))
    out = capsys.readouterr().out
    assert code == 0
    assert "now serving adapter ft1" in out and "\nCritic: " in out.split("now serving adapter ft1", 1)[1]
    assert "│ * │ ft1" in out  # /adapters of Ember, the current agent: the new adapter is active
    assert only_run(tmp_path)["status"] == "completed"
