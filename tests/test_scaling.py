"""QLoRA settings and the memory estimate (no GPU needed: nothing here loads a quantized model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from finetune import MODEL_SHAPES, TABLE_SIZES, estimate_memory, memory_table  # noqa: E402
from huggingface_model import ModelLoadError, build_bnb_config, quantization_config  # noqa: E402

COMPONENTS = ("weights", "lora_params", "optimizer", "gradients", "activations")


# ------------------------------------------------------------------------------------------ QLoRA config


def test_4bit_is_nf4_with_double_quant_and_compute_dtype():
    config = build_bnb_config("4bit", torch.bfloat16)
    assert config.load_in_4bit is True and config.load_in_8bit is False
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert build_bnb_config("4bit", torch.float16).bnb_4bit_compute_dtype == torch.float16


def test_4bit_under_fsdp_stores_codes_in_the_compute_dtype():
    """FSDP shards only float tensors of one dtype per unit: NF4 codes go in bf16/fp16 storage, not uint8."""
    assert build_bnb_config("4bit", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    assert build_bnb_config("4bit", torch.bfloat16, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert build_bnb_config("4bit", torch.float16, fsdp=True).bnb_4bit_quant_storage == torch.float16
    with pytest.raises(ModelLoadError, match="cannot be sharded by FSDP"):
        build_bnb_config("8bit", torch.bfloat16, fsdp=True)


def test_quantization_config_follows_an_fsdp_launch(monkeypatch):
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP in every process; the model's config follows.

    Only the CUDA checks are stubbed (this machine has no GPU and no bitsandbytes); nothing is loaded.
    """
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert quantization_config("4bit", cuda).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = quantization_config("4bit", cuda)
    assert config.bnb_4bit_quant_storage == torch.bfloat16 == config.bnb_4bit_compute_dtype
    with pytest.raises(ModelLoadError, match="FSDP"):
        quantization_config("8bit", cuda)


def test_8bit_is_llm_int8():
    config = build_bnb_config("8bit", torch.bfloat16)
    assert config.load_in_8bit is True and config.load_in_4bit is False


def test_unknown_quantization_is_refused():
    with pytest.raises(ModelLoadError, match="4bit"):
        build_bnb_config("3bit", torch.bfloat16)
    with pytest.raises(ModelLoadError, match="4bit"):
        quantization_config("int4", torch.device("cpu"))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_on_cpu_says_cuda_is_needed(quantization):
    with pytest.raises(ModelLoadError) as info:
        quantization_config(quantization, torch.device("cpu"))
    message = str(info.value)
    assert "CUDA" in message and "bitsandbytes" in message
    assert "quantization" in message  # names the setting to remove


def test_no_quantization_means_no_config():
    for value in (None, "", "none"):
        assert quantization_config(value, torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------ estimate


def test_listed_shapes_match_the_nominal_sizes():
    nominal = {0.5: 0.49e9, 1.5: 1.54e9, 7: 7.62e9, 14: 14.77e9, 70: 70.55e9}  # published parameter counts
    for size, shape in MODEL_SHAPES.items():
        assert shape.params == pytest.approx(nominal[size], rel=0.01), shape.name


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_estimate_is_monotonic_in_model_size(method):
    rows = [estimate_memory(size, method) for size in TABLE_SIZES]
    for key in (*COMPONENTS, "total", "trainable_params"):
        values = [r[key] for r in rows]
        assert values == sorted(values) and len(set(values)) == len(values), (key, values)


def test_qlora_weights_are_smaller_than_lora_weights():
    for size in TABLE_SIZES:
        lora, qlora = estimate_memory(size, "lora"), estimate_memory(size, "qlora")
        assert qlora["weights"] < lora["weights"]
        assert qlora["total"] < lora["total"]
        for key in ("lora_params", "optimizer", "gradients", "activations"):  # only the base changes
            assert qlora[key] == lora[key]
    seventy_b = estimate_memory(70, "qlora")["weights"], estimate_memory(70, "lora")["weights"]
    assert seventy_b[0] < 0.35 * seventy_b[1]  # ~0.5 byte/param (+ unquantized embeddings) vs 2 bytes


def test_estimate_adds_up_and_is_plausible():
    m = estimate_memory(7, "lora", seq_len=2048, batch=1, lora_rank=16)
    assert m["total"] == pytest.approx(sum(m[k] for k in COMPONENTS))
    assert m["weights"] == pytest.approx(7.62e9 * 2 / 2**30, rel=0.01)  # bf16 base
    assert m["optimizer"] == pytest.approx(2 * m["lora_params"])  # Adam: 2 fp32 moments per fp32 param
    assert m["gradients"] == pytest.approx(m["lora_params"])
    assert 0.002 < m["trainable_params"] / 7.62e9 < 0.01  # r=16 on all linear layers: ~0.5 %
    assert 15 < m["total"] < 40


def test_estimate_knobs_move_the_right_terms():
    base = estimate_memory(7, "lora")
    assert estimate_memory(7, "lora", seq_len=4096)["activations"] > 1.9 * base["activations"] * 0.99
    assert estimate_memory(7, "lora", batch=2)["activations"] == pytest.approx(2 * base["activations"])
    assert estimate_memory(7, "lora", lora_rank=32)["lora_params"] == pytest.approx(2 * base["lora_params"])
    assert estimate_memory(7, "lora", activation_checkpointing=True)["activations"] < 0.5 * base["activations"]
    sharded = estimate_memory(7, "lora", shards=4)
    assert sharded["weights"] == pytest.approx(base["weights"] / 4)
    assert sharded["activations"] == base["activations"]


def test_unlisted_size_falls_between_its_neighbours():
    three = estimate_memory(3, "lora")
    assert estimate_memory(1.5, "lora")["weights"] < three["weights"] < estimate_memory(7, "lora")["weights"]
    assert three["params_billion"] == pytest.approx(3, rel=0.1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        estimate_memory(7, "full")
    with pytest.raises(ValueError):
        estimate_memory(7, "lora", batch=0)
    with pytest.raises(ValueError):
        estimate_memory(-1)


def test_memory_table_has_the_five_sizes_under_both_methods():
    table = memory_table()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 * len(TABLE_SIZES) == 10
    for size in TABLE_SIZES:
        name = MODEL_SHAPES[size].name
        assert sum(row.startswith(f"| {name} |") for row in rows) == 2, name
    assert sum("LoRA (bf16)" in r for r in rows) == 5 and sum("QLoRA (NF4)" in r for r in rows) == 5
    assert "| Model | Params | Method | Weights | LoRA | Optimizer | Gradients | Activations | Total |" in table


def test_estimate_memory_command_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--estimate-memory"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == memory_table()
