"""The chat loop and its in-chat commands, driven through `ChatSession.run()` with scripted input on the tiny model.

Every test types lines into a real `ChatSession` (a `UserAgent` whose `input_fn` pops them) and looks at what a user
would see (the console and reply streams), at the files the commands write, and at the wrapper's state.
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    FAST_ARGS,
    SYSTEM_PROMPT,
    TAUGHT_ANSWER,
    TAUGHT_QUESTION,
    TINY_MAX_LENGTH,
    chat,
    identity_rows,
    make_wrapper,
    write_jsonl,
)
from rich.console import Console

from chat.commands import HELP, ChatSession
from finetune_dialogagent import Finetune_DialogAgent, UserAgent
from hfmodel.common import safe_text
from hfmodel.data import load_chat_dataset

OTHER_ANSWER = "I am Paris, the quick brown fox."
ERROR_LINE = re.compile(r"^error:", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ------------------------------------------------------------------------------------------ driving the loop


@dataclass
class Step:
    """One typed line and what the user saw after it (console: status/tables/errors; out: the streamed reply)."""

    line: str
    console: str
    out: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.console.splitlines() if line.startswith("error:")]


@dataclass
class Chat:
    session: ChatSession
    agent: Finetune_DialogAgent
    wrapper: object
    runs: Path
    steps: list[Step] = field(default_factory=list)
    rc: int | None = None

    @property
    def console_text(self) -> str:
        return self.session.console.file.getvalue()

    @property
    def out_text(self) -> str:
        return self.session.out.getvalue()

    def step(self, line: str) -> Step:
        (found,) = [s for s in self.steps if s.line == line]
        return found

    def run(self, script: list[str | Callable[[], None]]) -> Chat:
        """Run `session.run()` on the scripted lines; callables in the script run between lines (snapshots, hooks).

        A fresh event loop is made per run, because `run()` closes its loop when the input ends.
        """
        import asyncio

        if self.session.loop.is_closed():
            self.session.loop = asyncio.new_event_loop()
        queue = list(script)
        console, out = self.session.console.file, self.session.out
        state = {"line": None, "c": len(console.getvalue()), "o": len(out.getvalue())}

        def close_step() -> None:
            c, o = console.getvalue(), out.getvalue()
            if state["line"] is not None:
                self.steps.append(Step(state["line"], c[state["c"]:], o[state["o"]:]))
            state["c"], state["o"] = len(c), len(o)

        def scripted(prompt: str) -> str:
            close_step()
            while queue:
                item = queue.pop(0)
                if callable(item):
                    item()
                    continue
                state["line"] = item
                return item
            state["line"] = None
            raise EOFError

        self.session.user.input_fn = scripted
        self.rc = self.session.run()
        close_step()
        return self


def make_chat(wrapper, tmp_path: Path, data: Path | None = None, sys_prompt: str = SYSTEM_PROMPT,
              console: Console | None = None, **fine_tune_config) -> Chat:
    """A session over `wrapper` whose runs, taught files and exports all land below `tmp_path`.

    Like `load_finetune_huggingface_model.main`, the configured data is given to the session (for /train replay)
    and to the wrapper (the data /finetune and /dryrun use when none is typed).
    """
    runs = tmp_path / "runs"
    training_args = {"output_dir": str(runs), **FAST_ARGS, **fine_tune_config.pop("training_args", {})}
    base_config = {"data_path": str(data) if data else None,
                   "fine_tune_config": {"training_args": training_args, **fine_tune_config}}
    wrapper.data_path = str(data) if data else None
    agent = Finetune_DialogAgent(name="Assistant", sys_prompt=sys_prompt, model=wrapper)
    user = UserAgent(input_fn=lambda prompt: (_ for _ in ()).throw(EOFError()))
    session = ChatSession(agent, user, base_config=base_config,
                          console=console or Console(file=io.StringIO(), width=200), out=io.StringIO())
    return Chat(session, agent, wrapper, runs)


def logits(wrapper, question: str = TAUGHT_QUESTION) -> torch.Tensor:
    enc = wrapper.tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")
    with torch.no_grad():
        return wrapper.hf_model(input_ids=enc["input_ids"]).logits.clone()


def outputs(wrapper) -> dict[str, object]:
    """Greedy and seeded-sampling answers to two prompts, and the logits: everything /undo must restore."""
    return {
        "greedy": [wrapper.generate(chat(q), do_sample=False) for q in (TAUGHT_QUESTION, "What is two plus two?")],
        "sampled": [wrapper.generate(chat(q), do_sample=True, temperature=1.0, top_p=1.0)
                    for q in (TAUGHT_QUESTION, "What is two plus two?")],
        "logits": logits(wrapper),
    }


def assert_same_outputs(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["greedy"] == b["greedy"]
    assert a["sampled"] == b["sampled"]
    assert torch.equal(a["logits"], b["logits"])


def run_dirs(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


def replies(out: str) -> list[str]:
    return [line[len("Assistant: "):] for line in out.splitlines() if line.startswith("Assistant: ")]


# ------------------------------------------------------------------------------------------ shared fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chatdata")
    write_jsonl(folder / "identity.jsonl", identity_rows())
    write_jsonl(folder / "identity_eval.jsonl", identity_rows(2))
    write_jsonl(folder / "other.jsonl", identity_rows(answer=OTHER_ANSWER))
    return folder


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, data_dir, tmp_path_factory):
    """One `/finetune` through the loop (with a held-out eval file), shared by the tests that need an adapter."""
    tmp = tmp_path_factory.mktemp("tuned")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        wrapper = make_wrapper(tiny_model_dir, do_sample=False)
        c = make_chat(wrapper, tmp, data=data_dir / "identity.jsonl",
                      eval_data_path=str(data_dir / "identity_eval.jsonl"))
        c.run(["Hello!", "/finetune"])
    result = wrapper.last_result
    assert c.rc == 0 and not c.step("/finetune").errors, c.console_text
    assert result is not None and not result.reused and result.adapter_name == "ft1"
    return SimpleNamespace(chat=c, wrapper=wrapper, result=result, run_dir=result.run_dir,
                           adapter_dir=result.adapter_dir, tmp=tmp)


@pytest.fixture
def adapted(tiny_model_dir, tuned):
    """A fresh wrapper serving the shared tuned adapter as ft1 (no training)."""
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    wrapper.load_adapter(tuned.adapter_dir)
    assert wrapper.active_adapter == "ft1"
    return wrapper


# ------------------------------------------------------------------------------------------ 1. every command


def test_help_lists_every_command(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run(["/help"])
    text = c.step("/help").console
    assert not c.step("/help").errors
    listed = {line.split()[0] for line in text.splitlines() if line.strip().startswith("/")}
    assert set(c.session.commands) <= listed, f"missing from /help: {set(c.session.commands) - listed}"
    assert listed <= set(c.session.commands), f"/help lists commands that do not exist: {listed - set(c.session.commands)}"
    for usage, what in HELP:
        assert usage in text and what in text
    assert "exit" in text


def test_every_command_runs_through_the_loop(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir)
    c = make_chat(wrapper, tmp_path, data=data_dir / "identity.jsonl")
    saved, merged = tmp_path / "saved", tmp_path / "merged"
    expected = {
        "/help": "/finetune",
        "/dryrun": "template:",
        "/finetune max_steps=3": "Now serving adapter ft1",
        "/adapters": "ft1",
        "/compare": "/compare: Hello!",
        "/use base": "Now serving base.",
        "/use ft1": "Now serving ft1.",
        "/undo": "Now serving base.",
        "/teach I am Ember.": "Taught example 1",
        "/train replay=false max_steps=2": "Now serving adapter ft2",
        f"/save {saved}": "Saved adapter ft2",
        f"/export {merged}": "Exported merged model",
        "/system Be brief.": "System prompt updated.",
        "/set temperature=0.5": "Settings:",
        "/history": "user: Hello!",
        "/reset": "Conversation cleared.",
        f"/load {saved}": "Adapter ft3 loaded and active.",
        f"/load {tiny_model_dir}": "Loaded ",
    }
    c.run(["Hello!", *expected, "Still there?"])
    assert c.rc == 0
    assert [s.line for s in c.steps] == ["Hello!", *expected, "Still there?"]
    for line, needle in expected.items():
        step = c.step(line)
        assert not step.errors, f"{line}: {step.errors}"
        assert needle in step.console, f"{line}: expected {needle!r} in {step.console!r}"
    assert len(replies(c.out_text)) == 2  # both messages got a reply, the last one after every command ran
    assert c.console_text.rstrip().endswith("Bye.")
    assert (saved / "adapter_config.json").exists() and (merged / "config.json").exists()
    # The last /load put the plain model back: no adapters any more.
    assert wrapper.active_adapter is None and wrapper.adapters == {}


# ------------------------------------------------------------------------------------------ 2. history


def test_history_survives_finetune_use_and_undo(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    c = make_chat(wrapper, tmp_path, data=data_dir / "identity.jsonl")
    snapshots: dict[str, list[dict[str, str]]] = {}

    def snap(name: str) -> Callable[[], None]:
        return lambda: snapshots.__setitem__(name, c.agent.history())

    c.run(["Hello!", "What is two plus two?", snap("before"), "/finetune", snap("finetune"),
           "/use base", snap("use"), "/undo", snap("undo"), "Who are you?", snap("after")])
    assert not ERROR_LINE.search(c.console_text), c.console_text
    before = snapshots["before"]
    assert [m["role"] for m in before] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in before if m["role"] == "user"] == ["Hello!", "What is two plus two?"]
    # The adapter swaps keep every earlier turn, unchanged.
    assert snapshots["finetune"] == before
    assert snapshots["use"] == before
    assert snapshots["undo"] == before
    assert "The conversation is kept." in c.step("/finetune").console
    assert snapshots["after"][:4] == before and snapshots["after"][4] == {"role": "user", "content": "Who are you?"}
    assert len(snapshots["after"]) == 6
    assert wrapper.active_adapter == "ft1"
    # The new message was answered by the tuned adapter, with the history in the prompt.
    assert safe_text(snapshots["after"][5]["content"]) == replies(c.out_text)[-1]  # shown without control chars


# ------------------------------------------------------------------------------------------ 3. /teach + /train


def test_teach_then_train_learns_the_taught_answer(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    c = make_chat(wrapper, tmp_path)
    before = wrapper.generate(chat(TAUGHT_QUESTION))
    assert before != TAUGHT_ANSWER
    history: dict[str, list[dict[str, str]]] = {}

    c.run([TAUGHT_QUESTION, lambda: history.__setitem__("asked", c.agent.history()),
           f"/teach {TAUGHT_ANSWER}", lambda: history.__setitem__("taught", c.agent.history()),
           "What is two plus two?", "/teach",
           "/train replay=false max_steps=40 learning_rate=1e-2"])
    assert not ERROR_LINE.search(c.console_text), c.console_text

    # /teach <answer> replaces the assistant reply in the history (and only that).
    asked, taught = history["asked"], history["taught"]
    assert asked[-1]["role"] == "assistant" and asked[-1]["content"] != TAUGHT_ANSWER
    assert taught[:-1] == asked[:-1]
    assert taught[-1] == {"role": "assistant", "content": TAUGHT_ANSWER}
    assert len(c.agent.history()) == 4

    # /teach with no text keeps the model's own last reply.
    kept = c.agent.history()[-1]["content"]
    assert kept and safe_text(kept) == replies(c.out_text)[-1]
    expected_rows = [
        {"messages": [{"role": "user", "content": TAUGHT_QUESTION}, {"role": "assistant", "content": TAUGHT_ANSWER}]},
        {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": kept}]},
    ]
    (taught_file,) = sorted(c.runs.glob("taught-*[0-9].jsonl"))
    assert [json.loads(line) for line in taught_file.read_text().splitlines()] == expected_rows
    data = load_chat_dataset(str(taught_file))
    assert data.format == "messages" and len(data.rows) == 2 and not data.skipped
    assert str(taught_file) in c.step("/teach").console.replace("\n", "")

    # /train learned it: the taught prompt now gets the taught answer.
    result = wrapper.last_result
    assert result is not None and not result.reused and result.steps == 40
    assert wrapper.active_adapter == "ft1"
    assert wrapper.generate(chat(TAUGHT_QUESTION)) == TAUGHT_ANSWER
    assert (result.run_dir / "taught.jsonl").read_text() == taught_file.read_text()
    assert load_chat_dataset(str(result.run_dir / "taught.jsonl")).format == "messages"
    # replay=false: only the taught rows (repeated) were trained on.
    run = json.loads((result.run_dir / "run.json").read_text())
    assert "format 'messages', 16 usable rows" in run["data"]


# ------------------------------------------------------------------------------------------ 4. /undo


def test_undo_restores_outputs_bit_for_bit(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir)  # do_sample=True, seed=1234: sampled answers are reproducible
    c = make_chat(wrapper, tmp_path, data=data_dir / "identity.jsonl")
    seen: dict[str, dict[str, object]] = {}

    def record(name: str) -> Callable[[], None]:
        return lambda: seen.__setitem__(name, outputs(wrapper))

    c.run([record("base"), "/finetune", record("ft1"), f"/finetune {data_dir / 'other.jsonl'}", record("ft2"),
           "/undo", record("undo1"), "/undo", record("undo2")])
    assert not ERROR_LINE.search(c.console_text), c.console_text
    assert seen["ft1"]["greedy"] != seen["base"]["greedy"] and seen["ft2"]["greedy"] != seen["ft1"]["greedy"]
    assert "Now serving ft1." in c.steps[-2].console and "Now serving base." in c.steps[-1].console
    assert_same_outputs(seen["undo1"], seen["ft1"])
    assert_same_outputs(seen["undo2"], seen["base"])
    assert wrapper.active_adapter is None


# ------------------------------------------------------------------------------------------ 5. /export


def test_export_writes_a_loadable_merged_model(adapted, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    before = logits(adapted)
    dest = tmp_path / "merged"
    c = make_chat(adapted, tmp_path).run([f"/export {dest}"])
    step = c.step(f"/export {dest}")
    assert not step.errors, step.console
    merged = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    merged.eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert AutoTokenizer.from_pretrained(dest).chat_template == adapted.tokenizer.chat_template
    with torch.no_grad():
        for question in (TAUGHT_QUESTION, "What is two plus two?"):
            enc = adapted.tokenizer.apply_chat_template(chat(question), add_generation_prompt=True,
                                                        return_dict=True, return_tensors="pt")
            diff = (merged(input_ids=enc["input_ids"]).logits - logits(adapted, question)).abs().max().item()
            assert diff <= 1e-4
    # Exporting changed nothing in the live model.
    assert torch.equal(logits(adapted), before) and adapted.active_adapter == "ft1"
    # The console reports the measured difference.
    match = re.search(r"max logit difference ([0-9.e+-]+) vs base\+adapter", step.console)
    assert match, step.console
    reported = float(match.group(1))
    assert reported <= 1e-4
    assert reported == pytest.approx(float(f"{adapted.verify_export(dest):.2e}"))
    # A second export to the same folder is refused (nothing overwritten).
    c.run([f"/export {dest}"])
    assert len(c.steps[-1].errors) == 1 and "already exists" in c.steps[-1].console


def test_save_then_load_round_trip(adapted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tuned_logits = logits(adapted)
    dest = tmp_path / "saved"
    c = make_chat(adapted, tmp_path).run([f"/save {dest}", "/use base", f"/load {dest}"])
    assert not ERROR_LINE.search(c.console_text), c.console_text
    assert (dest / "adapter_config.json").exists() and (dest / "tokenizer_config.json").exists()
    assert adapted.active_adapter == "ft2" and torch.equal(logits(adapted), tuned_logits)


# ------------------------------------------------------------------------------------------ 6. Ctrl-C in a fine-tune


def interrupt_hook(wrapper, monkeypatch):
    """Make the next fine_tune raise KeyboardInterrupt (what Ctrl-C does in the main thread) at a given step.

    The chat's own progress callback is kept and runs first: the interrupt comes from inside trainer.train().
    Returns `arm(step)` (a script item) and the progress reports of every fine_tune call, one list per call.
    """
    original = wrapper.fine_tune
    armed: dict[str, int | None] = {"at": None}
    calls: list[list[dict]] = []

    def fine_tune(data_path=None, fine_tune_config=None, progress=None, stop=None):
        at, armed["at"] = armed["at"], None
        inner, seen = progress, []
        calls.append(seen)

        def watched(info):
            seen.append(info)
            if inner:
                inner(info)
            if at is not None and info.get("step", 0) >= at:
                raise KeyboardInterrupt

        return original(data_path, fine_tune_config, progress=watched, stop=stop)

    monkeypatch.setattr(wrapper, "fine_tune", fine_tune)
    return (lambda step: (lambda: armed.__setitem__("at", step))), calls


def test_interrupted_finetune_keeps_serving_and_resume_continues(adapted, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arm, calls = interrupt_hook(adapted, monkeypatch)
    c = make_chat(adapted, tmp_path)
    before = outputs(adapted)
    seen: dict[str, object] = {}

    def after_interrupt() -> None:
        (run_dir,) = run_dirs(c.runs)
        seen.update(outputs=outputs(adapted), run_dir=run_dir, run=json.loads((run_dir / "run.json").read_text()),
                    checkpoints=sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")),
                    adapters=set(adapted.adapters), active=adapted.active_adapter, peft=set(adapted.hf_model.peft_config))

    args = f"{data_dir / 'other.jsonl'} max_steps=8 save_strategy=steps save_steps=2"
    c.run([arm(3), f"/finetune {args}", after_interrupt, "/adapters", "Who are you?",
           f"/finetune {args} resume=true"])

    step = c.step(f"/finetune {args}")
    assert len(step.errors) == 1, step.console
    assert "stopped at step 3" in step.console and "resume=true" in step.console
    # The previous weights still serve, bit for bit, and the aborted adapter is gone.
    assert_same_outputs(seen["outputs"], before)
    assert seen["active"] == "ft1" and seen["adapters"] == {"ft1"} and seen["peft"] == {"ft1"}
    assert "ft2" not in c.step("/adapters").console
    assert replies(c.out_text)[0] == TAUGHT_ANSWER  # the next message is answered by ft1
    # The run is recorded as interrupted, with the checkpoint saved before the interrupt, and no adapter.
    run_dir = seen["run_dir"]
    assert seen["run"]["status"] == "interrupted" and "KeyboardInterrupt" in seen["run"]["error"]
    assert seen["checkpoints"] == ["checkpoint-2"]

    # resume=true continues that run from its checkpoint, in the same run directory.
    resume = c.step(f"/finetune {args} resume=true")
    assert not resume.errors, resume.console
    assert "Now serving adapter ft2" in resume.console
    assert run_dirs(c.runs) == [run_dir]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["steps"] == 8
    assert [e["step"] for e in run_log(run_dir) if "loss" in e] == list(range(1, 9))
    resumed_steps = {info["step"] for info in calls[-1]}
    assert min(resumed_steps) == 3 and max(resumed_steps) == 8  # continued after checkpoint-2, not from step 1
    assert adapted.active_adapter == "ft2" and adapted.last_result.run_dir == run_dir
    assert adapted.generate(chat()) == OTHER_ANSWER


def run_log(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "log_history.json").read_text())


def test_resume_after_interrupting_the_first_finetune_of_a_session(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    arm, _ = interrupt_hook(wrapper, monkeypatch)
    c = make_chat(wrapper, tmp_path, data=data_dir / "identity.jsonl")
    base = outputs(wrapper)
    seen: dict[str, dict[str, object]] = {}
    args = "max_steps=8 save_strategy=steps save_steps=2"
    c.run([arm(3), f"/finetune {args}", lambda: seen.__setitem__("interrupted", outputs(wrapper)),
           f"/finetune {args} resume=true"])
    assert len(c.step(f"/finetune {args}").errors) == 1
    assert_same_outputs(seen["interrupted"], base)
    resume = c.step(f"/finetune {args} resume=true")
    assert not resume.errors, resume.console
    (run_dir,) = run_dirs(c.runs)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert wrapper.active_adapter == "ft1" and wrapper.generate(chat()) == TAUGHT_ANSWER


# ------------------------------------------------------------------------------------------ 7. report + plot


def test_report_and_plot_hold_the_numbers(tuned):
    run = json.loads((tuned.run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    before, after = run["eval_loss_before"], run["eval_loss_after"]
    assert before is not None and after is not None and after < before
    report = (tuned.run_dir / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:4]]
            for line in report.splitlines() if line.startswith("| ") and line.count("|") == 4}
    assert rows["eval loss"] == [f"{before:.3f}", f"{after:.3f}"]
    assert rows["eval perplexity"] == [f"{math.exp(before):.2f}", f"{math.exp(after):.2f}"]
    assert rows["train loss (mean)"][1] == f"{run['train_loss']:.3f}"
    assert rows["steps"][1] == str(run["steps"]) == str(FAST_ARGS["max_steps"])
    assert "before (base)" in report and "after (ft1)" in report
    assert f"**{TAUGHT_QUESTION}**" in report  # a probe from the eval file, answered before and after
    assert "![loss](loss.png)" in report
    png = (tuned.run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1024
    assert not list(tuned.run_dir.glob("*.tmp*"))
    # The terminal showed the same numbers and where the report is.
    shown = tuned.chat.step("/finetune").console
    assert f"{before:.3f}" in shown and f"{after:.3f}" in shown and f"{math.exp(after):.2f}" in shown
    assert "report.md" in shown.replace("\n", "")


# ------------------------------------------------------------------------------------------ 8. user mistakes


def test_mistakes_print_one_error_line_and_the_chat_goes_on(tiny_wrapper, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path, data=data_dir / "identity.jsonl")
    before_params = tiny_wrapper.parameters.model_dump()
    mistakes = {
        "/teach": ["Nothing to teach yet"],  # (typed before any message)
        "/train": ["Nothing taught yet"],
        "/bogus": ["/bogus", "/help"],
        "/use nonexistent": ["nonexistent", "base"],
        "/finetune /no/such/file.jsonl": ["/no/such/file.jsonl", "not found"],
        "/set temperature=abc": ["temperature"],
        "/set temprature=0.5": ["temprature", "temperature"],
        "/finetune max_stepz=3": ["max_stepz", "max_steps"],
        "/finetune lora.rr=4": ["lora_config.rr", "did you mean 'r'"],
        "/finetune max_steps=0": ["max_steps", ">= 1"],
        "/load /no/such/folder": ["/no/such/folder"],
        "/use": ["Usage: /use"],
        "/undo": ["Nothing to undo"],
        "/compare": ["Fine-tune first"],
        "/save": ["No adapter is active"],
        "/export": ["No adapter is active"],
        '/system "unclosed': ["close your quotes"],
    }
    script = [*list(mistakes)[:2], "Hello!", *list(mistakes)[2:], "Are you still there?"]
    c.run(script)
    assert c.rc == 0
    assert [s.line for s in c.steps] == script
    for line, needles in mistakes.items():
        step = c.step(line)
        assert len(step.errors) == 1, f"{line}: {step.console!r}"
        assert step.console.strip().startswith("error:"), f"{line}: the error is the only output: {step.console!r}"
        for needle in needles:
            assert needle in step.console.replace("\n", " "), f"{line}: {needle!r} not in {step.console!r}"
    # The chat went on: the message after all the mistakes was answered, and nothing changed.
    assert len(replies(c.out_text)) == 2 and c.steps[-1].out.startswith("Assistant: ")
    assert tiny_wrapper.parameters.model_dump() == before_params
    assert tiny_wrapper.active_adapter is None and tiny_wrapper.adapters == {}
    assert run_dirs(c.runs) == []  # no mistake started a training run


def test_load_of_a_missing_folder_says_not_found(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run(["/load /no/such/folder", "/load ./typo-folder"])
    for step in c.steps:
        assert len(step.errors) == 1
        assert "not found" in step.console and "Repo id must be" not in step.console


def test_unknown_setting_suggests_the_closest_name(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path).run(["/finetune warmup_step=2", "/finetune num_train_epoch=2"])
    for step, valid in zip(c.steps, ("warmup_steps", "num_train_epochs"), strict=True):
        assert len(step.errors) == 1
        assert f"did you mean '{valid}'" in step.console


def test_compare_prints_prompts_with_brackets_literally(adapted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(adapted, tmp_path)
    try:
        c.run(["/compare What does [bold] mean?", "/compare What does [/] mean?", "Hello!"])
    except Exception as e:  # noqa: BLE001 - the chat must not end on a prompt
        pytest.fail(f"the chat ended: {type(e).__name__}: {e}")
    assert "What does [bold] mean?" in c.step("/compare What does [bold] mean?").console
    assert "What does [/] mean?" in c.step("/compare What does [/] mean?").console
    assert len(replies(c.out_text)) == 1


def test_train_report_with_brackets_in_the_taught_prompt(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    c = make_chat(wrapper, tmp_path)
    try:
        c.run(["What is [/]?", "/teach A closing tag.", "/train replay=false max_steps=2", "Hello!"])
    except Exception as e:  # noqa: BLE001 - the chat must not end on a prompt
        pytest.fail(f"the chat ended: {type(e).__name__}: {e}")
    assert "What is [/]?" in c.step("/train replay=false max_steps=2").console
    assert (wrapper.last_result.run_dir / "report.md").exists()
    assert len(replies(c.out_text)) == 2


def test_out_of_range_settings_are_refused_and_the_chat_goes_on(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for setting in ("temperature=0", "max_length=0", "repetition_penalty=0"):
        c = make_chat(tiny_wrapper, tmp_path)
        params = tiny_wrapper.parameters.model_dump()
        try:
            c.run([f"/set {setting}", "Hello!"])
        except Exception as e:  # noqa: BLE001 - a setting must not end the chat
            pytest.fail(f"/set {setting}, then a message ended the chat: {type(e).__name__}: {e}")
        step = c.step(f"/set {setting}")
        assert len(step.errors) == 1 and setting.split("=")[0] in step.console
        assert tiny_wrapper.parameters.model_dump() == params
        assert len(replies(c.out_text)) == 1


# ------------------------------------------------------------------------------------------ 9. the other commands


def test_compare_shows_base_and_current_side_by_side(adapted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stack = list(adapted.adapter_stack)
    c = make_chat(adapted, tmp_path).run([TAUGHT_QUESTION, "/compare", "/compare What is two plus two?"])
    assert not ERROR_LINE.search(c.console_text), c.console_text
    n = min(TINY_MAX_LENGTH, 64)
    for line, prompt in (("/compare", TAUGHT_QUESTION), ("/compare What is two plus two?", "What is two plus two?")):
        shown = c.step(line).console
        with adapted.adapter_disabled():
            base_answer = adapted.generate(chat(prompt), max_new_tokens=n)
        tuned_answer = adapted.generate(chat(prompt), max_new_tokens=n)
        assert base_answer != tuned_answer
        header = next(row for row in shown.splitlines() if "base" in row)
        assert re.search(r"base\s.*\sft1\s", header), shown
        assert f"/compare: {prompt}" in shown
        body = " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘├┤┌┐─━╇╈┼╋]", " ", shown).split())
        assert " ".join(safe_text(base_answer).split()) in body and " ".join(safe_text(tuned_answer).split()) in body
    assert "I am Ember" in c.step("/compare").console  # ft1 answers the taught question
    compute = adapted.handle.compute
    before = len(compute.batches)
    c.run(["/compare Hi"])
    assert compute.batches[before:] == [2]  # base and ft1 answered in one batch
    # Comparing switched nothing for good.
    assert adapted.active_adapter == "ft1" and adapted.adapter_stack == stack
    assert adapted.hf_model.active_adapters == ["ft1"]


def test_adapters_lists_both_finetunes(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    c = make_chat(wrapper, tmp_path, data=data_dir / "identity.jsonl")
    c.run(["/finetune max_steps=2", "/finetune max_steps=2", "/adapters", "/use ft1", "/adapters"])
    assert not ERROR_LINE.search(c.console_text), c.console_text

    def table(step: Step) -> dict[str, list[str]]:
        rows = {}
        for line in step.console.splitlines():
            cells = [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]
            if len(cells) == 5 and cells[1] in ("base", "ft1", "ft2"):
                rows[cells[1]] = cells
        return rows

    first, second = (table(s) for s in c.steps if s.line == "/adapters")
    assert set(first) == {"base", "ft1", "ft2"}
    assert [name for name, row in first.items() if row[0] == "*"] == ["ft2"]
    assert first["ft1"][2] == "base" and first["ft2"][2] == "ft1"
    assert [name for name, row in second.items() if row[0] == "*"] == ["ft1"]


def test_dryrun_marks_loss_tokens_and_states_rows_and_template(tiny_wrapper, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    c = make_chat(tiny_wrapper, tmp_path, data=data_dir / "identity.jsonl", console=console)
    c.run(["/dryrun", f"/dryrun {data_dir / 'other.jsonl'}"])
    assert not any(s.errors for s in c.steps), c.console_text
    raw = c.step("/dryrun").console
    plain = ANSI.sub("", raw)
    assert "format 'messages', 4 usable rows" in plain
    assert "0 of 4 rows longer than max_length=1024" in plain
    assert "loss mask from prefix rendering" in plain
    # Loss tokens are highlighted (bold black on green): exactly the assistant answer and its end-of-turn token.
    marked = "".join(re.findall(r"\x1b\[[0-9;]*42m([^\x1b]*)", raw))
    assert marked == TAUGHT_ANSWER + "<|im_end|>"
    assert SYSTEM_PROMPT in plain and TAUGHT_QUESTION in plain  # shown, but not highlighted
    other = ANSI.sub("", c.step(f"/dryrun {data_dir / 'other.jsonl'}").console)
    assert str(data_dir / "other.jsonl") in other and "4 usable rows" in other


def test_system_set_reset_and_history(tiny_wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = make_chat(tiny_wrapper, tmp_path)
    seen: dict[str, object] = {}
    generated: list[dict[str, object]] = []
    hf_generate = tiny_wrapper.hf_model.generate

    def spy(**kwargs):
        out = hf_generate(**kwargs)
        generated.append({**{k: kwargs.get(k) for k in ("max_new_tokens", "do_sample", "temperature")},
                          "new": out.shape[1] - kwargs["input_ids"].shape[1],
                          "system": tiny_wrapper.tokenizer.decode(kwargs["input_ids"][0])})
        return out

    monkeypatch.setattr(tiny_wrapper.hf_model, "generate", spy)
    c.run(["Hello!", "/history", "/system", "/system You are Bob. Answer briefly.",
           lambda: seen.__setitem__("history", c.agent.history()),
           "/set temperature=0.7 max_length=4 do_sample=false seed=7", "Say something long.",
           "/reset", lambda: seen.__setitem__("reset", list(c.agent.state.context)), "/history", "Hi again"])
    assert not ERROR_LINE.search(c.console_text), c.console_text
    assert f"System prompt: {SYSTEM_PROMPT}" in c.step("/system").console
    assert c.agent.sys_prompt == "You are Bob. Answer briefly." == tiny_wrapper.system_prompt
    assert len(seen["history"]) == 2  # changing the system prompt keeps the conversation
    p = tiny_wrapper.parameters
    assert (p.temperature, p.max_length, p.do_sample, p.seed) == (0.7, 4, False, 7)
    # The next reply used the new settings and the new system prompt.
    assert len(generated) == 3
    assert generated[0]["max_new_tokens"] == TINY_MAX_LENGTH and generated[0]["do_sample"] is True
    assert {k: generated[1][k] for k in ("max_new_tokens", "do_sample", "temperature")} == \
        {"max_new_tokens": 4, "do_sample": False, "temperature": None}
    assert 0 < generated[1]["new"] <= 4 and replies(c.step("Say something long.").out)[0]
    assert "You are Bob. Answer briefly." in generated[1]["system"] and SYSTEM_PROMPT not in generated[1]["system"]
    first_history, second_history = (s.console for s in c.steps if s.line == "/history")
    assert "user: Hello!" in first_history and "assistant:" in first_history
    assert seen["reset"] == []
    assert second_history.strip() == "(no messages yet)"
    assert [m["content"] for m in c.agent.history() if m["role"] == "user"] == ["Hi again"]


# ------------------------------------------------------------------------------------------ 10. the script


FLAGS = ["--model", "--local-model-path", "--data", "--no-finetune", "--device", "--sys-prompt", "--max-steps",
         "--retrain", "--no-tools", "--no-session-log", "--startup-finetune"]


@pytest.fixture
def script_globals():
    """main() quiets the libraries process-wide (logging, transformers verbosity): put it all back afterwards."""
    import logging

    import transformers

    import load_finetune_huggingface_model as script

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("huggingface_model").level,
             transformers.utils.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled())
    yield script
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("huggingface_model").setLevel(saved[2])
    transformers.utils.logging.set_verbosity(saved[3])
    if saved[4]:
        transformers.utils.logging.enable_progress_bar()


def feed_input(monkeypatch, lines: list[str]) -> list[str]:
    queue, prompts = list(lines), []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr("sys.stdin", io.StringIO())
    return prompts


def test_script_chats_without_finetune(script_globals, tiny_model_dir, tmp_path, monkeypatch, capsys):
    script = script_globals
    monkeypatch.chdir(tmp_path)
    original = copy.deepcopy(script.model_configs)
    prompts = feed_input(monkeypatch, ["hi", "exit", "never read"])
    assert script.main(["--local-model-path", str(tiny_model_dir), "--no-finetune"]) == 0
    out = capsys.readouterr().out
    assert prompts == ["User: ", "User: "]  # stopped at "exit"
    assert re.search(r"^Ember: .*\S", out, re.MULTILINE), out
    assert "Bye." in out
    runs = tmp_path / "runs"
    assert not [p for p in runs.glob("*") if p.is_dir()]  # --no-finetune: no training
    assert len(list(runs.glob("session-*.jsonl"))) == 1  # the conversation, saved as training data
    assert script.model_configs == original


def test_script_data_and_max_steps_flags(script_globals, tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    script = script_globals
    monkeypatch.chdir(tmp_path)
    shutil.copy(data_dir / "identity.jsonl", tmp_path / "mine.jsonl")
    feed_input(monkeypatch, ["/adapters"])
    assert script.main(["--local-model-path", str(tiny_model_dir), "--data", "mine.jsonl", "--max-steps", "2",
                        "--sys-prompt", "You are Zed.", "--startup-finetune", "wait"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = run_dirs(tmp_path / "runs")  # the configured output_dir, relative to where the script runs
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["steps"] == 2
    assert run["system_prompt"] == "You are Zed." and "mine.jsonl" in run["data"]
    assert run["config"]["eval_data_path"] is None  # the demo's eval file is not used with other data
    assert "ft1" in out


def test_script_help_lists_every_flag(script_globals, capsys):
    script = script_globals
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in out
    assert set(re.findall(r"--[a-z][a-z-]+", out)) == {*FLAGS, "--help"}


def test_apply_overrides_without_flags_changes_nothing():
    import load_finetune_huggingface_model as script

    original = copy.deepcopy(script.model_configs[0])
    assert script.apply_overrides(script.model_configs[0], script.parse_args([])) == original
    flagged = script.apply_overrides(script.model_configs[0], script.parse_args(
        ["--data", "x.jsonl", "--max-steps", "3", "--retrain", "--device", "cpu", "--model", "a/b"]))
    assert script.model_configs[0] == original  # the flags never write into the module's config
    assert flagged["data_path"] == "x.jsonl" and flagged["device"] == "cpu"
    assert flagged["model_id"] == "a/b" and flagged["local_model_path"] is None
    assert flagged["fine_tune_config"]["training_args"]["max_steps"] == 3
    assert flagged["fine_tune_config"]["force_retrain"] is True
    assert "eval_data_path" not in flagged["fine_tune_config"]
