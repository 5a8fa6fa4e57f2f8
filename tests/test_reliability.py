"""Reliability mechanisms (issue 15), one test each: nothing of the user's is deleted or lost, loads are transactions,
one error boundary in the chat and in finetune.py, non-finite training stops, no terminal control characters reach
the screen, and `.env` is read from known places only.

The cases the issue lists (each bug and each unclear message) are in test_reliability_cases.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import FAST_ARGS, TAUGHT_QUESTION, identity_rows, make_wrapper, write_jsonl
from reliability_helpers import (  # noqa: F401 - finetune_cli is a fixture
    adapter_pointing_at,
    finetune_cli,
    model_variant,
    model_without_tokenizer,
    narrow_model,
)
from rich.console import Console
from test_chat_commands import make_chat

import hfmodel.common
from hfmodel import training
from hfmodel.common import (
    atomic_folder,
    create_exclusive,
    hf_token,
    json_safe,
    safe_text,
    write_json_atomic,
)
from hfmodel.guards import NonFiniteLoss, non_finite_loss_guard

ESC_DATA = "Who \x1b]0;PWNED TITLE\x1b\\are\x1b[2J you\x07?\x9b31m"  # retitle, clear screen, bell, C1 CSI


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def served(wrapper) -> tuple[object, object, dict, str | None, torch.Tensor]:
    """What serves replies: the model and tokenizer objects, the adapters, the active one, and the logits."""
    enc = wrapper.tokenizer.apply_chat_template([{"role": "user", "content": TAUGHT_QUESTION}],
                                                add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = wrapper.hf_model(input_ids=enc["input_ids"]).logits.clone()
    return wrapper.hf_model, wrapper.tokenizer, dict(wrapper.adapters), wrapper.active_adapter, logits


def assert_still_serving(wrapper, before) -> None:
    now = served(wrapper)
    assert now[0] is before[0] and now[1] is before[1], "the model or tokenizer was swapped"
    assert now[2] == before[2] and now[3] == before[3], "the adapters changed"
    assert torch.equal(now[4], before[4]), "the weights changed"


# ------------------------------------------------------------------------------------------ 1. never delete or lose


def test_a_temporary_folder_is_unique_and_never_touches_a_users_x_tmp(tmp_path):
    dest = tmp_path / "X"
    users = tmp_path / "X.tmp"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    hidden = tmp_path / ".X.tmp"
    hidden.write_text("also mine")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp not in (users, hidden) and not any(tmp.iterdir())
        (tmp / "half.bin").write_text("half")
        raise RuntimeError("failed half way")
    assert tree(tmp_path) == before  # ours is gone, theirs untouched
    with atomic_folder(dest) as tmp:
        (tmp / "whole.bin").write_text("whole")
    assert (dest / "whole.bin").read_text() == "whole"
    assert (users / "notes.txt").read_text() == "mine" and hidden.read_text() == "also mine"


def test_per_session_files_are_created_exclusively(tmp_path, monkeypatch):
    ids = iter([7, 7, 8])  # the second session draws the same id in the same second: it gets the next one
    monkeypatch.setattr(hfmodel.common.secrets, "randbelow", lambda n: next(ids))
    first = create_exclusive(tmp_path, "taught-20260101-120000-", ".jsonl")
    second = create_exclusive(tmp_path, "taught-20260101-120000-", ".jsonl")
    assert first.name == "taught-20260101-120000-000007.jsonl"
    assert second.name == "taught-20260101-120000-000008.jsonl"


def test_two_sessions_in_the_same_second_keep_their_own_taught_files(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = make_chat(make_wrapper(tiny_model_dir, do_sample=False), tmp_path)
    two = make_chat(make_wrapper(tiny_model_dir, do_sample=False), tmp_path)
    two.session.session_stamp = one.session.session_stamp  # started in the same second
    one.run(["Hello!", "/teach I am the first session."])
    two.run(["Hello!", "/teach I am the second session.", "/train replay=false max_steps=1"])
    one.run(["/teach I am still the first session.", "/train replay=false max_steps=1"])
    files = sorted(one.runs.glob(f"taught-{one.session.session_stamp}-*[0-9].jsonl"))
    assert len(files) == 2 and one.session.taught_path != two.session.taught_path
    answers = {path: [json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()]
               for path in files}
    assert answers[one.session.taught_path] == ["I am the first session.", "I am still the first session."]
    assert answers[two.session.taught_path] == ["I am the second session."]
    mixes = sorted(one.runs.glob("taught-*-train.jsonl"))
    assert len(mixes) == 2  # each /train wrote its own mix beside its own taught file


# ------------------------------------------------------------------------------------------ 2. loads are transactions


def test_a_half_failed_load_keeps_the_previous_model_tokenizer_and_adapters(taught_wrapper, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_tokenizer = model_without_tokenizer(tiny_model_dir, tmp_path / "no-tokenizer")
    small_vocab = model_variant(tiny_model_dir, tmp_path / "small-vocab", vocab_size=300)
    before, source, name = served(taught_wrapper), taught_wrapper.source, taught_wrapper.model
    assert before[3] == "ft1"
    c = make_chat(taught_wrapper, tmp_path).run([f"/load {no_tokenizer}", f"/load {small_vocab}", "Hello!"])
    no_tok, small, hello = c.steps
    assert len(no_tok.errors) == 1 and "no tokenizer files" in no_tok.console and str(no_tokenizer) in no_tok.console
    assert len(small.errors) == 1 and "tokens but the model has embeddings for only 300" in small.console
    assert_still_serving(taught_wrapper, before)
    assert hello.out.startswith("Assistant: ") and not hello.errors  # the previous model still answers
    # The API is the same transaction: the new base loads, its adapter does not fit it, everything is put back.
    narrow = narrow_model(tiny_model_dir, tmp_path / "narrow")
    broken = adapter_pointing_at(taught_wrapper.adapters["ft1"].path, tmp_path / "broken-adapter", str(narrow))
    with pytest.raises(hfmodel.common.ModelLoadError, match="does not fit the loaded base model"):
        taught_wrapper.load_model(None, str(broken))
    assert_still_serving(taught_wrapper, before)
    assert taught_wrapper.source is source and taught_wrapper.model == name


def test_an_adapter_load_that_fails_inside_peft_leaves_the_model_as_it_was(tiny_model_dir, taught_adapter, tmp_path,
                                                                           monkeypatch):
    import hfmodel.adapters

    wrapper = make_wrapper(narrow_model(tiny_model_dir, tmp_path / "narrow"), do_sample=False)
    modules = [type(m) for m in wrapper.hf_model.modules()]
    before = served(wrapper)
    monkeypatch.setattr(hfmodel.adapters, "shape_mismatches", lambda *a: [])  # peft itself meets the mismatch
    for _ in range(2):
        with pytest.raises(hfmodel.common.ModelLoadError) as e:
            wrapper.load_adapter(taught_adapter)
        message = str(e.value)
        assert "\n" not in message and "PeftModelForCausalLM:" not in message
        assert ": layer model.layers.0." in message and "the shape in current model is" in message
        assert message.endswith("more)")
    assert [type(m) for m in wrapper.hf_model.modules()] == modules  # no LoRA layer left injected
    assert not hasattr(wrapper.hf_model, "peft_config")
    assert_still_serving(wrapper, before)
    wrapper.fine_tune(str(write_jsonl(tmp_path / "d.jsonl", identity_rows())),
                      {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST_ARGS, "max_steps": 1}})
    assert wrapper.active_adapter == "ft1"  # and the model still takes adapters


# ------------------------------------------------------------------------------------------ 3. the error boundaries


def test_an_unexpected_error_in_generation_is_one_line_with_a_log_and_the_chat_goes_on(tiny_wrapper, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_stream = tiny_wrapper.engine.stream

    async def broken(*args, **kwargs):
        yield "Half a rep"
        raise RuntimeError("CUDA error: device-side assert\nsecond line")

    c = make_chat(tiny_wrapper, tmp_path)
    c.run(["Hello!", lambda: setattr(tiny_wrapper.engine, "stream", broken), "Hello again!",
           lambda: setattr(tiny_wrapper.engine, "stream", real_stream), "Still there?"])
    assert c.rc == 0
    failed = c.step("Hello again!")
    assert failed.console.startswith("error:") and len(failed.errors) == 1, failed.console
    line = " ".join(failed.console.split())  # one message (rich wraps it at the console's width)
    assert "The reply failed: RuntimeError: CUDA error: device-side assert (traceback in " in line
    log = Path(re.search(r"traceback in (\S+errors\.log)\)", line).group(1))
    assert log == (c.runs / "errors.log").resolve()
    assert "Traceback (most recent call last)" in log.read_text() and "second line" in log.read_text()
    assert c.step("Still there?").out.startswith("Assistant: ")  # the chat went on, with the same model
    assert [m["content"] for m in c.agent.history() if m["role"] == "user"][0] == "Hello!"


def test_an_unexpected_error_in_training_is_one_line_with_a_log_and_the_previous_adapter_serves(
        taught_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows())
    before = served(taught_wrapper)

    def explode(*args, **kwargs):
        raise RuntimeError("NCCL watchdog timeout")

    monkeypatch.setattr(training, "_fit", explode)
    c = make_chat(taught_wrapper, tmp_path).run([f"/finetune {data} max_steps=2", "Hello!"])
    step = c.step(f"/finetune {data} max_steps=2")
    assert len(step.errors) == 1
    assert "Fine-tuning failed: RuntimeError: NCCL watchdog timeout (traceback in " in step.console
    assert "the previous weights and the conversation are kept" in " ".join(step.console.split())
    assert "NCCL watchdog timeout" in (c.runs / "errors.log").read_text()
    assert_still_serving(taught_wrapper, before)
    (run_json,) = c.runs.glob("*/run.json")
    assert json.loads(run_json.read_text())["status"] == "failed"


def test_finetune_py_names_an_unexpected_failure_in_one_line_with_the_log_exit_2(finetune_cli, monkeypatch):  # noqa: F811
    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire\nmore detail")

    monkeypatch.setattr(training, "_fit", explode)
    status, out, err = finetune_cli()
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: Fine-tuning failed: RuntimeError: disk on fire (traceback in ")
    log = Path(re.search(r"traceback in (\S+)\)", line).group(1))
    assert log.name == "errors.log" and "Traceback" in log.read_text() and "more detail" in log.read_text()


def test_finetune_py_reuses_an_identical_run_and_retrain_trains_again(finetune_cli, tmp_path):  # noqa: F811
    """The reuse message points to `--retrain`; finetune.py takes it (force_retrain=true) and trains anew."""
    status, out, err = finetune_cli()
    assert status == 0, err
    status, out, err = finetune_cli()
    assert status == 0 and "reused an identical earlier run" in out, out + err
    assert len(list((tmp_path / "runs").glob("*/run.json"))) == 1
    status, out, err = finetune_cli("--retrain")
    assert status == 0 and "reused" not in out, out + err
    assert len(list((tmp_path / "runs").glob("*/run.json"))) == 2


# ------------------------------------------------------------------------------------------ 4. non-finite training


def test_json_files_are_strict_json_even_with_nan(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"loss": math.nan, "history": [{"grad_norm": math.inf}, {"loss": 1.5}], "n": 3})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "history": [{"grad_norm": None}, {"loss": 1.5}], "n": 3}
    assert json_safe((1.0, -math.inf)) == [1.0, None]


def test_the_guard_raises_on_a_non_finite_loss_or_weight():
    from types import SimpleNamespace

    guard = non_finite_loss_guard()
    state = SimpleNamespace(global_step=3)
    guard.on_log(None, state, None, logs={"loss": 1.2, "grad_norm": 0.5})  # fine
    for logs in ({"loss": math.nan}, {"grad_norm": math.inf}, {"eval_loss": -math.inf}):
        with pytest.raises(NonFiniteLoss, match="stopped at step 3"):
            guard.on_log(None, state, None, logs=logs)
    model = torch.nn.Linear(2, 2)
    guard.on_step_end(None, state, None, model=model)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLoss, match="weight"):
        guard.on_step_end(None, state, None, model=model)
    model.weight.requires_grad_(False)  # only trainable weights are checked (the base may hold anything)
    guard.on_step_end(None, state, None, model=model)


def with_guard(monkeypatch) -> None:
    """Until hfmodel/training.py adds the guard to its callbacks, add it here (no-op once it does)."""
    import inspect

    from transformers import TrainerCallback

    if "non_finite_loss_guard" in inspect.getsource(training):
        return
    original = training.progress_callback

    def both(report, stop):
        first, guard = original(report, stop), non_finite_loss_guard()

        class Both(TrainerCallback):
            pass

        combined = Both()
        for event in [name for name in dir(TrainerCallback) if name.startswith("on_")]:
            def call(*args, _event=event, **kwargs):
                a = getattr(first, _event)(*args, **kwargs)
                b = getattr(guard, _event)(*args, **kwargs)
                return b if b is not None else a
            setattr(combined, event, call)
        return combined

    monkeypatch.setattr(training, "progress_callback", both)


def test_non_finite_losses_stop_the_run_which_is_failed_never_active_and_never_reused(taught_wrapper, tmp_path,
                                                                                     monkeypatch):
    with_guard(monkeypatch)
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows())
    embeddings = taught_wrapper.handle.base_model().get_input_embeddings()
    # Training steps (with gradients) see NaN activations; evaluation and chat do not.
    hook = embeddings.register_forward_hook(lambda m, i, out: out * math.nan if torch.is_grad_enabled() else out)
    before = served(taught_wrapper)
    config = {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST_ARGS, "max_steps": 4}}
    try:
        for _ in range(2):  # the same settings again: trained again (and stopped again), never reused
            with pytest.raises(NonFiniteLoss, match="stopped at step 1"):
                taught_wrapper.fine_tune(str(data), config)
    finally:
        hook.remove()
    assert_still_serving(taught_wrapper, before)
    runs = sorted((tmp_path / "runs").glob("*/run.json"))
    assert len(runs) == 2
    for run in runs:
        record = json.loads(run.read_text())  # strict JSON: no NaN anywhere
        assert record["status"] == "failed" and "not a finite number" in record["error"]
        assert not (run.parent / "adapter").exists()


# ------------------------------------------------------------------------------------------ 5. control characters


def test_safe_text_strips_every_control_sequence_but_keeps_text_newlines_and_tabs():
    assert safe_text(ESC_DATA) == "Who are you?"
    assert safe_text("line 1\n\tline 2 é 你好") == "line 1\n\tline 2 é 你好"
    assert safe_text("a\x1b[1;31mred\x1b[0m\r\x00\x7f\x85b") == "aredb"
    assert safe_text("\x1b]8;;https://evil.example\x07click\x1b]8;;\x07") == "click"


def test_control_characters_in_data_and_model_output_never_reach_the_terminal(taught_wrapper, tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": ESC_DATA},
                          {"role": "assistant", "content": "I am \x1b[2JEmber\x1b]0;TITLE\x07."}]}] * 4
    data = write_jsonl(tmp_path / "hostile.jsonl", rows)

    async def hostile_model(*args, **kwargs):
        from hfmodel.generation import Generated

        for piece in ("Hi \x1b]0;OWNED", "\x07 there\x1b[2J", "\x9b2J!\n"):
            yield piece
        yield Generated("", 1, 3)

    console = Console(file=io.StringIO(), width=200, force_terminal=True)  # a real terminal would get styles
    c = make_chat(taught_wrapper, tmp_path, console=console, probes=[ESC_DATA])
    real_stream = taught_wrapper.engine.stream
    c.run([f"/dryrun {data}", f"/finetune {data} max_steps=1", ESC_DATA,
           lambda: setattr(taught_wrapper.engine, "stream", hostile_model), "Say hi.",
           lambda: setattr(taught_wrapper.engine, "stream", real_stream), "/history", f'/load "{ESC_DATA}"'])
    shown = c.console_text + c.out_text
    styles = re.compile(r"\x1b\[[0-9;?]*[mlhKA]")  # rich's own colours, cursor and progress-bar lines
    leftover = styles.sub("", shown)
    assert "\x1b" not in leftover and "\x07" not in leftover and "\x9b" not in leftover
    assert "PWNED" not in shown and "OWNED" not in shown and "TITLE" not in shown
    assert "Who are you?" in styles.sub("", c.step(f"/dryrun {data}").console)  # the text itself is still shown
    assert "Who are you?" in styles.sub("", c.step(f"/finetune {data} max_steps=1").console)  # probe table
    assert "Who are you?" in styles.sub("", c.step("/history").console)
    assert "Hi  there!" in c.step("Say hi.").out
    # The history keeps what was said; only what is shown is cleaned.
    assert c.agent.history()[0]["content"] == ESC_DATA
    error = styles.sub("", c.step(f'/load "{ESC_DATA}"').console)  # an error line quoting the data
    assert error.startswith("error:") and "'Who are you?' is neither a folder" in error


# ------------------------------------------------------------------------------------------ 6. .env


def test_a_parent_folders_env_is_never_read_and_only_tokens_are_taken(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGINGFACE_TOKEN", "OTHER_SECRET"):
        monkeypatch.setenv(name, "placeholder")  # restored (unset) afterwards
        monkeypatch.delenv(name)
    monkeypatch.setattr(hfmodel.common, "PROJECT_DIR", tmp_path / "project")  # no project .env either
    parent, child = tmp_path / "parent", tmp_path / "parent" / "child"
    child.mkdir(parents=True)
    (parent / ".env").write_text("HF_TOKEN=hf_parentTOKEN\nHF_HUB_OFFLINE=0\nOTHER_SECRET=s3cret\n")
    monkeypatch.chdir(child)
    assert hf_token() is None
    assert "OTHER_SECRET" not in os.environ
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # The current folder's .env is read, and only its token variables are taken.
    (child / ".env").write_text("HF_TOKEN=hf_childTOKEN\nOTHER_SECRET=s3cret\nHF_HUB_OFFLINE=0\n")
    assert hf_token() == "hf_childTOKEN"
    assert "OTHER_SECRET" not in os.environ
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # The project's own .env (next to the scripts) is read from any folder.
    (child / ".env").unlink()
    monkeypatch.delenv("HF_TOKEN")
    project = tmp_path / "project"
    project.mkdir()
    (project / ".env").write_text("HUGGINGFACE_TOKEN=hf_projectTOKEN\n")
    assert hf_token() == "hf_projectTOKEN"
