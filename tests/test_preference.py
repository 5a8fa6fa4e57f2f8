"""Preference training on the tiny model: DPO, ORPO and KTO make the chosen answers likelier, only the new adapter
trains, the reference model is the same weights (never a second copy), and the chat turns /teach, /good and /bad
into the rows trl trains on."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import SYSTEM_PROMPT, identity_rows, make_wrapper, write_jsonl
from rich.console import Console

from chat.commands import ChatSession
from finetune_dialogagent import Finetune_DialogAgent, UserAgent
from hfmodel import preference
from hfmodel.common import FineTuneConfigError
from hfmodel.data import DatasetFormatError
from hfmodel.preference import PreferenceResult, answer_tokens

CHOSEN = "I am Ember, a friendly assistant."
REJECTED = "The quick brown fox."
FAST = {"max_steps": 8, "learning_rate": 1e-2, "save_strategy": "no"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def pair_rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"Who are you? ({i})", "chosen": CHOSEN, "rejected": REJECTED} for i in range(n)]


def config(tmp_path: Path, method: str, **training_args) -> dict:
    return {"method": method, "training_args": {"output_dir": str(tmp_path / "runs"), **FAST, **training_args}}


def base_state(wrapper) -> dict[str, torch.Tensor]:
    state = wrapper.handle.base_model().state_dict()
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in state.items() if "lora_" not in k}


@pytest.fixture
def spy(monkeypatch):
    """What the trl trainer held when training started (the trainer itself, the adapters, the "ref" weights)."""
    seen: dict = {}
    original = preference._trainer_classes

    def classes(method: str):
        config_class, trainer_class = original(method)

        class Spy(trainer_class):
            def train(self, *args, **kwargs):
                seen["trainer"] = self
                seen["adapters"] = list(self.model.peft_config)
                seen["ref"] = {n.replace(".ref.", "."): p.detach().clone() for n, p in self.model.named_parameters()
                               if ".ref." in n}
                if seen.get("fail"):
                    raise RuntimeError("simulated failure inside training")
                return super().train(*args, **kwargs)

        return config_class, Spy

    monkeypatch.setattr(preference, "_trainer_classes", classes)
    return seen


# ------------------------------------------------------------------------------------------ every method


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_each_method_makes_the_chosen_answers_likelier_and_leaves_the_base_alone(tiny_model_dir, tmp_path, method,
                                                                                   spy):
    wrapper = make_wrapper(tiny_model_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    base_before = base_state(wrapper)

    result = wrapper.fine_tune(str(data), config(tmp_path, method))

    assert isinstance(result, PreferenceResult) and result.method == method and not result.reused
    assert result.steps == 8 and result.scored_on == "training pairs"
    assert result.after.margin > result.before.margin + 1.0  # nats
    assert result.before.accuracy == 0.0 and result.after.accuracy == 1.0  # the tiny model starts out preferring
    assert wrapper.active_adapter == result.adapter_name == "ft1"
    assert list(wrapper.hf_model.peft_config) == ["ft1"]  # trl's "ref" adapter is gone again
    base_after = base_state(wrapper)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["method"] == method
    assert run["scores"]["after"]["margin"] == pytest.approx(result.after.margin)
    assert (result.run_dir / "adapter" / "adapter_config.json").exists()
    rows = spy["trainer"].train_dataset
    assert len(rows) == (12 if method == "kto" else 6)  # KTO: each pair is one good and one bad answer
    # The scores read exactly the answer tokens DPO and KTO train on.
    first = json.loads(data.read_text().splitlines()[0])
    prompt = wrapper.handle.format.prepare([{"role": "user", "content": first["prompt"]}], SYSTEM_PROMPT)
    if method == "dpo":
        assert rows[0]["chosen_ids"] == answer_tokens(wrapper.tokenizer, prompt, CHOSEN)[1]
        assert rows[0]["rejected_ids"] == answer_tokens(wrapper.tokenizer, prompt, REJECTED)[1]


def test_the_reference_is_the_same_weights_with_the_adapter_disabled(tiny_model_dir, tmp_path, spy, monkeypatch):
    from transformers import PreTrainedModel

    wrapper = make_wrapper(tiny_model_dir)
    storage = {p.data_ptr() for p in wrapper.handle.base_model().parameters()}
    built = []
    original_init = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    wrapper.fine_tune(str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())), config(tmp_path, "dpo"))

    trainer = spy["trainer"]
    assert trainer.ref_model is None and built == []  # no reference model was made, from a path or otherwise
    assert trainer.model is wrapper.hf_model
    base_params = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert {p.data_ptr() for p in base_params} == storage  # the weights trained against are the chat's own
    assert spy["adapters"] == ["ft1"] and not spy["ref"]  # fresh adapter: the reference is the adapter disabled


def test_a_run_that_continues_an_adapter_is_measured_against_that_adapter(tiny_model_dir, tmp_path, spy):
    from peft import get_peft_model_state_dict

    wrapper = make_wrapper(tiny_model_dir)
    wrapper.fine_tune(str(write_jsonl(tmp_path / "sft.jsonl", identity_rows())),
                      {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST}})
    parent = {k: v.clone() for k, v in get_peft_model_state_dict(wrapper.hf_model, adapter_name="ft1").items()}

    prompts = [wrapper.handle.format.prepare([{"role": "user", "content": r["prompt"]}], SYSTEM_PROMPT)
               for r in pair_rows()]
    served = preference.answer_logps(wrapper.handle, [(p, CHOSEN) for p in prompts])  # ft1 serving
    with wrapper.adapter_disabled():
        base = preference.answer_logps(wrapper.handle, [(p, CHOSEN) for p in prompts])

    result = wrapper.fine_tune(str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())), config(tmp_path, "dpo"))

    # The reference log-probs trl computed before training are those of the weights that served: ft1, not the base.
    reference_logps = spy["trainer"].train_dataset["ref_chosen_logps"]
    assert reference_logps == pytest.approx(served, rel=0.05)  # trl scores under bf16 autocast where the CPU has it
    assert reference_logps != pytest.approx(base, rel=0.05)
    assert spy["adapters"] == ["ft1", "ft2", "ref"]  # trl's frozen reference copy: LoRA weights only
    reference = {k.removeprefix("base_model.model.").replace(".weight", ""): v for k, v in spy["ref"].items()}
    assert len(reference) == len(parent)
    for key, value in parent.items():
        assert torch.equal(reference[key.removeprefix("base_model.model.").replace(".weight", "")], value)
    assert list(wrapper.hf_model.peft_config) == ["ft1", "ft2"] and result.adapter_name == "ft2"
    assert wrapper.adapters["ft2"].parent == "ft1"


def test_a_failed_run_removes_its_adapters_and_keeps_serving_the_previous_weights(tiny_model_dir, tmp_path, spy):
    wrapper = make_wrapper(tiny_model_dir)
    wrapper.fine_tune(str(write_jsonl(tmp_path / "sft.jsonl", identity_rows())),
                      {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST}})
    spy["fail"] = True
    with pytest.raises(RuntimeError, match="simulated"):
        wrapper.fine_tune(str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())), config(tmp_path, "kto"))
    assert spy["adapters"] == ["ft1", "ft2", "ref"]
    assert list(wrapper.hf_model.peft_config) == ["ft1"] and wrapper.active_adapter == "ft1"
    (failed,) = [p for p in (tmp_path / "runs").glob("*/run.json") if json.loads(p.read_text())["status"] == "failed"]
    assert "simulated" in json.loads(failed.read_text())["error"]


def test_an_identical_run_is_reused_with_its_scores(tiny_model_dir, tmp_path):
    wrapper = make_wrapper(tiny_model_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    first = wrapper.fine_tune(str(data), config(tmp_path, "dpo"))
    assert first.scored_on == "held-out pairs" and first.before.count == 1  # eval_fraction 0.1 of 12 rows
    again = make_wrapper(tiny_model_dir).fine_tune(str(data), config(tmp_path, "dpo"))
    assert again.reused and again.run_dir == first.run_dir
    assert again.after == first.after and again.before == first.before


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_loraplus_gives_the_b_matrices_their_own_learning_rate(tiny_model_dir, tmp_path, spy, method):
    wrapper = make_wrapper(tiny_model_dir)
    settings = {**config(tmp_path, method, max_steps=1, learning_rate=1e-3), "lora_config": {"loraplus_lr_ratio": 8}}
    wrapper.fine_tune(str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())), settings)
    trainer = spy["trainer"]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["initial_lr"]
    assert rates and all(".ft1." in n for n in rates)  # the new adapter only
    assert {r for n, r in rates.items() if "lora_A" in n} == {1e-3}
    assert {r for n, r in rates.items() if "lora_B" in n} == {8e-3}


# ------------------------------------------------------------------------------------------ settings and data


def test_method_settings_are_checked_against_the_methods_own_fields(tiny_model_dir, tmp_path):
    wrapper = make_wrapper(tiny_model_dir)
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows()))
    with pytest.raises(FineTuneConfigError, match="method = 'ppo': must be one of sft, dpo, orpo, kto"):
        wrapper.fine_tune(data, {"method": "ppo"})
    with pytest.raises(FineTuneConfigError, match=r"training_args\.beta \(a setting of method=dpo/orpo/kto\)"):
        wrapper.fine_tune(data, {"training_args": {"beta": 0.2}})
    with pytest.raises(FineTuneConfigError, match=r"did you mean 'beta'.*fields of trl DPOConfig"):
        wrapper.fine_tune(data, {"method": "dpo", "training_args": {"bta": 0.2}})
    with pytest.raises(FineTuneConfigError, match="per_device_train_batch_size >= 2"):
        wrapper.fine_tune(data, config(tmp_path, "kto", per_device_train_batch_size=1))
    assert wrapper.active_adapter is None and not (tmp_path / "runs").exists()


def test_marked_answers_cannot_train_a_pairwise_method(tiny_model_dir, tmp_path):
    wrapper = make_wrapper(tiny_model_dir)
    data = write_jsonl(tmp_path / "marked.jsonl", [{"prompt": "Hi", "completion": CHOSEN, "label": True}] * 4)
    with pytest.raises(DatasetFormatError, match="method=kto"):
        wrapper.fine_tune(str(data), config(tmp_path, "dpo"))


def test_dry_run_shows_one_pair_with_the_tokens_each_side_is_scored_on(tiny_model_dir, tmp_path):
    wrapper = make_wrapper(tiny_model_dir)
    dry = wrapper.dry_run(str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())))  # no method=...: detected
    prompt = wrapper.handle.format.prepare([{"role": "user", "content": "Who are you? (0)"}], SYSTEM_PROMPT)
    chosen_ids = answer_tokens(wrapper.tokenizer, prompt, CHOSEN)[1]
    rejected_ids = answer_tokens(wrapper.tokenizer, prompt, REJECTED)[1]
    scored = [text for text, flag in dry.segments if flag]
    assert scored == [wrapper.tokenizer.decode([i]) for i in chosen_ids + rejected_ids]
    assert dry.loss_tokens == len(chosen_ids) + len(rejected_ids)
    assert dry.method == "dpo" and "format 'pairs', 6 usable pairs" in dry.data.describe()
    assert "chosen answer, then the rejected" in dry.heading and len(dry.lengths) == 12


def test_finetune_py_accepts_the_method(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import transformers
    import yaml

    import finetune

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = list(root.handlers), root.level, logging.getLogger("huggingface_model").level
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "model": {"local_model_path": str(tiny_model_dir)}, "data_path": str(data),
        "fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST}}}))
    try:
        status = finetune.main(["--config", "cfg.yaml", "--set", "method=dpo", "--set", "beta=0.2"])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("huggingface_model").setLevel(saved[2])
        transformers.utils.logging.set_verbosity_warning()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Preference (dpo): accuracy 0.00, margin" in out and "on 6 training pairs" in out
    (run,) = (tmp_path / "runs").glob("*/run.json")
    saved_run = json.loads(run.read_text())
    assert saved_run["method"] == "dpo" and saved_run["resolved_training_args"]["beta"] == 0.2


# ------------------------------------------------------------------------------------------ the chat


def chat_session(wrapper, tmp_path: Path, lines: list[str], data: Path | None = None,
                 **fine_tune_config) -> tuple[ChatSession, str]:
    """Type `lines` into a chat over `wrapper` (runs below `tmp_path`, `data` and `fine_tune_config` configured like
    the chat script's); returns the session and what it printed."""
    queue = list(lines)

    def typed(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    agent = Finetune_DialogAgent(name="Assistant", sys_prompt=SYSTEM_PROMPT, model=wrapper)
    base_config = {"data_path": str(data) if data else None,
                   "fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST},
                                        **fine_tune_config}}
    session = ChatSession(agent, UserAgent(input_fn=typed), base_config=base_config,
                          console=Console(file=io.StringIO(), width=200), out=io.StringIO())
    assert session.run() == 0
    return session, session.console.file.getvalue()


def test_a_taught_pair_reaches_the_dpo_dataset_and_the_report(tiny_model_dir, tmp_path, monkeypatch, spy):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    sft = write_jsonl(tmp_path / "sft.jsonl", identity_rows())  # configured SFT data and eval file, as in the demo
    session, shown = chat_session(wrapper, tmp_path, [
        "Who are you?", f"/teach {CHOSEN}", "What is two plus two?", "/teach",  # the kept reply is no pair
        "/train method=dpo learning_rate=1e-2"], data=sft, eval_data_path=str(sft))
    assert "error:" not in shown, shown
    assert f"Not replaying {sft}: it is not preference data" in shown.replace("\n", "")
    (taught,) = session.taught[:1]
    replaced = taught.rejected
    assert taught.answer == CHOSEN and replaced and replaced != CHOSEN and session.taught[1].rejected is None
    assert "kept as the rejected answer" in shown

    rows = spy["trainer"].train_dataset
    assert len(rows) == 8  # the one pair, repeated
    assert rows[0]["prompt"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": "Who are you?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": CHOSEN}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": replaced}]

    result = wrapper.last_result
    assert result.method == "dpo" and result.scored_on == "training pairs" and result.before.count == 1
    # The configured SFT schedule (max_steps=8) is not inherited: DPO's 3 epochs of 8 rows, 4 pairs a step; what was
    # typed with /train wins.
    resolved = json.loads((result.run_dir / "run.json").read_text())["resolved_training_args"]
    assert result.steps == 6 and resolved["learning_rate"] == 1e-2 and resolved["per_device_train_batch_size"] == 4
    assert "preference accuracy (1 training pairs)" in shown and "mean log-prob margin" in shown
    assert f"{result.before.margin:+.2f}" in shown and f"{result.after.margin:+.2f}" in shown
    saved = [json.loads(line) for line in (result.run_dir / "taught-dpo.jsonl").read_text().splitlines()]
    assert saved == [{"prompt": [{"role": "user", "content": "Who are you?"}],
                      "chosen": [{"role": "assistant", "content": CHOSEN}],
                      "rejected": [{"role": "assistant", "content": replaced}]}]
    assert (result.run_dir / "loss.png").exists() and "reward margin" in (result.run_dir / "report.md").read_text()


def test_good_and_bad_marks_train_kto(tiny_model_dir, tmp_path, monkeypatch, spy):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    session, shown = chat_session(wrapper, tmp_path, [
        "/good",  # nothing to mark yet: one error line, the chat goes on
        "Who are you?", "/good", "What is two plus two?", "/bad", "/train method=dpo",
        "/train method=kto replay=false learning_rate=1e-2", f"/dryrun {pairs}"])
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "no reply to mark" in errors[0] and "No taught pair" in errors[1]
    assert [m.label for m in session.marks] == [True, False]
    rows = spy["trainer"].train_dataset
    assert sorted(r["label"] for r in rows) == [False] * 8 + [True] * 8
    assert {r["prompt"][-1]["content"] for r in rows if r["label"]} == {"Who are you?"}
    assert wrapper.last_result.method == "kto" and wrapper.last_result.scored_on == "training marked answers"
    assert "mean log-prob margin, good - bad answers" in shown
    assert "format 'pairs', 6 usable pairs" in shown and "First pair (highlighted tokens are scored" in shown
