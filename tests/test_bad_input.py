"""Bad input, one table: every mistake gets ONE clear message naming the problem and the fix, and nothing is
written or lost.

Each row of CASES is one kind of bad (or awkward) input. It is tried on up to three surfaces:

- api:    the Python API raises the row's specific exception type (or warns and carries on);
- chat:   in ChatSession the command prints exactly one "error:" line and the chat goes on (the next message
          gets a reply, the loaded model is unchanged);
- script: `load_finetune_huggingface_model.main(argv)` at start-up returns exit status 2 with one "error:"
          line and no traceback (or carries on with status 0).

On every surface the files under the test's folder (the inputs, and any runs/ the code might create) are
compared before and after: an error writes nothing and changes nothing.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import identity_rows, make_wrapper, script_logging_restored, write_jsonl

from hfmodel.data import DatasetFormatError, load_chat_dataset
from huggingface_model import (
    CHATML_TEMPLATE,
    FineTuneConfig,
    FineTuneConfigError,
    FineTuneError,
    ModelLoadError,
    cpu_has_bf16,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "load_finetune_huggingface_model.py"
GOOD_ROW = {"messages": [{"role": "user", "content": "Who are you?"},
                         {"role": "assistant", "content": "I am Ember."}]}
TIMINGS: dict[str, float] = {}


# =============================================================================================
# The test's world: a folder with inputs, the tiny model, and snapshots of every file


@dataclass
class Env:
    tmp: Path
    tiny: Path
    caplog: Any
    ctx: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        """A small valid data file (written by the `env` fixture, before any snapshot)."""
        return self.tmp / "good.jsonl"

    def model_copy(self, name: str) -> Path:
        folder = self.tmp / name
        if not folder.exists():
            shutil.copytree(self.tiny, folder)
        return folder

    def train_config(self, **training_args) -> dict:
        args = {"output_dir": str(self.tmp / "runs"), "max_steps": 2, "learning_rate": 1e-2,
                "per_device_train_batch_size": 2, "save_strategy": "no", **training_args}
        return {"training_args": args}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below `folder` with a hash of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).lower()


def assert_mentions(text: str, needles: list[str]) -> None:
    flat = normalise(text)
    missing = [n for n in needles if normalise(n) not in flat]
    assert not missing, f"message lacks {missing}: {text!r}"


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("error:")]


# =============================================================================================
# Inputs


def missing_folder(env: Env) -> dict:
    return {"path": env.tmp / "no-such-model"}


def folder_without_model(env: Env) -> dict:
    folder = env.tmp / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("notes\n")
    (folder / "tokenizer.json").write_text("{}")
    return {"path": folder}


def remote_code_model(env: Env) -> dict:
    folder = env.model_copy("custom-code-model")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_arch", architectures=["MyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.MyConfig",
                            "AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = env.tmp / "CUSTOM_CODE_RAN"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    return {"path": folder, "marker": marker}


def no_template_model(env: Env) -> dict:
    folder = env.model_copy("no-template")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    return {"path": folder}


def no_pad_model(env: Env) -> dict:
    folder = env.model_copy("no-pad")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            config = json.loads((folder / name).read_text())
            config.pop("pad_token", None)
            (folder / name).write_text(json.dumps(config))
    return {"path": folder}


def data_file(name: str, content: bytes | None) -> Callable[[Env], dict]:
    def make(env: Env) -> dict:
        path = env.tmp / name
        if content is not None:
            path.write_bytes(content)
        return {"path": path}

    return make


def rows_file(name: str, bad_row: dict | None, good: int = 2) -> Callable[[Env], dict]:
    def make(env: Env) -> dict:
        rows = [GOOD_ROW] * good + ([bad_row] if bad_row else [])
        return {"path": write_jsonl(env.tmp / name, rows)}

    return make


def long_rows(env: Env) -> dict:
    """Rows whose prompt fits max_length=64 but whose answer does not: truncation keeps some answer tokens."""
    rows = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "the quick brown fox jumps " * 30}]}] * 3
    return {"path": write_jsonl(env.tmp / "long.jsonl", rows)}


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# =============================================================================================
# The table


@dataclass
class Case:
    id: str
    setup: Callable[[Env], dict] = lambda env: {}
    error: type[BaseException] | None = None  # the API's exception type; None = warn and carry on
    needles: list[str] = field(default_factory=list)  # "{path}" is replaced by ctx["path"]
    api: Callable[[Env], Any] | None = None
    chat: Callable[[Env], list[str]] | None = None
    script: Callable[[Env], tuple[list[str], dict]] | None = None  # argv, model_configs[0] overrides
    inputs: list[Any] = field(default_factory=list)  # what the script/chat user types (after the command)
    check: Callable[[Env, str, Any], None] | None = None  # (env, surface, result or output) for non-errors
    xfail: dict[str, str] = field(default_factory=dict)  # surface -> reason


def needles_for(case: Case, env: Env) -> list[str]:
    return [n.replace("{path}", str(env.ctx.get("path", ""))) for n in case.needles]


# ---- checks for inputs that are handled (a warning, and things keep working)


def one_warning(env: Env, *needles: str) -> None:
    records = [r for r in env.caplog.records if r.levelno == logging.WARNING and r.name == "huggingface_model"
               and all(n.lower() in r.getMessage().lower() for n in needles)]
    assert len(records) == 1, [r.getMessage() for r in env.caplog.records]


def check_no_template(env: Env, surface: str, result: Any) -> None:
    one_warning(env, "no chat template", "ChatML")
    if surface == "api":
        assert result.tokenizer.chat_template == CHATML_TEMPLATE
        assert isinstance(result.generate([{"role": "user", "content": "hi"}]), str)
    else:
        assert f"{AGENT[surface]}: " in result


def check_no_pad(env: Env, surface: str, result: Any) -> None:
    assert any("no pad token" in r.getMessage() for r in env.caplog.records)
    if surface == "api":
        wrapper = result
        assert wrapper.tokenizer.pad_token is not None and wrapper.tokenizer.pad_token == wrapper.tokenizer.eos_token
        trained = wrapper.fine_tune(str(env.data), env.train_config())
        assert trained.steps == 2 and trained.train_loss > 0
        assert isinstance(wrapper.generate([{"role": "user", "content": "hi"}]), str)
    assert list((env.tmp / "runs").glob("*/adapter/adapter_config.json"))


def check_skipped(reason: str) -> Callable[[Env, str, Any], None]:
    def check(env: Env, surface: str, result: Any) -> None:
        if surface == "api":
            assert len(result) == 2 and result.skipped == {reason: 1}
            text = result.describe()
        else:
            text = result
        assert_mentions(text, ["2 usable rows", f"skipped 1 (1 {reason})"])

    return check


def check_truncation(env: Env, surface: str, result: Any) -> None:
    one_warning(env, "3 of 3 rows are longer than max_length=64", "truncated")
    if surface == "api":
        assert result.steps == 2


def check_downgrade(warning: list[str], resolved: dict) -> Callable[[Env, str, Any], None]:
    def check(env: Env, surface: str, result: Any) -> None:
        one_warning(env, *warning)
        (run_json,) = (env.tmp / "runs").glob("*/run.json")
        run = json.loads(run_json.read_text())
        assert run["status"] == "completed" and run["steps"] == 2
        for k, v in resolved.items():
            assert run["resolved_training_args"][k] == v
        assert run["resolved_training_args"]["use_cpu"] is True
        if surface == "api":
            import torch

            assert result.steps == 2 and env.ctx["wrapper"].hf_model.dtype == torch.float32

    return check


CONFIG_CASES = [
    # id, fine_tune_config, chat key=value, needles
    ("config-unknown-top-level-key", {"eval_fracton": 0.1}, "eval_fracton=0.1",
     ["eval_fracton", "did you mean 'eval_fraction'", "eval_data_path", "force_retrain", "probes"]),
    ("config-unknown-lora-key", {"lora_config": {"lora_alpah": 32}}, "lora.lora_alpah=32",
     ["lora_config.lora_alpah", "did you mean 'lora_alpha'"]),
    ("config-unknown-training-arg", {"training_args": {"lerning_rate": 1e-3}}, "lerning_rate=0.001",
     ["lerning_rate", "did you mean 'learning_rate'"]),
    ("config-lora-r-zero", {"lora_config": {"r": 0}}, "lora.r=0", ["lora_config.r = 0", "integer >= 1"]),
    ("config-negative-learning-rate", {"training_args": {"learning_rate": -1e-3}}, "learning_rate=-0.001",
     ["learning_rate = -0.001", "(0, 1)"]),
    ("config-max-steps-zero", {"training_args": {"max_steps": 0}}, "max_steps=0",
     ["max_steps = 0", ">= 1", "-1"]),
    ("config-batch-size-zero", {"training_args": {"per_device_train_batch_size": 0}},
     "per_device_train_batch_size=0", ["per_device_train_batch_size = 0", "integer >= 1"]),
    ("config-eval-fraction-0.9", {"eval_fraction": 0.9}, "eval_fraction=0.9", ["eval_fraction = 0.9", "[0, 0.5)"]),
    ("config-string-for-a-number", {"training_args": {"learning_rate": "fast"}}, "learning_rate=fast",
     ["learning_rate = 'fast'", "a number"]),
]


def config_case(case_id: str, config: dict, pair: str, needles: list[str]) -> Case:
    return Case(
        case_id, error=FineTuneConfigError, needles=needles,
        api=lambda env: env.ctx["wrapper"].fine_tune(str(env.data), config),
        chat=lambda env: [f"/finetune {env.data} {pair}"],
        # With a start-up fine-tune (field names are checked when fine-tuning starts, not at load).
        script=lambda env: (["--local-model-path", str(env.tiny), "--data", str(env.data)],
                            {"fine_tune_config": config}),
    )


CASES: list[Case] = [
    # ------------------------------------------------------------------ model
    Case("model-nonexistent-folder", missing_folder, ModelLoadError,
         ["not found", "{path}", "check"],
         api=lambda env: make_wrapper(env.ctx["path"]),
         chat=lambda env: [f"/load {env.ctx['path']}"],
         script=lambda env: (["--local-model-path", str(env.ctx["path"]), "--no-finetune"], {})),
    Case("model-path-given-as-model-id-does-not-exist", missing_folder, ModelLoadError,
         ["not found", "{path}"],
         api=lambda env: make_wrapper(env.ctx["path"], local_model_path=None, model_id=str(env.ctx["path"])),
         script=lambda env: (["--model", str(env.ctx["path"]), "--no-finetune"], {})),
    Case("model-folder-without-config-and-weights", folder_without_model, ModelLoadError,
         ["{path}", "missing config.json", "weights", "README.md", "save_pretrained"],
         api=lambda env: make_wrapper(env.ctx["path"]),
         chat=lambda env: [f"/load {env.ctx['path']}"],
         script=lambda env: (["--local-model-path", str(env.ctx["path"]), "--no-finetune"], {})),
    Case("model-hub-id-offline-not-cached", error=ModelLoadError,
         needles=["nobody-here/no-such-model-xyz", "not in the local hugging face cache", "offline",
                  "local_model_path"],
         api=lambda env: _timed("hub-id-offline", lambda: make_wrapper(
             "unused", local_model_path=None, model_id="nobody-here/no-such-model-xyz")),
         chat=lambda env: ["/load nobody-here/no-such-model-xyz"],
         script=lambda env: (["--model", "nobody-here/no-such-model-xyz", "--no-finetune"], {})),
    Case("model-needs-trust-remote-code", remote_code_model, ModelLoadError,
         ["custom code", "trust_remote_code", "is off", "\"trust_remote_code\": true", "model_configs"],
         api=lambda env: make_wrapper(env.ctx["path"]),
         chat=lambda env: [f"/load {env.ctx['path']}"],
         script=lambda env: (["--local-model-path", str(env.ctx["path"]), "--no-finetune"], {})),
    Case("model-tokenizer-without-chat-template", no_template_model, None,
         api=lambda env: make_wrapper(env.ctx["path"], do_sample=False, max_length=4),
         chat=lambda env: [f"/load {env.ctx['path']}"],
         script=lambda env: (["--local-model-path", str(env.ctx["path"]), "--no-finetune"], {"max_length": 4}),
         check=check_no_template),
    Case("model-tokenizer-without-pad-token", no_pad_model, None,
         api=lambda env: make_wrapper(env.ctx["path"], do_sample=False, max_length=4),
         chat=lambda env: [f"/load {env.ctx['path']}",
                           f"/finetune {env.data} max_steps=2 per_device_train_batch_size=2 save_strategy=no"],
         script=lambda env: (["--local-model-path", str(env.ctx["path"]), "--data", str(env.data), "--max-steps",
                              "2"], {"max_length": 4}),
         check=check_no_pad),
    Case("model-quantization-4bit-without-cuda", error=ModelLoadError,
         needles=["quantization='4bit'", "CUDA", "cpu", "Remove \"quantization\""],
         api=lambda env: make_wrapper(env.tiny, quantization="4bit"),
         script=lambda env: (["--local-model-path", str(env.tiny), "--no-finetune"], {"quantization": "4bit"})),
    # ------------------------------------------------------------------ data
    Case("data-missing-file", data_file("missing.jsonl", None), DatasetFormatError,
         ["not found", "{path}", "check the path"]),
    Case("data-unknown-extension", data_file("data.txt", jsonl(GOOD_ROW)), DatasetFormatError,
         ["unsupported", "'.txt'", "{path}", ".jsonl", ".csv", ".parquet"]),
    Case("data-empty-file", data_file("empty.jsonl", b""), DatasetFormatError,
         ["{path}", "is empty", "at least one conversation"]),
    Case("data-malformed-json", data_file("bad.json", b'[\n  {"messages": []},\n  {"messages": [}\n]\n'),
         DatasetFormatError, ["malformed json", "{path}", "line 3"]),
    Case("data-malformed-jsonl", data_file("bad.jsonl", jsonl(GOOD_ROW) + b'{"messages": [\n'),
         DatasetFormatError, ["malformed json", "{path}", "line 2", "one complete json object"]),
    Case("data-no-known-format", data_file("qa.jsonl", jsonl({"question": "q", "answer": "a"})),
         DatasetFormatError, ["columns found", "'answer'", "'question'", "accepted formats", "messages",
                              "conversations", "instruction", "prompt", "completion"]),
    Case("data-rows-with-empty-content", rows_file("empty-content.jsonl", {"messages": [
        {"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
         check=check_skipped("empty content")),
    Case("data-rows-with-non-string-content", rows_file("int-content.jsonl", {"messages": [
        {"role": "user", "content": {"text": "hi"}}, {"role": "assistant", "content": "x"}]}),
         check=check_skipped("non-string content")),
    Case("data-rows-with-wrong-role-names", rows_file("roles.jsonl", {"messages": [
        {"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
         check=check_skipped("unknown role")),
    Case("data-rows-without-assistant-turn", rows_file("no-answer.jsonl", {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}),
         check=check_skipped("no assistant turn")),
    Case("data-no-usable-rows", data_file("unusable.jsonl", jsonl(
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}]})), DatasetFormatError,
         ["no usable rows", "1 empty content", "1 unknown role", "1 no assistant turn", "non-empty assistant turn"]),
    Case("data-every-row-longer-than-max-length", long_rows, check=check_truncation,
         api=lambda env: env.ctx["wrapper"].fine_tune(str(env.ctx["path"]), env.train_config(max_length=64)),
         chat=lambda env: [f"/finetune {env.ctx['path']} max_steps=2 max_length=64 save_strategy=no "
                           "per_device_train_batch_size=2"],
         script=lambda env: (["--local-model-path", str(env.tiny), "--data", str(env.ctx["path"])],
                             {"fine_tune_config": env.train_config(max_length=64, output_dir="runs")})),
    # ------------------------------------------------------------------ config
    *[config_case(*row) for row in CONFIG_CASES],
    Case("config-string-for-an-unvalidated-number", error=FineTuneConfigError,
         needles=["warmup_steps", "'soon'"],
         api=lambda env: env.ctx["wrapper"].fine_tune(str(env.data), env.train_config(warmup_steps="soon")),
         chat=lambda env: [f"/finetune {env.data} warmup_steps=soon max_steps=2 save_strategy=no"],
         script=lambda env: (["--local-model-path", str(env.tiny), "--data", str(env.data)],
                             {"fine_tune_config": env.train_config(warmup_steps="soon", output_dir="runs")})),
    Case("config-fp16-on-cpu",
         api=lambda env: env.ctx["wrapper"].fine_tune(str(env.data), env.train_config(fp16=True)),
         chat=lambda env: [f"/finetune {env.data} fp16=true max_steps=2 save_strategy=no "
                           "per_device_train_batch_size=2"],
         script=lambda env: (["--local-model-path", str(env.tiny), "--data", str(env.data)],
                             {"fine_tune_config": env.train_config(fp16=True, output_dir="runs")}),
         check=check_downgrade(["fp16=True", "bf16" if cpu_has_bf16() else "float32"],
                               {"fp16": False, "bf16": cpu_has_bf16()})),
    Case("config-optim-paged-adamw-8bit-on-cpu",
         api=lambda env: env.ctx["wrapper"].fine_tune(str(env.data), env.train_config(optim="paged_adamw_8bit")),
         chat=lambda env: [f"/finetune {env.data} optim=paged_adamw_8bit max_steps=2 save_strategy=no "
                           "per_device_train_batch_size=2"],
         script=lambda env: (["--local-model-path", str(env.tiny), "--data", str(env.data)],
                             {"fine_tune_config": env.train_config(optim="paged_adamw_8bit", output_dir="runs")}),
         check=check_downgrade(["paged_adamw_8bit", "adamw_torch"], {"optim": "adamw_torch"})),
    # ------------------------------------------------------------------ chat input
    Case("chat-empty-lines-are-ignored", inputs=["", "   ", "\t", "hello", "", "exit"],
         check=lambda env, surface, result: _assert_replies(surface, result, 1)),
    Case("chat-input-beyond-the-context-window",
         inputs=["hello", "who are you?", "what is two plus two?", "word " * 700, "exit"],
         check=lambda env, surface, result: _check_long_input(env, surface, result)),
    Case("chat-non-utf8-bytes-on-stdin", check=lambda env, surface, result: None),  # a real subprocess: below
    Case("chat-exit-variants", inputs=["hello", " EXIT "],
         check=lambda env, surface, result: _assert_replies(surface, result, 1)),
    Case("chat-eof", inputs=["hello", EOFError],
         check=lambda env, surface, result: _assert_replies(surface, result, 1)),
    Case("chat-ctrl-c-at-the-prompt", inputs=["hello", KeyboardInterrupt],
         check=lambda env, surface, result: _assert_replies(surface, result, 1)),
]
# Data files go through the same three doors: fine_tune (load_chat_dataset for rows that are only skipped),
# /finetune (/dryrun), --data.
for _case in CASES:
    if _case.id.startswith("data-") and _case.api is None:
        if _case.error is not None:
            _case.api = lambda env: make_wrapper(env.tiny, max_length=4).fine_tune(str(env.ctx["path"]),
                                                                                   env.train_config())
            _case.chat = lambda env: [f"/finetune {env.ctx['path']} max_steps=2"]
            _case.script = lambda env: (["--local-model-path", str(env.tiny), "--data", str(env.ctx["path"])], {})
        else:
            _case.api = lambda env: load_chat_dataset(str(env.ctx["path"]))
            _case.chat = lambda env: [f"/dryrun {env.ctx['path']}"]
    if _case.id.startswith("chat-") and _case.inputs:
        _case.api = lambda env: None  # see test_api
        _case.chat = lambda env: []
        _case.script = lambda env: (["--local-model-path", str(env.tiny), "--no-finetune"], {"max_length": 4})
del _case


def _timed(name: str, fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        return fn()
    finally:
        TIMINGS[name] = time.perf_counter() - started


AGENT = {"chat": "Assistant", "script": "Ember"}  # the chat tests' own agent; the script ships Ember


def _assert_replies(surface: str, output: Any, n: int) -> None:
    if surface in ("chat", "script"):
        assert output.count(f"{AGENT[surface]}: ") == n, output


def _check_long_input(env: Env, surface: str, output: Any) -> None:
    warnings = [r.getMessage() for r in env.caplog.records if r.levelno == logging.WARNING]
    assert any("left out the" in w and "oldest" in w and "512 tokens" in w for w in warnings), warnings
    assert any("sees only its last" in w for w in warnings), warnings
    if surface in ("chat", "script"):
        assert output.count(f"{AGENT[surface]}: ") == 4


def surface_params(surface: str) -> list:
    params = []
    for case in CASES:
        if getattr(case, surface) is None:
            continue
        marks = [pytest.mark.xfail(reason=case.xfail[surface], strict=True)] if surface in case.xfail else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# =============================================================================================
# Fixtures


@pytest.fixture
def env(tmp_path, tiny_model_dir, caplog, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="huggingface_model")
    write_jsonl(tmp_path / "good.jsonl", identity_rows())
    return Env(tmp=tmp_path, tiny=tiny_model_dir, caplog=caplog)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No bad input may make a network connection (offline, a missing model must fail at once, no retries)."""
    attempts: list[Any] = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def chat_session(wrapper, lines: list[Any]):
    import io

    from rich.console import Console

    from chat.commands import ChatSession
    from finetune_dialogagent import Finetune_DialogAgent, UserAgent

    read = scripted_input(lines)
    console, out = io.StringIO(), io.StringIO()
    agent = Finetune_DialogAgent(name="Assistant", sys_prompt="You are Ember.", model=wrapper)
    session = ChatSession(agent, UserAgent(input_fn=read), console=Console(file=console, width=400), out=out,
                          base_config={"fine_tune_config": {"training_args": {"output_dir": "runs"}}})
    return session, console, out


