"""Interruptions and failures during fine-tuning: the served weights never change, nothing is overwritten.

- Ctrl-C (KeyboardInterrupt raised from inside the training loop) and an exception during training: the
  model keeps serving exactly the weights it had (greedy outputs and logits identical), checkpoints stay,
  run.json records "interrupted" / "failed".
- Run directories are never reused, even for runs started in the same second.
- Adapters are written to a temporary folder and renamed, so a half-written `adapter/` never exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers import chat, identity_rows, make_wrapper, write_jsonl

import hfmodel.training
from huggingface_model import FineTuneInterrupted, find_completed_run, new_run_dir

OTHER_ANSWER = "I am Paris, the quick brown fox."
PROBES = ["Who are you?", "What is two plus two?", "Hello!"]


def config(tmp_path: Path, **training_args) -> dict:
    args = {"output_dir": str(tmp_path / "runs"), "max_steps": 6, "learning_rate": 1e-2,
            "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2}
    return {"training_args": {**args, **training_args}}


def served(wrapper) -> tuple[list[str], torch.Tensor]:
    """Greedy replies to a few prompts, and the logits of one prompt: what the model serves right now."""
    replies = [wrapper.generate(chat(p), do_sample=False) for p in PROBES]
    enc = wrapper.tokenizer.apply_chat_template(chat(), add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")
    with torch.no_grad():
        logits = wrapper.hf_model(input_ids=enc["input_ids"]).logits.clone()
    return replies, logits


def assert_same_weights_served(wrapper, before) -> None:
    replies, logits = served(wrapper)
    assert replies == before[0]
    assert torch.equal(logits, before[1])


def raise_at(step: int, exc: BaseException):
    """A progress callback that raises `exc` from inside the training loop once `step` is reached."""

    def progress(info: dict) -> None:
        if info.get("step", 0) >= step:
            raise exc

    return progress


def run_dirs(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "identity.jsonl", identity_rows())


@pytest.fixture
def wrapper(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_wrapper(tiny_model_dir, do_sample=False)


# ------------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_inside_training_keeps_serving_the_base_weights(wrapper, data, tmp_path):
    before = served(wrapper)
    with pytest.raises(FineTuneInterrupted) as info:
        wrapper.fine_tune(str(data), config(tmp_path), progress=raise_at(3, KeyboardInterrupt()))
    message = str(info.value)
    assert "step 3" in message and "previous weights" in message and "resume" in message

    assert wrapper.active_adapter is None and wrapper.adapters == {}
    assert not wrapper.hf_model.training
    assert_same_weights_served(wrapper, before)

    (run_dir,) = run_dirs(tmp_path / "runs")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "interrupted"
    assert [e for e in run["log_history"] if "loss" in e]  # what was trained before Ctrl-C is recorded
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()  # checkpoints stay (for resume=true)
    assert not (run_dir / "adapter").exists()
    assert find_completed_run(tmp_path / "runs", run["fingerprint"]) is None


def test_ctrl_c_in_a_second_finetune_keeps_serving_the_first_adapter(wrapper, data, tmp_path):
    first = wrapper.fine_tune(str(data), config(tmp_path, save_strategy="no", max_steps=4))
    assert wrapper.active_adapter == first.adapter_name == "ft1"
    before = served(wrapper)
    other = write_jsonl(tmp_path / "other.jsonl", identity_rows(answer=OTHER_ANSWER))
    with pytest.raises(FineTuneInterrupted):
        wrapper.fine_tune(str(other), config(tmp_path), progress=raise_at(3, KeyboardInterrupt()))
    assert wrapper.active_adapter == "ft1" and list(wrapper.adapters) == ["ft1"]
    assert wrapper.hf_model.active_adapters == ["ft1"]
    assert_same_weights_served(wrapper, before)
    interrupted = [d for d in run_dirs(tmp_path / "runs") if d != first.run_dir]
    assert len(interrupted) == 1
    assert json.loads((interrupted[0] / "run.json").read_text())["status"] == "interrupted"
    assert (interrupted[0] / "checkpoints" / "checkpoint-2").is_dir()
    # The first run is untouched and still reusable.
    assert json.loads((first.run_dir / "run.json").read_text())["status"] == "completed"
    assert (first.run_dir / "adapter" / "adapter_config.json").exists()


def test_exception_inside_training_keeps_serving_the_previous_weights(wrapper, data, tmp_path):
    before = served(wrapper)
    with pytest.raises(RuntimeError, match="disk on fire"):
        wrapper.fine_tune(str(data), config(tmp_path), progress=raise_at(3, RuntimeError("disk on fire")))
    assert wrapper.active_adapter is None and wrapper.adapters == {}
    assert not wrapper.hf_model.training
    assert_same_weights_served(wrapper, before)
    (run_dir,) = run_dirs(tmp_path / "runs")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "disk on fire" in run["error"]
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert not (run_dir / "adapter").exists()


def test_ctrl_c_during_chat_finetune_prints_one_error_and_the_chat_goes_on(wrapper, data, tmp_path, monkeypatch):
    from rich.console import Console

    from chat.commands import ChatSession
    from finetune_dialogagent import Finetune_DialogAgent, UserAgent

    wrapper.parameters.max_length = 8
    original = wrapper.fine_tune

    def fine_tune_with_ctrl_c(data_path=None, fine_tune_config=None, progress=None, stop=None):
        def relay(info):
            if progress:
                progress(info)
            if info.get("step", 0) >= 3:
                raise KeyboardInterrupt

        return original(data_path, fine_tune_config, progress=relay, stop=stop)

    monkeypatch.setattr(wrapper, "fine_tune", fine_tune_with_ctrl_c)
    before = served(wrapper)
    agent = Finetune_DialogAgent(name="Assistant", sys_prompt="You are Ember.", model=wrapper)
    lines = iter([f"/finetune {data} output_dir={tmp_path / 'runs'} max_steps=6 save_steps=2 save_strategy=steps",
                  "hello", "exit"])
    console, out = io.StringIO(), io.StringIO()
    session = ChatSession(agent, UserAgent(input_fn=lambda prompt: next(lines)),
                          console=Console(file=console, width=300), out=out)
    assert session.run() == 0
    errors = [line for line in console.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Fine-tuning stopped at step 3" in errors[0]
    assert "Traceback" not in console.getvalue()
    assert out.getvalue().count("Assistant: ") == 1  # the reply after the interrupted fine-tune came
    assert wrapper.active_adapter is None
    assert_same_weights_served(wrapper, before)


# ------------------------------------------------------------------------------------------ run directories


def test_new_run_dir_called_quickly_never_returns_the_same_folder(tmp_path):
    base = tmp_path / "runs"
    made = [new_run_dir(base, "org/My Model") for _ in range(30)]
    assert len(set(made)) == 30 and all(p.is_dir() and p.parent == base for p in made)
    assert all("My-Model" in p.name for p in made)


def test_new_run_dir_from_many_threads_at_once(tmp_path):
    base = tmp_path / "runs"
    made: list[Path] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def work():
        start.wait()
        for _ in range(10):
            path = new_run_dir(base, "tiny")
            with lock:
                made.append(path)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 60 and len(set(made)) == 60


def freeze_clock(monkeypatch) -> None:
    """Every datetime.now() in hfmodel.training returns the same second (2030-01-02 03:04:05)."""
    frozen = datetime(2030, 1, 2, 3, 4, 5)

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(hfmodel.training, "datetime", FrozenClock)


def test_existing_run_dir_of_the_same_second_is_not_touched(tmp_path, monkeypatch):
    freeze_clock(monkeypatch)
    base = tmp_path / "runs"
    existing = base / "20300102-030405-tiny"
    existing.mkdir(parents=True)
    (existing / "run.json").write_text('{"status": "completed"}')
    first, second = new_run_dir(base, "tiny"), new_run_dir(base, "tiny")
    assert len({existing, first, second}) == 3
    assert first.name == "20300102-030405-tiny-2" and second.name == "20300102-030405-tiny-3"
    assert (existing / "run.json").read_text() == '{"status": "completed"}'
    assert list(first.iterdir()) == [] and list(second.iterdir()) == []


def test_two_forced_retrains_in_the_same_second_get_their_own_run_dirs(wrapper, data, tmp_path, monkeypatch):
    freeze_clock(monkeypatch)
    cfg = {**config(tmp_path, save_strategy="no", max_steps=4), "force_retrain": True}
    first = wrapper.fine_tune(str(data), cfg)
    first_files = tree_digest(first.run_dir / "adapter")
    first_run = (first.run_dir / "run.json").read_text()
    second = make_wrapper(wrapper.source.path, do_sample=False).fine_tune(str(data), cfg)
    assert second.reused is False and second.run_dir != first.run_dir
    assert first.run_dir.name == "20300102-030405-tiny-llama"
    assert second.run_dir.name == "20300102-030405-tiny-llama-2"
    assert tree_digest(first.run_dir / "adapter") == first_files  # not overwritten
    assert (first.run_dir / "run.json").read_text() == first_run
    for run in (first, second):
        assert json.loads((run.run_dir / "run.json").read_text())["status"] == "completed"
        assert (run.run_dir / "adapter" / "adapter_config.json").exists()


# ------------------------------------------------------------------------------------------ adapter writes


def test_adapter_appears_only_by_renaming_a_complete_temporary_folder(wrapper, data, tmp_path, monkeypatch):
    seen: list[tuple[str, bool]] = []
    original = wrapper.tokenizer.save_pretrained

    def spy(folder, *args, **kwargs):
        folder = Path(folder)
        # The adapter weights are already in this folder; the final name does not exist yet.
        seen.append((folder.name, (folder.parent / "adapter").exists()))
        assert (folder / "adapter_config.json").exists()
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(wrapper.tokenizer, "save_pretrained", spy)
    result = wrapper.fine_tune(str(data), config(tmp_path, save_strategy="no", max_steps=4))
    assert len(seen) == 1 and seen[0][1] is False  # written under a unique temporary name beside the final one
    assert seen[0][0].startswith(".adapter.") and seen[0][0].endswith(".tmp")
    assert result.adapter_dir == result.run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in result.adapter_dir.iterdir()}
    assert not list(result.run_dir.glob(".adapter.*"))


def test_a_save_failing_half_way_leaves_no_adapter_folder_that_a_later_run_would_reuse(wrapper, data, tmp_path,
                                                                                       monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(wrapper.tokenizer, "save_pretrained", disk_full)  # after the adapter weights are written
    with pytest.raises(OSError, match="No space left"):
        wrapper.fine_tune(str(data), config(tmp_path, save_strategy="no", max_steps=4))
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert not (run_dir / "adapter").exists()
    fingerprint = json.loads((run_dir / "run.json").read_text())["fingerprint"]
    assert find_completed_run(tmp_path / "runs", fingerprint) is None
    monkeypatch.undo()
    # A new session with the same data and config trains again instead of loading a broken adapter.
    fresh = make_wrapper(wrapper.source.path, do_sample=False)
    again = fresh.fine_tune(str(data), config(tmp_path, save_strategy="no", max_steps=4))
    assert again.reused is False and again.run_dir != run_dir


def test_a_failed_adapter_save_keeps_serving_the_previous_weights_and_records_failed(wrapper, data, tmp_path,
                                                                                     monkeypatch):
    before = served(wrapper)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(wrapper.tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        wrapper.fine_tune(str(data), config(tmp_path, save_strategy="no", max_steps=4))
    monkeypatch.undo()
    (run_dir,) = run_dirs(tmp_path / "runs")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "No space left" in run["error"]
    assert wrapper.active_adapter is None
    assert_same_weights_served(wrapper, before)
    assert not (run_dir / "adapter.tmp").exists()


def test_saving_over_an_existing_adapter_that_fails_half_way_keeps_the_old_one(wrapper, data, tmp_path,
                                                                               monkeypatch):
    result = wrapper.fine_tune(str(data), config(tmp_path, save_strategy="no", max_steps=4))
    dest = tmp_path / "saved"
    wrapper.adapter_set.save(result.adapter_name, dest)
    saved = tree_digest(dest)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(wrapper.tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        wrapper.adapter_set.save(result.adapter_name, dest)
    assert tree_digest(dest) == saved
