"""The chat's start (chat/startup.py): the model loads first (hfmodel/preload.py), the opening lines and the prompt
follow, and AgentScope is imported and the agents built while the user types; starts with more to do first build
everything before the prompt, and both show the same lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SYSTEM_PROMPT, TAUGHT_QUESTION

from hfmodel.preload import MODEL_CONFIG_KEYS, preload

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_prompt_shows_while_agentscope_is_still_to_be_imported(tiny_model_dir, tmp_path):
    """AgentScope's import is held until the prompt shows: the prompt must come without it (before this change the
    script imported AgentScope first, so the held import timed out and the prompt found it imported)."""
    code = (
        "import sys, builtins, threading, importlib.abc\n"
        "prompted, state = threading.Event(), {}\n"
        "class Gate(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'agentscope' and 'gate' not in state:\n"
        "            state['gate'] = prompted.wait(30)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Gate())\n"
        "def prompt(text=''):\n"
        "    state['at_prompt'] = 'agentscope' in sys.modules\n"
        "    prompted.set()\n"
        "    return 'exit'\n"
        "builtins.input = prompt\n"
        "import load_finetune_huggingface_model as m\n"
        f"code = m.main(['--no-finetune', '--local-model-path', {str(tiny_model_dir)!r}])\n"
        "print('STATE', state)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "STATE {'at_prompt': False, 'gate': True}" in done.stdout, done.stdout
    assert done.stdout.rstrip().endswith("STATE {'at_prompt': False, 'gate': True}")
    assert "Bye." in done.stdout  # the chat was built behind the prompt and ended normally


def _opening(out: str) -> str:
    """What the chat showed before its first prompt (as one line: the console wraps it), the session log's name
    made stable."""
    before = " ".join(out.split("User: ", 1)[0].split())
    return re.sub(r"session-\S+\.jsonl", "session-X.jsonl", before)


@pytest.mark.parametrize("prompt_first", [True, False], ids=["prompt first", "built first"])
def test_both_starts_show_the_same_lines_and_answer(script, tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                    prompt_first):
    import chat.startup

    monkeypatch.chdir(tmp_path)
    if not prompt_first:  # what a start with an adapter to load, int8, or a fine-tune to wait for does
        monkeypatch.setattr(chat.startup, "prompt_first", lambda *args: False)
    monkeypatch.setattr(script, "agents", [{"name": "Ember", "sys_prompt": SYSTEM_PROMPT},
                                           {"name": "Critic", "sys_prompt": "You review answers."}])
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(f"{TAUGHT_QUESTION}\nexit\n"))
    code = script.main(["--local-model-path", str(tiny_model_dir), "--no-finetune"])
    out = capsys.readouterr().out
    assert code == 0
    assert _opening(out) == (
        "Agents: Ember, Critic (one base model, each with its own adapters); plain messages go to Ember; @Name or "
        f"@all to address others. Ember is ready ({tiny_model_dir}). Type a message, /help for commands, exit to "
        "leave. Tools: calculator. This conversation is saved as training data in runs/session-X.jsonl "
        "(--no-session-log turns that off).")
    assert out.count("Ember: ") == 1 and out.rstrip().endswith("Bye.")
    assert len(list((tmp_path / "runs").glob("session-*.jsonl"))) == 1  # the one session log, created once


def test_a_bad_agents_list_is_one_line_before_the_model_loads(script, tmp_path, monkeypatch, capsys):
    import builtins

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(script, "agents", [{"name": "all", "sys_prompt": SYSTEM_PROMPT}])
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("the prompt showed"))
    # The model folder does not exist either: the agents are checked first, without loading anything.
    code = script.main(["--local-model-path", str(tmp_path / "missing"), "--no-finetune"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("error:") == 1 and "Invalid `agents`" in err and "'all'" in err


def test_our_bug_behind_the_prompt_is_one_line_and_a_logged_traceback(script, tiny_model_dir, tmp_path, monkeypatch,
                                                                      capsys):
    import chat.team

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building the agents")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(chat.team, "build_team", broken)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n"))
    code = script.main(["--local-model-path", str(tiny_model_dir), "--no-finetune"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.out + captured.err
    (line,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "Starting the chat" in line and "errors.log" in line
    assert "a bug while building the agents" in (tmp_path / "runs" / "errors.log").read_text()


def test_a_preloaded_model_is_taken_over_once_with_the_same_replies(tiny_model_dir):
    from huggingface_model import HuggingFaceWrapper

    config = {"config_name": "t", "local_model_path": str(tiny_model_dir), "max_length": 12, "do_sample": False}
    preloaded = preload(config)
    assert preloaded.handle.module is not None and preloaded.handle.chat_format is not None
    with pytest.raises(ValueError, match="other settings \\(dtype\\)"):
        HuggingFaceWrapper.from_config({**config, "dtype": "bfloat16"}, preloaded=preloaded)
    served = HuggingFaceWrapper.from_config(config, preloaded=preloaded)
    assert served.handle is preloaded.handle and served.model == str(tiny_model_dir)
    with pytest.raises(ValueError, match="taken over already"):
        HuggingFaceWrapper.from_config(config, preloaded=preloaded)
    loaded = HuggingFaceWrapper.from_config(config)
    chat = [{"role": "user", "content": TAUGHT_QUESTION}]
    assert served.generate(chat) == loaded.generate(chat)
    assert served.stop_token_ids == loaded.stop_token_ids and served.context_size == loaded.context_size


def test_preload_refuses_a_bad_entry_as_the_wrapper_does(tiny_model_dir):
    from huggingface_model import HuggingFaceWrapper, ModelLoadError

    code = HuggingFaceWrapper.__init__.__code__
    assert tuple(code.co_varnames[1:code.co_argcount]) == MODEL_CONFIG_KEYS
    for bad, message in [({"temprature": 0.5}, "Unknown model_configs key.*did you mean 'temperature'"),
                         ({"temperature": 0}, "Invalid generation settings"),
                         ({"engine": "vllm"}, "Unknown engine"),
                         ({"model_type": "openai"}, "not supported here")]:
        config = {"config_name": "t", "local_model_path": str(tiny_model_dir), **bad}
        with pytest.raises(ModelLoadError, match=message):
            preload(config)
        with pytest.raises(ModelLoadError, match=message):
            HuggingFaceWrapper.from_config(config)