@pytest.fixture
def run_script(monkeypatch, capsys):
    """`main(argv)` in this process, with typed input, extra model_configs settings, and its global logging
    changes undone afterwards."""

    import load_finetune_huggingface_model as script

    def run(argv: list[str], overrides: dict, inputs: list[Any]) -> tuple[int, str, str]:
        feed = iter(inputs)

        def fake_input(prompt: str = "") -> str:
            item = next(feed, EOFError)
            if isinstance(item, type) and issubclass(item, BaseException):
                raise item
            sys.stdout.write(prompt)
            return item

        monkeypatch.setattr(builtins, "input", fake_input)
        monkeypatch.setenv("COLUMNS", "400")  # rich would wrap long error lines at 80 columns
        for key, value in overrides.items():
            monkeypatch.setitem(script.model_configs[0], key, value)
        capsys.readouterr()
        if "--startup-finetune" not in argv:  # these cases check the start-up fine-tune's own checks, before the
            argv = [*argv, "--startup-finetune", "wait"]  # prompt (a background run's failures: test_background_finetune)
        with script_logging_restored():
            status = script.main(argv)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def non_utf8_run(tmp_path_factory, tiny_model_dir) -> subprocess.CompletedProcess:
    """The real script, real stdin (not a test double) carrying bytes that are not UTF-8."""
    cwd = tmp_path_factory.mktemp("non-utf8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONIOENCODING": "utf-8", "COLUMNS": "200"}
    env.pop("HF_TOKEN", None)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), "--local-model-path", str(tiny_model_dir), "--no-finetune"],
                            input=b"hi \xff\xfe there\nexit\n", capture_output=True, cwd=cwd, env=env, timeout=300)
    TIMINGS["non-utf8-subprocess"] = time.perf_counter() - started
    result.cwd = cwd  # type: ignore[attr-defined]
    return result


