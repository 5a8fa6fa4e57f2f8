"""load_finetune_huggingface_model.py: importing it starts nothing; flags override model_configs; main() chats."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import SYSTEM_PROMPT, TAUGHT_QUESTION, identity_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_import_starts_nothing():
    code = (
        "import sys, builtins\n"
        "builtins.input = lambda *a: (_ for _ in ()).throw(SystemExit('input() was called on import'))\n"
        "import load_finetune_huggingface_model as m\n"
        "heavy = [n for n in ('torch', 'transformers', 'huggingface_model', 'chat.commands') if n in sys.modules]\n"
        "print(repr(m.sys_prompt)); print(len(m.model_configs)); print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout  # nothing else was printed: no banner, no prompt
    assert "Ember" in lines[0]
    assert lines[1] == "1"
    assert lines[2] == "[]"  # no model, no torch: nothing was loaded


def test_the_chat_reaches_its_prompt_without_trl_peft_or_datasets(tiny_model_dir, tmp_path):
    """Starting the chat must not import the training libraries (seconds of start-up): only a fine-tune does. Run
    from a temporary folder: the chat starts its session log in runs/ there."""
    code = (
        "import sys, builtins\n"
        "def prompt(*args):\n"
        "    print('LOADED', sorted(n for n in ('trl', 'peft', 'datasets') if n in sys.modules))\n"
        "    raise EOFError\n"
        "builtins.input = prompt\n"
        "import load_finetune_huggingface_model as m\n"
        f"sys.exit(m.main(['--no-finetune', '--local-model-path', {str(tiny_model_dir)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout  # the prompt was reached, with none of the three imported
    assert list((tmp_path / "runs").glob("session-*.jsonl"))  # the session log, here and not in the checkout


def test_exposes_sys_prompt_and_model_configs(script):
    from huggingface_model import FineTuneConfig, HuggingFaceWrapper

    assert isinstance(script.sys_prompt, str) and script.sys_prompt.strip()
    (entry,) = script.model_configs
    assert entry["model_type"] == "huggingface" and entry["config_name"]
    assert entry["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Every key is one the wrapper accepts, and the fine-tune config is valid.
    code = HuggingFaceWrapper.__init__.__code__
    accepted = set(code.co_varnames[1:code.co_argcount]) | {"model_type"}
    assert set(entry) <= accepted
    FineTuneConfig.from_dict(entry["fine_tune_config"])
    assert Path(entry["data_path"]).is_file()
    assert Path(entry["fine_tune_config"]["eval_data_path"]).is_file()


def test_no_flags_change_nothing(script):
    config = script.apply_overrides(script.model_configs[0], script.parse_args([]))
    assert config == script.model_configs[0]


def test_flags_override_the_config_without_mutating_it(script):
    original = copy.deepcopy(script.model_configs[0])
    args = script.parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--data", "mine.jsonl", "--device", "cpu",
                              "--max-steps", "5", "--retrain"])
    config = script.apply_overrides(script.model_configs[0], args)
    assert config["model_id"] == "Qwen/Qwen2.5-0.5B-Instruct" and config["local_model_path"] is None
    assert config["data_path"] == "mine.jsonl" and config["device"] == "cpu"
    ft = config["fine_tune_config"]
    assert "eval_data_path" not in ft  # the demo eval file does not belong to other data
    assert ft["training_args"]["max_steps"] == 5
    assert ft["training_args"]["learning_rate"] == original["fine_tune_config"]["training_args"]["learning_rate"]
    assert ft["force_retrain"] is True
    assert script.model_configs[0] == original


def test_no_finetune_and_local_path(script):
    args = script.parse_args(["--no-finetune", "--local-model-path", "/some/folder"])
    config = script.apply_overrides(script.model_configs[0], args)
    assert config["data_path"] is None and config["local_model_path"] == "/some/folder"


def run_main(script, monkeypatch, argv, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    return script.main(argv)


def test_main_chats_until_exit(script, taught_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # --model also takes a folder; an adapter folder brings its own base (the tiny model). The adapter was taught
    # without tools, so the chat runs without them (and without a session log: nothing may be written).
    code = run_main(script, monkeypatch, ["--model", str(taught_adapter), "--no-finetune", "--no-tools",
                                          "--no-session-log", "--sys-prompt", SYSTEM_PROMPT],
                    [TAUGHT_QUESTION, "", "exit"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Ember: " in out and "Ember" in out.split("Ember: ", 1)[1]  # the shipped agent is named Ember
    assert out.count("Ember: ") == 1  # the empty line was skipped, exit ended the chat
    assert not (tmp_path / "runs").exists()  # --no-finetune: nothing trained


def test_main_local_model_path_adapter_loads_its_own_base(script, taught_adapter, tiny_model_dir, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_main(script, monkeypatch, ["--local-model-path", str(taught_adapter), "--no-finetune", "--no-tools",
                                          "--sys-prompt", SYSTEM_PROMPT], [TAUGHT_QUESTION, "exit"])
    assert code == 0
    assert "Ember" in capsys.readouterr().out


def test_main_ends_on_eof(script, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(script, monkeypatch, ["--local-model-path", str(tiny_model_dir), "--no-finetune"], []) == 0


def test_main_start_up_fine_tune(script, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "mine.jsonl", identity_rows(8))
    code = run_main(script, monkeypatch, ["--local-model-path", str(tiny_model_dir), "--data", str(data),
                                          "--max-steps", "3", "--sys-prompt", SYSTEM_PROMPT,
                                          "--startup-finetune", "wait"], ["exit"])
    assert code == 0
    # The configured relative output_dir, under the working folder: one run (and this session's log).
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 3
    assert info["system_prompt"] == SYSTEM_PROMPT


def test_main_reports_a_bad_model_folder(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_main(script, monkeypatch, ["--local-model-path", str(tmp_path / "missing"), "--no-finetune"], [])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing" in err
