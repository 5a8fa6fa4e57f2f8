"""Loading: local folders, adapter folders, and clear ModelLoadErrors for everything else."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from helpers import SYSTEM_PROMPT, make_wrapper

from huggingface_model import CHATML_TEMPLATE, HuggingFaceWrapper, ModelLoadError


def test_local_folder_loads(tiny_wrapper, tiny_model_dir):
    m = tiny_wrapper
    assert m.source.kind == "local" and m.source.path == str(tiny_model_dir)
    assert m.hf_model is not None and m.tokenizer is not None
    assert not m.hf_model.training  # served in eval mode
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert m.hf_model.dtype == torch.float32
    assert m.context_size == 512  # the tiny config's max_position_embeddings
    assert m.parameters.max_length == 16
    assert m.system_prompt == SYSTEM_PROMPT
    assert m.adapters == {} and m.active_adapter is None
    # ChatModelBase keeps the model NAME (a str) in .model; the weights live in .hf_model.
    assert isinstance(m.model, str)
    # <|im_end|> (the end of an assistant turn) stops generation.
    assert m.tokenizer.convert_tokens_to_ids("<|im_end|>") in m.stop_token_ids
    assert m.tokenizer.padding_side == "left"


def test_nonexistent_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError) as info:
        make_wrapper(missing)
    assert "not found" in str(info.value) and str(missing) in str(info.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be a folder"):
        make_wrapper(f)


def test_empty_folder_lists_what_is_missing(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        make_wrapper(tmp_path)
    message = str(info.value)
    assert "config.json" in message and "weights" in message
    assert "found: nothing" in message


def test_folder_without_weights_lists_only_the_weights(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    with pytest.raises(ModelLoadError) as info:
        make_wrapper(folder)
    message = str(info.value)
    assert "missing weights" in message
    assert "missing config.json" not in message
    assert "tokenizer.json" in message  # what was found is listed


def test_folder_without_config_lists_the_config(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        make_wrapper(folder)
    message = str(info.value)
    assert "missing config.json" in message
    assert "weights" not in message.split("found:")[0].replace("missing config.json", "")


def test_unknown_hub_id_offline_fails_fast():
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        HuggingFaceWrapper(config_name="x", model_id="nobody-here/no-such-model-xyz")
    assert time.perf_counter() - started < 10  # no ~50 s of hub retries
    assert "nobody-here/no-such-model-xyz" in str(info.value)
    assert "local_model_path" in str(info.value)  # it says how to fix it


def test_missing_tokenizer_folder(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="Tokenizer folder not found"):
        make_wrapper(tiny_model_dir, local_tokenizer_path=str(tmp_path / "nope"))


def test_tokenizer_without_template_gets_chatml(tmp_path):
    from tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "no-template", chat_template=None)
    m = make_wrapper(folder)
    assert m.tokenizer.chat_template == CHATML_TEMPLATE
    assert isinstance(m.generate([{"role": "user", "content": "hi"}], max_new_tokens=2), str)


def test_unsupported_device_is_a_load_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="device"):
        make_wrapper(tiny_model_dir, device="tpu-9")


def test_quantization_on_cpu_is_refused_clearly(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="CUDA"):
        make_wrapper(tiny_model_dir, device="cpu", quantization="4bit")


def test_adapter_folder_loads_base_and_adapter(taught_adapter, tiny_model_dir):
    m = make_wrapper(taught_adapter)
    assert m.source.path == str(tiny_model_dir)  # the base named in adapter_config.json
    assert m.source.adapter == str(taught_adapter)
    assert m.active_adapter == "ft1" and list(m.adapters) == ["ft1"]
    assert m.hf_model.active_adapters == ["ft1"]


def test_dtype_choice():
    from huggingface_model import pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype(cpu) == torch.float32 and pick_dtype(cpu, "auto") == torch.float32
    assert pick_dtype(cpu, "bf16") == torch.bfloat16
    assert pick_dtype(cpu, "float16") == torch.float32  # fp16 on CPU is slow and unstable
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        pick_dtype(cpu, "float8")


def test_token_comes_from_env_file_and_is_redacted(tmp_path, monkeypatch):
    from huggingface_model import hf_token, redact

    monkeypatch.setenv("HF_TOKEN", "placeholder")
    monkeypatch.delenv("HF_TOKEN")  # restored to "unset" afterwards, even though load_dotenv sets it
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HF_TOKEN=hf_fromDotEnvFile123\n")
    assert hf_token() == "hf_fromDotEnvFile123"
    assert redact("token=hf_fromDotEnvFile123 end") == "token=*** end"
