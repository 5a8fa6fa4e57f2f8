"""Security: the Hugging Face token never leaves the process, no remote code runs, chat input is never executed.

The token test plants a recognisable fake token in HF_TOKEN and in a `.env` file in the working folder,
runs a whole session (load, fine-tune with checkpoints, chat, /teach, /train, /save, /export, /dryrun,
failing loads, a hub load attempt) with every logger at DEBUG and all output captured, then scans every
captured output and every file written under the temporary folder (recursively, as bytes) for the token.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
from helpers import identity_rows, make_wrapper, write_jsonl

import hfmodel.loading
from huggingface_model import HuggingFaceWrapper, ModelLoadError, hf_token, redact

TOKEN = "hf_FAKEtoken1234567890SECRET"
DOTENV_TOKEN = "hf_FAKEdotenv0987654321SECRET"  # a second one, only in .env (HUGGINGFACE_TOKEN)
NEEDLES = [TOKEN, DOTENV_TOKEN, "FAKEtoken1234", "FAKEdotenv0987"]  # also catch cut-off copies
LIBRARY_LOGGERS = ["", "huggingface_model", "transformers", "peft", "trl", "datasets", "huggingface_hub", "as",
                   "accelerate", "urllib3", "httpx", "filelock"]


@pytest.fixture
def planted_token(tmp_path, monkeypatch) -> Path:
    """HF_TOKEN in the environment and a .env file in the working folder, both restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # setenv + delenv: load_dotenv() may set HUGGINGFACE_TOKEN; monkeypatch then removes it again.
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "placeholder")
    monkeypatch.delenv("HUGGINGFACE_TOKEN")
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"HF_TOKEN={TOKEN}\nHUGGINGFACE_TOKEN={DOTENV_TOKEN}\n")
    return dotenv


@pytest.fixture
def all_logs(caplog):
    """Every library logger at DEBUG into one buffer (transformers and agentscope do not propagate)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        yield buffer
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)


def scan_text(text: str) -> list[str]:
    return [n for n in NEEDLES if n in text]


def scan_tree(folder: Path, skip: set[Path]) -> tuple[list[str], int]:
    """Hits as 'path: needle' (names and bytes of every file, binary-safe), and how many files were read."""
    hits, count = [], 0
    for path in sorted(folder.rglob("*")):
        hits += [f"{path} (name): {n}" for n in NEEDLES if n in path.name]
        if not path.is_file() or path in skip:
            continue
        count += 1
        data = path.read_bytes()
        for needle in NEEDLES:
            for encoded in (needle.encode(), needle.encode("utf-16-le")):
                if encoded in data:
                    hits.append(f"{path}: {needle}")
    return hits, count


def make_session(wrapper, lines, tmp_path, console_file=None):
    from rich.console import Console

    from chat.commands import ChatSession
    from finetune_dialogagent import Finetune_DialogAgent, UserAgent

    agent = Finetune_DialogAgent(name="Assistant", sys_prompt="You are Ember.", model=wrapper)
    feed = iter(lines)
    user = UserAgent(input_fn=lambda prompt: next(feed))
    console = Console(file=console_file, width=300, highlight=False) if console_file is not None else None
    base = {"fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs")}}}
    return ChatSession(agent, user, base_config=base, console=console)


# ------------------------------------------------------------------------------------------ the token


def test_the_planted_token_is_really_read(planted_token):
    assert hf_token() == TOKEN
    assert redact(f"url?token={TOKEN}&x") == "url?token=***&x"
    os.environ.pop("HF_TOKEN")
    assert hf_token() == TOKEN  # read back from .env alone
    assert os.environ["HUGGINGFACE_TOKEN"] == DOTENV_TOKEN


def test_token_never_appears_in_output_logs_or_files(planted_token, all_logs, tiny_model_dir, tmp_path, capsys,
                                                     caplog, monkeypatch):
    assert hf_token() == TOKEN
    data = write_jsonl(tmp_path / "identity.jsonl", identity_rows())
    wrapper = make_wrapper(tiny_model_dir, max_length=8, do_sample=False)
    # The Python API with checkpoints (optimizer state, trainer state, pickled training args).
    wrapper.fine_tune(str(data), {"training_args": {"output_dir": str(tmp_path / "api-runs"), "max_steps": 4,
                                                    "save_strategy": "steps", "save_steps": 2,
                                                    "per_device_train_batch_size": 4}})
    lines = [
        "Who are you?",
        "Hello!",
        f"/finetune {data} max_steps=2 save_strategy=steps save_steps=1 force_retrain=true",
        "Who are you?",
        "/teach I am Ember, a friendly assistant.",
        "/train max_steps=2",
        f"/save {tmp_path / 'saved-adapter'}",
        f"/export {tmp_path / 'merged'}",
        "/adapters",
        "/history",
        f"/dryrun {data}",
        "/set temperature=0.5",
        f"/load {tmp_path / 'no-such-folder'}",
        "/load nobody-here/no-such-model-xyz",
        "/finetune missing.jsonl",
        "exit",
    ]
    session = make_session(wrapper, lines, tmp_path)
    assert session.run() == 0
    # A load that goes to the hub (so the token is handed to from_pretrained) and fails offline.
    monkeypatch.setattr(hfmodel.loading, "hub_reachable", lambda timeout=2.0: True)
    with pytest.raises(ModelLoadError) as info:
        wrapper.load_model("someone/private-model")
    monkeypatch.undo()
    captured = capsys.readouterr()

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    # The scan below covers every kind of file a session writes.
    assert {"run.json", "log_history.json", "report.md", "loss.png", "adapter_model.safetensors",
            "adapter_config.json", "model.safetensors", "training_args.bin", "optimizer.pt",
            "trainer_state.json", "tokenizer_config.json"} <= names
    assert any(n.startswith("taught-") for n in names)
    assert "error:" in captured.out and "Now serving adapter" in captured.out

    hits, files = scan_tree(tmp_path, skip={planted_token})
    assert files >= 30
    assert hits == []
    assert scan_text(captured.out) == [] and scan_text(captured.err) == []
    assert scan_text(all_logs.getvalue()) == []
    assert scan_text(caplog.text) == []
    assert scan_text(" ".join(repr(r.args) + r.getMessage() for r in caplog.records)) == []
    assert scan_text(str(info.value)) == [] and scan_text(repr(info.value.__cause__)) == []
    # Nothing was written into the shared tiny model folder either.
    assert scan_tree(tiny_model_dir, skip=set())[0] == []


def test_a_token_inside_an_error_message_is_redacted_everywhere(planted_token, tiny_model_dir, tmp_path, capsys,
                                                                monkeypatch):
    data = write_jsonl(tmp_path / "identity.jsonl", identity_rows())
    wrapper = make_wrapper(tiny_model_dir, max_length=8, do_sample=False)
    original = wrapper.fine_tune

    def failing_fine_tune(data_path=None, fine_tune_config=None, progress=None, stop=None):
        def relay(info):
            if info.get("step", 0) >= 1:
                raise ValueError(f"403 Forbidden: https://huggingface.co/api/x?token={TOKEN}")

        return original(data_path, fine_tune_config, progress=relay, stop=stop)

    monkeypatch.setattr(wrapper, "fine_tune", failing_fine_tune)
    session = make_session(wrapper, [f"/finetune {data} max_steps=2 save_strategy=no", "exit"], tmp_path)
    assert session.run() == 0
    out = capsys.readouterr().out
    (run_json,) = (tmp_path / "runs").glob("*/run.json")
    assert "403 Forbidden" in json.loads(run_json.read_text())["error"]
    assert scan_tree(tmp_path, skip={planted_token})[0] == []  # run.json is redacted ...
    assert "403 Forbidden" in out
    assert scan_text(out) == []  # ... and so must the chat's error line be


# ------------------------------------------------------------------------------------------ remote code


def test_trust_remote_code_is_off_by_default(tiny_model_dir, monkeypatch):
    import load_finetune_huggingface_model as script

    assert inspect.signature(HuggingFaceWrapper.__init__).parameters["trust_remote_code"].default is False
    assert all(entry.get("trust_remote_code", False) is False for entry in script.model_configs)
    assert "trust_remote_code" in script.model_configs[0]  # stated explicitly in the file users edit

    calls = []
    for cls in (hfmodel.loading.AutoModelForCausalLM, hfmodel.loading.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    wrapper = make_wrapper(tiny_model_dir)
    assert wrapper.trust_remote_code is False
    assert calls == [False, False]


def remote_code_folder(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config asks for custom code that would leave a marker file if it ever ran."""
    import shutil

    folder = tmp_path / "custom-code-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_arch", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "REMOTE_CODE_RAN"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_evil.py").write_text(payload)
    (folder / "modeling_evil.py").write_text(payload)
    return folder, marker


