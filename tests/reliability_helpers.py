"""Helpers for the reliability tests: model folders that do not fit, and finetune.py run in-process."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template")


def copy_tokenizer(source: Path, folder: Path) -> None:
    for item in source.iterdir():
        if item.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy(item, folder / item.name)


def model_without_tokenizer(tiny_model_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if not item.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy(item, folder / item.name)
    return folder


def model_variant(tiny_model_dir: Path, folder: Path, **config_changes) -> Path:
    """The tiny model with other config values (random weights) and the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    for key, value in config_changes.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    copy_tokenizer(tiny_model_dir, folder)
    return folder


def narrow_model(tiny_model_dir: Path, folder: Path) -> Path:
    """Same vocabulary and layer names as the tiny model, hidden size 32 instead of 64: no tiny adapter fits it."""
    return model_variant(tiny_model_dir, folder, hidden_size=32, intermediate_size=64)


def adapter_pointing_at(adapter: Path, folder: Path, base: str) -> Path:
    """A copy of `adapter` whose adapter_config.json names `base` as the model it was made for."""
    import json

    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    return folder


@pytest.fixture
def finetune_cli(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Run `finetune.py` in-process: `finetune_cli(*flags, config=..., data=...)` -> (status, stdout, stderr).

    The default config fine-tunes the tiny model on 4 identity rows for 2 steps, below `tmp_path`; logging and
    transformers' verbosity (which the script sets process-wide) are put back afterwards.
    """
    import transformers
    from helpers import identity_rows, write_jsonl

    import finetune

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("huggingface_model").level,
             transformers.utils.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled())
    data = write_jsonl(tmp_path / "data.jsonl", identity_rows())

    def run(*flags: str, config: dict | None = None, data_path: str | None = None) -> tuple[int, str, str]:
        if config is None:
            config = {"model": {"local_model_path": str(tiny_model_dir), "max_length": 8},
                      "data_path": data_path or str(data),
                      "fine_tune_config": {"training_args": {"output_dir": str(tmp_path / "runs"), "max_steps": 2,
                                                             "per_device_train_batch_size": 4,
                                                             "save_strategy": "no"}}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        capsys.readouterr()
        status = finetune.main(["--config", str(path), *flags])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("huggingface_model").setLevel(saved[2])
    transformers.utils.logging.set_verbosity(saved[3])
    if saved[4]:
        transformers.utils.logging.enable_progress_bar()
