"""Fine-tuning with SFT + LoRA: the loss falls, only the adapter trains, runs are recorded, adapters do not stack."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    SYSTEM_PROMPT,
    TAUGHT_ANSWER,
    arithmetic_rows,
    chat,
    fast_config,
    identity_rows,
    make_wrapper,
    write_jsonl,
)

from hfmodel.data import DatasetFormatError
from huggingface_model import FineTuneError, FineTuneInterrupted

FAKE_TOKEN = "hf_testTOKENthatMustNeverBeWritten0123456789"
OTHER_ANSWER = "I am Paris, the quick brown fox."


def probe_ids(wrapper) -> torch.Tensor:
    enc = wrapper.tokenizer.apply_chat_template(chat(), add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")
    return enc["input_ids"]


def logits(wrapper) -> torch.Tensor:
    with torch.no_grad():
        return wrapper.hf_model(input_ids=probe_ids(wrapper)).logits.clone()


def base_state(wrapper) -> dict[str, torch.Tensor]:
    """The base model's weights under their original names (peft's `.base_layer` and LoRA tensors left out)."""
    state = wrapper.handle.base_model().state_dict()
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in state.items() if "lora_" not in k}


def lora_state(wrapper, name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(wrapper.hf_model, adapter_name=name).items()}


def spy_new_adapters(wrapper, monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Record each training adapter's LoRA weights as they are just before training starts."""
    initial: dict[str, dict[str, torch.Tensor]] = {}
    original = wrapper.adapter_set.for_training

    def spy(lora_config):
        name, model = original(lora_config)
        initial[name] = lora_state(wrapper, name)
        return name, model

    monkeypatch.setattr(wrapper.adapter_set, "for_training", spy)
    return initial