# =============================================================================================
# The three surfaces


@pytest.mark.parametrize("case", surface_params("api"))
def test_api(case: Case, env: Env):
    env.ctx.update(case.setup(env))
    if case.id.startswith(("config-", "data-every")):
        env.ctx["wrapper"] = make_wrapper(env.tiny, do_sample=False, max_length=4)
    before = snapshot(env.tmp)
    if case.id.startswith("chat-"):
        chat_api(case, env)
        return
    if case.error is not None:
        with pytest.raises(case.error) as info:
            case.api(env)
        assert_mentions(str(info.value), needles_for(case, env))
        assert snapshot(env.tmp) == before  # nothing written, nothing changed
        if "marker" in env.ctx:
            assert not env.ctx["marker"].exists()  # the custom code never ran
        if case.id == "model-hub-id-offline-not-cached":
            print(f"hub id offline failed after {TIMINGS['hub-id-offline'] * 1000:.1f} ms")
        return
    result = case.api(env)
    case.check(env, "api", result)
    if "runs" not in {p.split(os.sep)[0] for p in snapshot(env.tmp)}:
        assert snapshot(env.tmp) == before


def scripted_input(lines: list[Any]) -> Any:
    """An input() stand-in: returns the lines in turn, raises exception classes found among them, then EOFError."""
    feed = iter(lines)

    def read(prompt: str) -> str:
        item = next(feed, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read


def chat_api(case: Case, env: Env) -> None:
    """The chat-input rows in the Python API: UserAgent.read, and the wrapper's window handling."""
    from finetune_dialogagent import UserAgent

    def reader(lines: list[Any]) -> UserAgent:
        return UserAgent(input_fn=scripted_input(lines))

    if case.id == "chat-input-beyond-the-context-window":
        wrapper = make_wrapper(env.tiny, do_sample=False, max_length=4)
        history = [{"role": "system", "content": "You are Ember."}]
        for text in case.inputs[:3]:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": "Fine, thanks."}]
        lengths = []
        encode = wrapper.engine.encode

        def recording(messages, max_new_tokens, tools=None):
            enc = encode(messages, max_new_tokens, tools)
            lengths.append(enc["input_ids"].shape[1])
            return enc

        wrapper.engine.encode = recording
        reply = wrapper.generate([*history, {"role": "user", "content": case.inputs[3]}])
        assert isinstance(reply, str) and lengths and lengths[0] <= wrapper.context_size - 4
        case.check(env, "api", reply)
        return
    if case.id == "chat-exit-variants":
        for word in ("exit", "EXIT", " exit ", "\tExit  "):
            user = reader(["hello", word, "never read"])
            assert user.read() == "hello"
            assert user.read() is None  # `exit` in any case, with spaces around it, ends the chat
            assert reader([word])() is None
        return
    user = reader(case.inputs)
    assert user.read() == "hello"
    assert user.read() is None  # empty lines skipped; then exit / EOF / Ctrl-C end the chat cleanly


@pytest.mark.parametrize("case", surface_params("chat"))
def test_chat(case: Case, env: Env):
    env.ctx.update(case.setup(env))
    wrapper = make_wrapper(env.tiny, do_sample=False, max_length=4)
    served = wrapper.generate([{"role": "user", "content": "hello"}])
    lines = list(case.inputs) if case.id.startswith("chat-") else ["hi", *case.chat(env), "hello", "exit"]
    env.ctx["wrapper"] = wrapper
    before = snapshot(env.tmp)
    session, console, out = chat_session(wrapper, lines)
    assert session.run() == 0  # the chat went on to the end
    text = console.getvalue()
    assert "Traceback" not in text
    if case.error is not None:
        errors = error_lines(text)
        assert len(errors) == 1, text
        assert_mentions(text[text.index("error:"):], needles_for(case, env))
        assert out.getvalue().count("Assistant: ") == 2  # the message after the mistake got its reply ...
        assert [m["content"] for m in session.assistant.history() if m["role"] == "user"] == ["hi", "hello"]
        assert snapshot(env.tmp) == before  # ... and nothing was written or lost
        assert wrapper.source.path == str(env.tiny)  # still serving what it served
        assert wrapper.generate([{"role": "user", "content": "hello"}]) == served
        if "marker" in env.ctx:
            assert not env.ctx["marker"].exists()
        return
    assert error_lines(text) == [], text
    case.check(env, "chat", text if case.id.startswith("data-rows") else out.getvalue())


@pytest.mark.parametrize("case", surface_params("script"))
def test_script(case: Case, env: Env, run_script, request):
    env.ctx.update(case.setup(env))
    if case.id == "chat-non-utf8-bytes-on-stdin":
        result = request.getfixturevalue("non_utf8_run")
        out, err = result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")
        assert result.returncode == 0, err
        assert "Traceback" not in out + err and "UnicodeDecodeError" not in out + err
        assert "Ember:" in out and "Bye." in out
        assert list(result.cwd.iterdir()) == []  # nothing written
        return
    argv, overrides = case.script(env)
    before = snapshot(env.tmp)
    status, out, err = run_script(argv, overrides, list(case.inputs) or ["hello", "exit"])
    both = out + err
    assert "Traceback" not in both
    if case.error is not None:
        assert status == 2, both
        errors = error_lines(both)
        assert len(errors) == 1, both
        assert_mentions(both[both.index("error:"):], needles_for(case, env))
        assert snapshot(env.tmp) == before
        if "marker" in env.ctx:
            assert not env.ctx["marker"].exists()
        return
    assert status == 0, both
    assert error_lines(both) == [], both
    case.check(env, "script", out)


# =============================================================================================
# Findings that do not fit the table


def test_script_config_error_is_a_single_line(env, run_script):
    import load_finetune_huggingface_model  # noqa: F401

    status, out, err = run_script(["--local-model-path", str(env.tiny), "--no-finetune"],
                                  {"fine_tune_config": {"lora_config": {"r": 0}}}, ["exit"])
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("where, config, common", [
    ("lora_config", {"lora_config": {"lora_alpah": 32}}, ["r", "lora_alpha", "lora_dropout", "target_modules"]),
    ("training_args", {"training_args": {"lerning_rate": 1e-3}},
     ["learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size"]),
])
def test_unknown_nested_key_lists_valid_keys(where, config, common):
    with pytest.raises(FineTuneConfigError) as info:
        FineTuneConfig.from_dict(config)
    listed = str(info.value).split("valid:", 1)[-1]
    assert all(re.search(rf"\b{k}\b", listed) for k in common), str(info.value)


def test_rows_truncated_to_nothing_give_a_clear_error_before_anything_is_written(env):
    rows = [{"messages": [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "ok"}]}] * 3
    data = write_jsonl(env.tmp / "long-prompts.jsonl", rows)
    wrapper = make_wrapper(env.tiny, do_sample=False, max_length=4)
    with pytest.raises(FineTuneError) as info:
        wrapper.fine_tune(str(data), env.train_config(max_length=64))
    assert_mentions(str(info.value), ["max_length"])
    assert not (env.tmp / "runs").exists()


def test_script_log_lines_go_to_stderr(non_utf8_run):
    out, err = non_utf8_run.stdout.decode("utf-8", "replace"), non_utf8_run.stderr.decode("utf-8", "replace")
    assert "Loaded model" in err and "Loaded model" not in out


def test_report_timings():
    """Not a check: prints how long the offline hub-id failure and the non-UTF-8 subprocess took (-s to see)."""
    print({k: f"{v:.3f} s" for k, v in TIMINGS.items()})