def test_custom_model_code_is_never_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, marker = remote_code_folder(tiny_model_dir, tmp_path)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        make_wrapper(folder)
    wrapper = make_wrapper(tiny_model_dir)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        wrapper.load_model(None, str(folder))
    assert wrapper.source.path == str(tiny_model_dir)  # still serving the model it had
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ chat input


def test_paths_and_values_in_chat_commands_are_never_executed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spawned = []

    def no_spawn(*args, **kwargs):
        spawned.append(args)
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    monkeypatch.setattr(os, "system", no_spawn)
    monkeypatch.setattr(os, "popen", no_spawn)
    jinja = "{{ cycler.__init__.__globals__.os.system('touch pwned') }}"
    rows = [{"messages": [{"role": "system", "content": f"$(touch pwned) {jinja}"},
                          {"role": "user", "content": f"`touch pwned`; {jinja}"},
                          {"role": "assistant", "content": f"{{% for x in range(3) %}}$(touch pwned){jinja}"}]}]
    data = write_jsonl(tmp_path / "payload.jsonl", rows)
    wrapper = make_wrapper(tiny_model_dir, max_length=4, do_sample=False)
    lines = [
        "/load $(touch pwned)",
        "/load `touch pwned`",
        "/load ; touch pwned",
        "/load x && touch pwned",
        "/finetune ;touch pwned",
        "/finetune $(touch pwned).jsonl",
        "/finetune data.jsonl | touch pwned",
        "/dryrun $(touch pwned)",
        f"/dryrun {data}",
        "/save $(touch pwned)",
        "/export ;touch pwned",
        "/set seed=$(touch${IFS}pwned)",
        "/use $(touch pwned)",
        f"/system $(touch pwned) {jinja}",
        f"$(touch pwned) {jinja}",
        "exit",
    ]
    assert make_session(wrapper, lines, tmp_path).run() == 0
    out = capsys.readouterr().out
    assert spawned == []
    assert [p for p in tmp_path.rglob("*") if "pwned" in p.name] == []
    assert not Path("pwned").exists()
    assert out.count("error:") >= 10  # each bad command got its error line and the chat went on
    assert "Traceback" not in out