def run_dirs(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


# ------------------------------------------------------------------------------------------ one full run


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """One fine-tune with an eval file and default checkpointing, observed from every side."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        train = write_jsonl(tmp / "train.jsonl", arithmetic_rows(12))
        eval_rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                   {"role": "assistant", "content": f"It is {2 * i}."}]} for i in (20, 30, 40)]
        eval_file = write_jsonl(tmp / "eval.jsonl", eval_rows)
        wrapper = make_wrapper(tiny_model_dir, do_sample=False)
        before_base = base_state(wrapper)
        before_logits = logits(wrapper)
        initial = spy_new_adapters(wrapper, mp)
        progress: list[dict] = []
        config = {"eval_data_path": str(eval_file),
                  "training_args": {"output_dir": str(tmp / "runs"), "max_steps": 8, "learning_rate": 1e-2,
                                    "per_device_train_batch_size": 4}}
        result = wrapper.fine_tune(str(train), config, progress=progress.append)
    return SimpleNamespace(wrapper=wrapper, result=result, tmp=tmp, before_base=before_base,
                           before_logits=before_logits, initial=initial, progress=progress)


def test_loss_goes_down(trained_run):
    r = trained_run.result
    losses = [e["loss"] for e in r.log_history if "loss" in e]
    assert len(losses) == r.steps == 8  # logging_steps=1
    assert losses[0] > losses[-1]
    assert r.eval_loss_before is not None and r.eval_loss_after is not None
    assert r.eval_loss_after < r.eval_loss_before
    assert r.train_loss is not None and r.train_loss > 0
    assert r.reused is False and r.adapter_name == "ft1"
    assert r.train_tokens > 0 and r.trainable_params > 0
    # The progress callback saw every step.
    assert {p["step"] for p in trained_run.progress if "step" in p} >= set(range(1, 9))


def test_only_the_lora_weights_change(trained_run):
    w = trained_run.wrapper
    after_base = base_state(w)
    assert set(after_base) == set(trained_run.before_base)
    changed = [k for k, v in trained_run.before_base.items() if not torch.equal(v, after_base[k])]
    assert changed == []
    before_lora, after_lora = trained_run.initial["ft1"], lora_state(w, "ft1")
    assert before_lora and set(before_lora) == set(after_lora)
    assert any("lora_A" in k for k in after_lora) and any("lora_B" in k for k in after_lora)
    unchanged = [k for k in before_lora if torch.equal(before_lora[k], after_lora[k])]
    assert unchanged == []
    # ... and together they change the model's outputs.
    assert not torch.allclose(logits(w), trained_run.before_logits)


def test_served_after_training_in_eval_mode_without_grads(trained_run):
    w = trained_run.wrapper
    from peft import PeftModel

    assert isinstance(w.hf_model, PeftModel)
    assert not w.hf_model.training
    assert not any(p.requires_grad for p in w.hf_model.parameters())
    assert w.active_adapter == "ft1" and w.hf_model.active_adapters == ["ft1"]


def test_run_directory_contents(trained_run):
    r, tmp = trained_run.result, trained_run.tmp
    assert r.run_dir.parent == tmp / "runs" and r.run_dir.name.endswith("-tiny-llama")
    assert r.adapter_dir == r.run_dir / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (r.adapter_dir / name).is_file(), name
    assert not (r.adapter_dir / "ft1").exists()  # not nested in an adapter-name subfolder
    # The tokenizer next to the adapter keeps the chat template the model chats with.
    saved_template = (r.adapter_dir / "chat_template.jinja").read_text()
    assert saved_template == trained_run.wrapper.tokenizer.chat_template
    log_history = json.loads((r.run_dir / "log_history.json").read_text())
    assert log_history == json.loads(json.dumps(r.log_history))
    run = json.loads((r.run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["steps"] == 8 and run["eval_loss_after"] == pytest.approx(r.eval_loss_after)
    assert run["system_prompt"] == SYSTEM_PROMPT
    assert run["config"]["training_args"]["max_steps"] == 8
    assert (r.run_dir / "checkpoints").is_dir()
    # Nothing went to the working directory besides what the test wrote.
    assert sorted(p.name for p in tmp.iterdir()) == ["eval.jsonl", "runs", "train.jsonl"]


def test_no_token_is_written(trained_run):
    leaks = [p for p in trained_run.result.run_dir.rglob("*")
             if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_saved_adapter_reloads_to_identical_outputs(trained_run):
    reloaded = make_wrapper(trained_run.result.adapter_dir, do_sample=False)
    assert torch.equal(logits(reloaded), logits(trained_run.wrapper))


@pytest.mark.parametrize("ratio", [None, 4])
def test_loraplus_trains_the_b_matrices_at_ratio_times_the_learning_rate(tiny_wrapper, tmp_path, monkeypatch, ratio):
    """Adam's first step moves every weight that has a gradient by its learning rate, and LoRA's B matrices start at
    zero: after one step the largest |B| is B's learning rate, the run's rate or, with LoRA+, `ratio` times it."""
    monkeypatch.chdir(tmp_path)
    lr = 1e-3
    config = fast_config(tmp_path, max_steps=1, learning_rate=lr)
    if ratio:
        config["lora_config"] = {"loraplus_lr_ratio": ratio}
    initial = spy_new_adapters(tiny_wrapper, monkeypatch)
    tiny_wrapper.fine_tune(str(write_jsonl(tmp_path / "a.jsonl", identity_rows())), config)
    before, after = initial["ft1"], lora_state(tiny_wrapper, "ft1")
    assert all(not before[k].any() for k in before if "lora_B" in k)
    moved = max((after[k] - before[k]).abs().max().item() for k in after if "lora_B" in k)
    assert moved == pytest.approx(lr * (ratio or 1), rel=0.01)


# ------------------------------------------------------------------------------------------ adapters


def test_second_finetune_is_a_new_adapter_not_a_stack(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = tiny_wrapper
    w.parameters.do_sample = False
    base_logits = logits(w)
    initial = spy_new_adapters(w, monkeypatch)
    first = w.fine_tune(str(write_jsonl(tmp_path / "a.jsonl", identity_rows())), fast_config(tmp_path))
    assert first.adapter_name == "ft1"
    assert w.generate(chat()) == TAUGHT_ANSWER  # stops at <|im_end|>: exactly the taught answer
    ft1_logits, ft1_weights = logits(w), lora_state(w, "ft1")

    second = w.fine_tune(str(write_jsonl(tmp_path / "b.jsonl", identity_rows(answer=OTHER_ANSWER))),
                         fast_config(tmp_path))
    assert second.adapter_name == "ft2" and second.run_dir != first.run_dir
    assert w.generate(chat()) == OTHER_ANSWER
    # Not stacked: exactly one adapter is active, and ft1 is kept untouched beside it.
    assert w.active_adapter == "ft2" and w.hf_model.active_adapters == ["ft2"]
    assert set(w.hf_model.peft_config) == {"ft1", "ft2"} and list(w.adapters) == ["ft1", "ft2"]
    assert w.adapters["ft2"].parent == "ft1"
    assert json.loads((second.run_dir / "run.json").read_text())["parent_adapter"] == "ft1"
    assert all(torch.equal(v, lora_state(w, "ft1")[k]) for k, v in ft1_weights.items())
    # ft2 started from ft1's weights (training continues rather than restarting).
    assert set(initial["ft2"]) == set(ft1_weights)
    assert all(torch.equal(initial["ft2"][k], v) for k, v in ft1_weights.items())

    w.use_adapter("ft1")
    assert w.hf_model.active_adapters == ["ft1"]
    assert torch.equal(logits(w), ft1_logits)
    assert w.generate(chat()) == TAUGHT_ANSWER
    w.use_adapter("base")
    assert torch.equal(logits(w), base_logits)
    with pytest.raises(FineTuneError):
        w.export_merged(tmp_path / "merged")  # nothing to merge with the base active
    assert w.undo() == "ft1"
    assert w.active_adapter == "ft1" and torch.equal(logits(w), ft1_logits)


def test_adapter_disabled_serves_base_temporarily(taught_wrapper):
    w = taught_wrapper
    tuned = logits(w)
    with w.adapter_disabled():
        assert w.active_adapter is None
        assert w.generate(chat()) != TAUGHT_ANSWER
    assert w.active_adapter == "ft1" and torch.equal(logits(w), tuned)


def test_failed_finetune_keeps_the_previous_adapter(taught_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = taught_wrapper
    tuned = logits(w)

    def explode(info):
        if info.get("step", 0) >= 2:
            raise RuntimeError("boom in progress")

    data = write_jsonl(tmp_path / "b.jsonl", identity_rows(answer=OTHER_ANSWER))
    with pytest.raises(RuntimeError, match="boom in progress"):
        w.fine_tune(str(data), fast_config(tmp_path), progress=explode)
    assert w.active_adapter == "ft1" and set(w.hf_model.peft_config) == {"ft1"}
    assert torch.equal(logits(w), tuned)
    (failed,) = run_dirs(tmp_path / "runs")
    run = json.loads((failed / "run.json").read_text())
    assert run["status"] == "failed" and "boom in progress" in run["error"]
    # The session goes on: the next fine-tune works.
    again = w.fine_tune(str(data), fast_config(tmp_path, max_steps=4))
    assert again.adapter_name == "ft2" and w.hf_model.active_adapters == ["ft2"]
    assert not torch.equal(logits(w), tuned)


def _interrupt_at(step: int):
    stop = threading.Event()

    def progress(info):
        if info.get("step", 0) >= step:
            stop.set()

    return stop, progress


def test_interrupt_keeps_previous_weights_and_resume_continues(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "a.jsonl", identity_rows())
    config = fast_config(tmp_path, max_steps=8, save_strategy="steps", save_steps=2)
    w = make_wrapper(tiny_model_dir, do_sample=False)
    base_logits = logits(w)
    stop, progress = _interrupt_at(3)
    with pytest.raises(FineTuneInterrupted, match="resume"):
        w.fine_tune(str(data), config, progress=progress, stop=stop)
    assert w.active_adapter is None and w.adapters == {}
    assert torch.equal(logits(w), base_logits)
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()

    # A new session resumes the interrupted run from its checkpoint, in the same run directory.
    resumed = make_wrapper(tiny_model_dir, do_sample=False).fine_tune(str(data), {**config, "resume": True})
    assert resumed.run_dir == run_dir and resumed.steps == 8
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert run_dirs(tmp_path / "runs") == [run_dir]


def test_finetune_again_after_an_interrupted_first_finetune(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = tiny_wrapper
    w.parameters.do_sample = False
    data = write_jsonl(tmp_path / "a.jsonl", identity_rows())
    stop, progress = _interrupt_at(3)
    with pytest.raises(FineTuneInterrupted):
        w.fine_tune(str(data), fast_config(tmp_path), progress=progress, stop=stop)
    result = w.fine_tune(str(data), fast_config(tmp_path))
    assert w.active_adapter == result.adapter_name
    assert w.hf_model.active_adapters == [result.adapter_name]
    assert w.generate(chat()) == TAUGHT_ANSWER


def test_whole_conversation_loss_also_trains(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "a.jsonl", identity_rows())
    r = tiny_wrapper.fine_tune(str(data), fast_config(tmp_path, assistant_only_loss=False, max_steps=4))
    losses = [e["loss"] for e in r.log_history if "loss" in e]
    assert losses[0] > losses[-1]
    assert json.loads((r.run_dir / "run.json").read_text())["resolved_training_args"]["assistant_only_loss"] is False


# ------------------------------------------------------------------------------------------ errors


def test_finetune_without_data(tiny_wrapper):
    with pytest.raises(FineTuneError, match="No data"):
        tiny_wrapper.fine_tune()


def test_finetune_with_missing_file_writes_nothing(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetFormatError, match="not found"):
        tiny_wrapper.fine_tune(str(tmp_path / "missing.jsonl"), fast_config(tmp_path))
    assert not (tmp_path / "runs").exists()
    assert tiny_wrapper.active_adapter is None


# ------------------------------------------------------------------------------------------ reuse


def test_data_path_at_init_trains_once_then_reuses(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    data = str(write_jsonl(tmp_path / "a.jsonl", identity_rows()))
    config = fast_config(tmp_path, max_steps=4)
    runs = tmp_path / "runs"

    first = make_wrapper(tiny_model_dir, data_path=data, fine_tune_config=config, do_sample=False)
    assert len(run_dirs(runs)) == 1
    assert first.last_result.reused is False and first.active_adapter == "ft1"
    assert first.last_result.steps == 4

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="huggingface_model"):
        second = make_wrapper(tiny_model_dir, data_path=data, fine_tune_config=config, do_sample=False)
    assert second.last_result.reused is True
    assert second.last_result.run_dir == first.last_result.run_dir
    assert len(run_dirs(runs)) == 1  # no new run
    assert "Reusing" in caplog.text
    assert second.active_adapter == "ft1"
    assert torch.equal(logits(second), logits(first))  # the very same adapter serves
    assert second.generate(chat()) == first.generate(chat())

    forced = make_wrapper(tiny_model_dir, data_path=data, fine_tune_config={**config, "force_retrain": True})
    assert forced.last_result.reused is False
    assert len(run_dirs(runs)) == 2

    other = str(write_jsonl(tmp_path / "b.jsonl", identity_rows(answer=OTHER_ANSWER)))
    changed = make_wrapper(tiny_model_dir, data_path=other, fine_tune_config=config)
    assert changed.last_result.reused is False  # different data: a different run
    assert len(run_dirs(runs)) == 3


# ------------------------------------------------------------------------------------------ export


def test_export_merged_loads_back_with_the_same_outputs(taught_wrapper, tmp_path):
    dest = taught_wrapper.export_merged(tmp_path / "merged")
    assert (dest / "config.json").is_file() and (dest / "tokenizer_config.json").is_file()
    assert not (dest / "adapter_config.json").exists()  # a plain model folder
    merged = make_wrapper(dest, do_sample=False)
    assert merged.active_adapter is None
    assert torch.allclose(logits(merged), logits(taught_wrapper), atol=1e-4)
    assert merged.generate(chat()) == TAUGHT_ANSWER
    assert taught_wrapper.active_adapter == "ft1"  # the live model is not merged in place
    with pytest.raises(FineTuneError, match="already exists"):
        taught_wrapper.export_merged(dest)


def test_refused_export_leaves_nothing_behind(taught_wrapper, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    with pytest.raises(FineTuneError, match="already exists"):
        taught_wrapper.export_merged(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_only_the_main_process_checks_the_runs_folder(tmp_path, monkeypatch):
    """The write check makes and removes the folder; a second rank doing it at the same moment found it gone and
    failed as if the folder were unwritable (seen once under torchrun). Other ranks leave it to rank 0."""
    import finetune

    calls = []
    monkeypatch.setattr(finetune, "check_writable_folder", lambda folder, what: calls.append(folder))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    finetune.check_output_dir(str(tmp_path / "runs"))
    assert calls == []
    monkeypatch.setenv("RANK", "0")
    finetune.check_output_dir(str(tmp_path / "runs"))
    assert calls == [str(tmp_path / "runs")]
    monkeypatch.undo()  # one process, the real check: an unwritable folder is still one clear error
    with pytest.raises(finetune.InputError, match="cannot write to /proc/x"):
        finetune.check_output_dir("/proc/x")


def test_printed_result_shows_the_run_not_the_rows():
    """`print(model.fine_tune(...))` (the Python API of docs/python-api.md) is a few lines, not the whole dataset."""
    from hfmodel.data import ChatDataset
    from hfmodel.training import FineTuneResult

    rows = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
            for i in range(500)]
    result = FineTuneResult(run_dir=Path("runs/x"), adapter_dir=Path("runs/x/adapter"), adapter_name="ft1",
                            reused=False, train_loss=0.5, eval_loss_before=1.6, eval_loss_after=0.3, seconds=60.0,
                            steps=18, train_tokens=40000, trainable_params=2442240,
                            data=ChatDataset(rows=rows, format="messages", source="train.jsonl"), eval_rows=rows[:50],
                            log_history=[{"loss": 1.0, "step": s} for s in range(18)])
    text = repr(result)
    assert "eval_loss_after=0.3" in text and "steps=18" in text and "runs/x" in text
    assert "question" not in text and "'loss'" not in text and len(text) < 600, text
    assert result.data is not None and len(result.data) == 500  # still there to use
