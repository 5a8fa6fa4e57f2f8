"""The cases of issue 15, one test each: the 19 bugs (data lost, the chat dying, finetune.py tracebacks, terminal
injection, wrong behaviour) and the unclear messages it names. Each failed before the fix (B1, B2, B5, B9, B10 and
B15 on the commit before the architecture rework, the rest on the commit before this one).

The mechanisms behind the fixes have their own tests in test_reliability.py.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TAUGHT_QUESTION, identity_rows, make_wrapper, write_jsonl
from reliability_helpers import (  # noqa: F401 - finetune_cli is a fixture
    adapter_pointing_at,
    finetune_cli,
    model_without_tokenizer,
    narrow_model,
)
from test_chat_commands import make_chat

from hfmodel.common import ModelLoadError
from hfmodel.data import DatasetFormatError, load_chat_dataset
from hfmodel.settings import parse_overrides

ROOT = Path(__file__).resolve().parent.parent
DEEP_LINE = "[" * 5000 + "]" * 5000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", identity_rows())


def deep_file(tmp_path: Path) -> Path:
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(identity_rows(1)[0]) + "\n" + DEEP_LINE + "\n")
    return path


def one_error(step) -> str:
    """The step printed exactly one error message and nothing else; returned as one line (rich wraps it)."""
    assert len(step.errors) == 1 and step.console.lstrip().startswith("error:"), step.console
    assert "Traceback" not in step.console
    return " ".join(step.console.split())


def answered(step) -> bool:
    return step.out.startswith("Assistant: ") and not step.errors


# ================================================================================== data lost or deleted


def test_b1_save_keeps_a_users_folder_named_x_tmp(taught_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "X.tmp").mkdir()
    (tmp_path / "X.tmp" / "thesis.txt").write_text("three years of work")
    c = make_chat(taught_wrapper, tmp_path).run(["/save X"])
    assert not c.steps[0].errors
    assert (tmp_path / "X" / "adapter_config.json").exists()
    assert (tmp_path / "X.tmp" / "thesis.txt").read_text() == "three years of work"
    assert {p.name for p in tmp_path.iterdir()} <= {"X", "X.tmp", "runs"}  # no temporary folder left behind


def test_b2_export_keeps_a_users_folder_named_x_tmp(taught_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "X.tmp").mkdir()
    (tmp_path / "X.tmp" / "thesis.txt").write_text("three years of work")
    c = make_chat(taught_wrapper, tmp_path).run(["/export X"])
    assert not c.steps[0].errors, c.steps[0].console
    assert (tmp_path / "X" / "config.json").exists()
    assert (tmp_path / "X.tmp" / "thesis.txt").read_text() == "three years of work"


def test_b3_two_chats_of_the_same_second_never_overwrite_each_others_taught_examples(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = make_chat(make_wrapper(tiny_model_dir, do_sample=False), tmp_path)
    two = make_chat(make_wrapper(tiny_model_dir, do_sample=False), tmp_path)
    two.session.session_stamp = one.session.session_stamp
    one.run(["Hi", "/teach One."])
    two.run(["Hi", "/teach Two.", "/train replay=false max_steps=1"])
    assert one.session.taught_path.read_text().count("One.") == 1
    assert "Two." not in one.session.taught_path.read_text()
    assert one.session.taught_path.with_name(one.session.taught_path.stem + "-train.jsonl") != \
        two.session.taught_path.with_name(two.session.taught_path.stem + "-train.jsonl")


def test_b4_load_of_a_folder_without_tokenizer_keeps_serving_the_previous_model(taught_wrapper, tiny_model_dir,
                                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = model_without_tokenizer(tiny_model_dir, tmp_path / "weights-only")
    model, tokenizer, adapters = taught_wrapper.hf_model, taught_wrapper.tokenizer, dict(taught_wrapper.adapters)
    c = make_chat(taught_wrapper, tmp_path).run([f"/load {folder}", TAUGHT_QUESTION])
    error = one_error(c.steps[0])
    assert "has no tokenizer files" in error and "local_tokenizer_path" in error
    assert taught_wrapper.hf_model is model and taught_wrapper.tokenizer is tokenizer
    assert taught_wrapper.adapters == adapters and taught_wrapper.active_adapter == "ft1"
    assert answered(c.steps[1])


# ================================================================================== the chat died


def test_b5_infinite_epochs_are_one_line_and_the_chat_goes_on(tiny_wrapper, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = f"/finetune {data} max_steps=-1 num_train_epochs=Infinity"
    c = make_chat(tiny_wrapper, tmp_path).run([line, f"/finetune {data} max_steps=-1 num_train_epochs=.inf", "Hi"])
    for step in c.steps[:2]:
        assert "num_train_epochs" in one_error(step) and "finite" in one_error(step)
    assert answered(c.steps[2]) and not list(c.runs.glob("*/run.json"))


def test_b6_report_to_wandb_without_wandb_is_one_line_naming_the_fix(tiny_wrapper, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run([f"/finetune {data} report_to=wandb", "Hi"])
    error = one_error(c.steps[0])
    assert "report_to = 'wandb': wandb not installed (pip install wandb), or use report_to=none" in error
    assert "failed: RuntimeError" not in error  # a user mistake, not our bug
    assert answered(c.steps[1]) and not list(c.runs.glob("*/run.json"))


def test_b7_a_line_nested_5000_deep_is_one_line_in_dryrun_and_exit_2_at_start_up(tiny_wrapper, tiny_model_dir,
                                                                                tmp_path, monkeypatch, capsys):
    import load_finetune_huggingface_model as script

    monkeypatch.chdir(tmp_path)
    deep = deep_file(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run([f"/dryrun {deep}", f"/finetune {deep}", "Hi"])
    for step in c.steps[:2]:
        assert f"{deep}, line 2: JSON nested more than 32 levels deep" in one_error(step)
    assert answered(c.steps[2])
    monkeypatch.setattr(script, "quiet_libraries", lambda **kw: None, raising=False)
    monkeypatch.setattr("hfmodel.common.quiet_libraries", lambda **kw: None)
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("the chat started"))
    status = script.main(["--local-model-path", str(tiny_model_dir), "--data", str(deep),
                          "--startup-finetune", "wait"])
    err = capsys.readouterr()
    assert status == 2
    assert "nested more than 32 levels deep" in err.out + err.err and "Traceback" not in err.out + err.err


def test_b8_ctrl_c_in_the_first_seconds_of_start_up_ends_cleanly(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for delay in (0.8, 2.5):  # while the libraries import, and while the model loads
        proc = subprocess.Popen([sys.executable, str(ROOT / "load_finetune_huggingface_model.py"),
                                 "--local-model-path", str(tiny_model_dir), "--no-finetune"],
                                cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        if proc.returncode == 130:
            assert err.strip().splitlines()[-1] == "Interrupted."
        else:  # it had reached the prompt: Ctrl-C there leaves the chat like Ctrl-D
            assert proc.returncode == 0 and out.rstrip().endswith("Bye."), (proc.returncode, out, err)


def test_b8_ctrl_c_during_the_imports_is_exit_130(monkeypatch, capsys):
    import load_finetune_huggingface_model as script

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hfmodel.common.quiet_libraries", interrupted)
    try:
        status = script.main([])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during start-up escaped main() (a traceback for the user)")
    assert status == 130
    assert capsys.readouterr().err.strip() == "Interrupted."


def test_b9_an_infinite_lora_alpha_is_refused_before_training(tiny_wrapper, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run([f"/finetune {data} lora.lora_alpha=Infinity",
                                              f"/finetune {data} lora.lora_alpha=.inf", "Hi"])
    for step in c.steps[:2]:
        assert "lora_config.lora_alpha" in one_error(step) and "a finite number > 0" in one_error(step)
    assert answered(c.steps[2]) and tiny_wrapper.active_adapter is None and not list(c.runs.glob("*/run.json"))


def test_b10_seeds_beyond_32_bits_are_refused_where_they_enter(tiny_wrapper, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = tiny_wrapper.parameters.model_dump()
    c = make_chat(tiny_wrapper, tmp_path).run(["/set seed=100000000000000000000000", "/set seed=1e30",
                                              "/set seed=-1", f"/finetune {data} seed=100000000000000000000000",
                                              "/set max_length=100000000000000000000000", "Hi"])
    for step in c.steps[:4]:
        assert "seed" in one_error(step)
    assert "a whole number from 0 to 4294967295" in one_error(c.steps[3])
    assert "max_length = 100000000000000000000000: too large" in one_error(c.steps[4])
    assert tiny_wrapper.parameters.model_dump() == settings
    assert answered(c.steps[5])


@pytest.mark.parametrize("case", ["seq-len-0", "output-dir-proc", "epochs-inf", "wandb", "seed", "config-unreadable",
                                  "config-nested", "data-unreadable", "data-nested"])
def test_b11_finetune_py_bad_input_is_one_line_and_exit_2(case, finetune_cli, tmp_path):  # noqa: F811
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.symlink_to("/proc/self/mem")  # a file that exists but cannot be read, even by root
    flags, expected = {
        "seq-len-0": (["--estimate-memory", "--seq-len", "0"], "--seq-len must be a whole number >= 1 (got 0)"),
        "output-dir-proc": (["--set", "training_args.output_dir=/proc/x"],
                            "training_args.output_dir: cannot write to /proc/x"),
        "epochs-inf": (["--set", "training_args.num_train_epochs=.inf", "--set", "max_steps=-1"],
                       "training_args.num_train_epochs = inf: must be a finite number > 0"),
        "wandb": (["--set", "report_to=wandb"], "wandb not installed (pip install wandb)"),
        "seed": (["--set", "seed=-1"], "training_args.seed = -1: must be a whole number from 0 to 4294967295"),
        "config-unreadable": (["--config", str(unreadable)], "cannot read config file"),
        "config-nested": (["--config", str(tmp_path / "nested.json")], "nested hundreds of levels deep"),
        "data-unreadable": (["--set", f"data_path={unreadable}"], f"Cannot read data file {unreadable}"),
        "data-nested": (["--set", f"data_path={deep_file(tmp_path)}"], "line 2: JSON nested more than 32 levels"),
    }[case]
    (tmp_path / "nested.json").write_text(DEEP_LINE)
    status, out, err = finetune_cli(*flags)
    assert status == 2, (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not list((tmp_path / "runs").glob("*/adapter"))


# ================================================================================== terminal injection


def test_b12_escape_sequences_in_training_data_never_reach_the_terminal(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    title, clear = "\x1b]0;TITLE\x1b\\", "\x1b[2J"
    rows = [{"messages": [{"role": "user", "content": f"Who{title} are you?{clear}"},
                          {"role": "assistant", "content": f"I am{clear} Ember.{title}"}]}] * 4
    data = write_jsonl(tmp_path / "hostile.jsonl", rows)
    c = make_chat(tiny_wrapper, tmp_path, probes=[f"Who{title} are you?{clear}"])
    c.run([f"/dryrun {data}", f"/finetune {data} max_steps=1", f"Hello{title}{clear}", "/history"])
    shown = c.console_text + c.out_text
    assert "\x1b" not in shown and "TITLE" not in shown and "[2J" not in shown
    assert "Who are you?" in c.step(f"/dryrun {data}").console
    assert "Who are you?" in c.step(f"/finetune {data} max_steps=1").console  # the probe table
    assert "user: Hello" in c.step("/history").console


def test_b13_a_parent_folders_env_is_not_loaded(tmp_path, monkeypatch):
    import hfmodel.common

    for name in ("HF_TOKEN", "HUGGINGFACE_TOKEN", "UNRELATED_SECRET"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setattr(hfmodel.common, "PROJECT_DIR", tmp_path / "elsewhere")
    (tmp_path / ".env").write_text("HF_TOKEN=hf_parent\nHF_HUB_OFFLINE=0\nUNRELATED_SECRET=1\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert hfmodel.common.hf_token() is None
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and "UNRELATED_SECRET" not in os.environ


# ================================================================================== wrong behaviour


def test_b14_finetune_with_a_data_file_keeps_the_eval_file_given_with_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows(12))
    configured = write_jsonl(tmp_path / "configured_eval.jsonl", identity_rows(2))
    given = write_jsonl(tmp_path / "given_eval.jsonl", identity_rows(3, answer="I am the given eval file."))
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    c = make_chat(wrapper, tmp_path, eval_data_path=str(configured))
    c.run([f"/finetune {data} eval_data_path={given} max_steps=1", f"/finetune {data} max_steps=1 force_retrain=true"])
    first, second = sorted(c.runs.glob("*/run.json"))
    assert json.loads(first.read_text())["config"]["eval_data_path"] == str(given)
    assert json.loads(second.read_text())["config"]["eval_data_path"] is None  # the configured one is not for data
    assert not any(step.errors for step in c.steps)


def test_b15_list_values_reach_peft_as_lists(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for typed in ("[q_proj]", '["q_proj"]', "q_proj", "[q_proj, v_proj]", "q_proj,v_proj"):
        value = parse_overrides([f"lora.target_modules={typed}"])["lora_config"]["target_modules"]
        assert value in (["q_proj"], "q_proj", ["q_proj", "v_proj"]), typed
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    c = make_chat(wrapper, tmp_path).run([f"/finetune {data} lora.target_modules=[q_proj,v_proj] max_steps=1"])
    assert not c.steps[0].errors, c.steps[0].console
    assert set(wrapper.hf_model.peft_config["ft1"].target_modules) == {"q_proj", "v_proj"}


LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_b15b_lora_on_chosen_layers_with_all_linear_trains_only_those_layers(tiny_model_dir, data, tmp_path,
                                                                               monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    with caplog.at_level(logging.INFO, logger="huggingface_model"):
        c = make_chat(wrapper, tmp_path).run([f"/finetune {data} lora.layers_to_transform=[1] max_steps=1",
                                              f"/finetune {data} max_steps=1 force_retrain=true "
                                              f"lora.target_modules={','.join(sorted(LLAMA_LINEAR))}"])
    assert not any(step.errors for step in c.steps), [step.console for step in c.steps]
    model = wrapper.hf_model
    names = [n for n, _ in model.named_parameters() if ".ft1." in n]
    assert names and all(".layers.1." in n for n in names)  # none in layer 0
    assert {n.split(".ft1")[0].rsplit(".", 2)[-2] for n in names} == LLAMA_LINEAR  # every linear kind
    # The second run (the same modules, every layer) cannot start from the first's weights: it starts from scratch.
    assert "lora_config differs from adapter 'ft1'; training 'ft2' from scratch" in caplog.text
    assert any(".layers.0." in n for n, _ in model.named_parameters() if ".ft2." in n)


def test_b16_quoted_names_are_unquoted_the_same_way_by_every_command(taught_wrapper, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spaced = tmp_path / "my data.jsonl"
    spaced.write_text(data.read_text())
    c = make_chat(taught_wrapper, tmp_path).run(['/save "my adapter"', f'/dryrun "{spaced}"', "/save my adapter",
                                                 "/load 'my adapter'", "Hello!", "/teach \"I'm Ember.\""])
    assert (tmp_path / "my adapter" / "adapter_config.json").exists()
    assert not list(tmp_path.glob('"*'))  # no folder with quotes in its name
    assert not c.steps[1].errors and "format 'messages'" in c.steps[1].console
    assert "one folder; quote a name with spaces" in one_error(c.steps[2])
    assert "Adapter ft2 loaded and active." in c.steps[3].console
    assert not c.steps[5].errors and c.session.taught[-1].answer == "I'm Ember."


# ================================================================================== unclear messages


def test_u1_latin1_data_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes((json.dumps({"messages": [{"role": "user", "content": "Café?"},
                                               {"role": "assistant", "content": "Oui."}]}, ensure_ascii=False)
                      + "\n").encode("latin-1"))
    with pytest.raises(DatasetFormatError) as e:
        load_chat_dataset(str(path))
    assert str(path) in str(e.value) and "not UTF-8" in str(e.value) and "iconv -f latin1 -t utf-8" in str(e.value)
    assert "\n" not in str(e.value)


def test_u2_a_utf8_bom_is_skipped(tmp_path):
    row = identity_rows(1)[0]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode() * 2)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nWho are you?,I am Ember.\n")
    for name, n in (("bom.jsonl", 2), ("bom.json", 1), ("bom.csv", 1)):
        dataset = load_chat_dataset(str(tmp_path / name))
        assert len(dataset) == n and dataset.rows[0][0]["content"] == TAUGHT_QUESTION


def test_u3_broken_json_in_a_csv_messages_column_says_so(tmp_path):
    path = tmp_path / "broken.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], ['[{"role": "user", "content": "hi"} {"role": "assistant"}]']])
    with pytest.raises(DatasetFormatError) as e:
        load_chat_dataset(str(path))
    assert "broken JSON in 'messages'" in str(e.value) and "not a list" not in str(e.value)


def test_u4_an_adapter_made_for_another_base_loads_with_a_warning(tiny_wrapper, taught_adapter, tmp_path, caplog):
    other = adapter_pointing_at(taught_adapter, tmp_path / "other", "someone/another-model")
    with caplog.at_level(logging.WARNING, logger="huggingface_model"):
        record = tiny_wrapper.load_adapter(other)
    assert "was made for someone/another-model" in caplog.text and "(made for someone/another-model)" in record.note
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="huggingface_model"):
        tiny_wrapper.load_adapter(taught_adapter)  # its own base: no warning
    assert "was made for" not in caplog.text


def test_u5_adapters_store_their_base_as_an_absolute_path_and_load_from_any_folder(tiny_model_dir, data, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    wrapper = make_wrapper(tiny_model_dir.name, do_sample=False)  # a relative local_model_path
    c = make_chat(wrapper, tmp_path).run([f"/finetune {data} max_steps=1", f"/save {tmp_path / 'saved'}"])
    assert not any(step.errors for step in c.steps)
    for adapter in (tmp_path / "saved", wrapper.last_result.adapter_dir):
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)  # somewhere else: the saved adapter still finds its base
    loaded = make_wrapper(tmp_path / "saved", do_sample=False)
    assert loaded.active_adapter == "ft1" and Path(loaded.source.path).resolve() == tiny_model_dir.resolve()


def test_u6_commands_without_arguments_say_so(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ["/undo 3", "/reset now please", "/adapters x", "/history x", "/help x"]
    c = make_chat(tiny_wrapper, tmp_path).run(["Hello!", *lines])
    for line, step in zip(lines, c.steps[1:], strict=True):
        error = one_error(step)
        assert f"{line.split()[0]} takes no arguments" in error, error
    assert len(c.agent.history()) == 2  # "/reset now please" did not clear the conversation


def test_u7_dryrun_shows_at_most_a_screenful_of_a_huge_example(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    huge = "word " * 40_000  # 200 kB (the 2 MB example behaves the same, ten times slower)
    data = write_jsonl(tmp_path / "huge.jsonl", [{"messages": [{"role": "user", "content": "Tell me everything."},
                                                               {"role": "assistant", "content": huge}]}])
    c = make_chat(tiny_wrapper, tmp_path).run([f"/dryrun {data} max_length=64"])
    shown = c.steps[0].console
    assert len(shown) < 5000
    assert re.search(r"\(cut to a screenful: 2,000 of 200,[0-9]{3} characters, [0-9,]+ of [0-9,]+ tokens shown\)", shown)


def test_u8_an_adapter_of_another_shape_is_refused_in_one_line_naming_the_layer(tiny_model_dir, taught_adapter,
                                                                                tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(narrow_model(tiny_model_dir, tmp_path / "narrow"), do_sample=False)
    c = make_chat(wrapper, tmp_path).run([f"/load {taught_adapter}", "Hi"])
    error = one_error(c.steps[0])
    assert error.endswith("load that model first.") and "PeftModelForCausalLM:" not in error
    assert "does not fit the loaded base model" in error
    assert "layer model.layers.0." in error and "in the model but the adapter's lora_" in error
    assert str(tiny_model_dir.resolve()) in error  # the base it was made for
    assert wrapper.active_adapter is None and answered(c.steps[1])
    with pytest.raises(ModelLoadError):
        wrapper.load_adapter(taught_adapter)
    assert not hasattr(wrapper.hf_model, "peft_config")  # nothing of the refused adapter was left in the model
