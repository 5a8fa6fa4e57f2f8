"""int8 serving weights on the CPU (`"quantization": "int8"`, hfmodel/int8.py), on the tiny model."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import fast_config, identity_rows, make_wrapper, write_jsonl
from torch import nn

from hfmodel import int8
from hfmodel.int8 import Int8Embedding, Int8Linear, dequantize_rows, int8_unavailable_reason, quantize_rows

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(int8_unavailable_reason() is not None, reason="no bf16 int8 kernel on this CPU"),
]

BOUND = 0.03  # max |int8 - reference| / max |reference| of one layer, or of a model against its dequantised self
# The whole tiny model against its fp32 self: its random weights (initializer_range 0.2) carry each layer's int8
# rounding through two layers into the logits (measured 0.08); SmolLM2's check at load bounds the loss instead.
MODEL_BOUND = 0.15


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max())


def prompt_ids(wrapper) -> torch.Tensor:
    return wrapper.tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                                 add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]


def logits(module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(input_ids=ids).logits


@pytest.mark.parametrize("rows", [1, 5, int8.KERNEL_ROWS + 8])  # the kernel, and the prefill path
def test_int8_linear_is_close_to_fp32(rows):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=True)
    x = torch.randn(2, rows, 64)
    quantized = Int8Linear.from_linear(layer)
    assert quantized.weight.dtype == torch.int8 and quantized(x).dtype == torch.float32
    assert relative_error(quantized(x), layer(x)) < BOUND
    # and exactly what the stored int8 rows mean, up to bf16 activations
    exact = nn.functional.linear(x, dequantize_rows(quantized.qweight, quantized.scales), layer.bias)
    assert relative_error(quantized(x), exact) < BOUND


def test_rows_never_overflow_after_rounding_the_scale_to_bf16():
    torch.manual_seed(1)
    weight = torch.randn(300, 64) * torch.logspace(-3, 2, 300)[:, None]
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16
    assert int(q.abs().max()) <= 127 and int(q.abs().amax(dim=1).min()) >= 126  # the full range, per row
    assert relative_error(dequantize_rows(q, scales), weight) < 0.01


def test_wrapper_serves_int8_layers_and_tied_head(tiny_model_dir):
    fp32 = make_wrapper(tiny_model_dir, do_sample=False)
    served = make_wrapper(tiny_model_dir, do_sample=False, quantization="int8")
    model = served.hf_model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)  # the LM head too
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, Int8Embedding) and embedding.weight is model.get_output_embeddings().weight
    assert served.int8_check is not None and served.int8_check.passed
    assert "int8 serving weights: eval loss" in served.int8_check.line()
    ids = prompt_ids(served)
    assert relative_error(logits(model, ids), logits(fp32.hf_model, ids)) < MODEL_BOUND
    assert relative_error(embedding(ids), fp32.hf_model.get_input_embeddings()(ids)) < 0.01
    assert served.generate([{"role": "user", "content": "Hi"}])  # a whole reply through generate


def test_served_weights_take_a_quarter_of_the_fp32_bytes(tiny_model_dir):
    served = make_wrapper(tiny_model_dir, quantization="int8")
    check = served.int8_check
    assert check is not None and check.bytes_int8 < 0.3 * check.bytes_fp32


def _random_adapter(base_dir, folder, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def test_adapter_switch_under_int8_matches_peft_on_the_dequantised_weights(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = _random_adapter(tiny_model_dir, tmp_path / "first", seed=1)
    second = _random_adapter(tiny_model_dir, tmp_path / "second", seed=2)
    served = make_wrapper(tiny_model_dir, quantization="int8")
    a, b = served.load_adapter(first).name, served.load_adapter(second).name

    # the reference: plain peft on an fp32 model whose weights are the int8 ones, dequantised
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for name, layer in served.handle.int8.layers.items():
        reference.get_submodule(name).weight.data = dequantize_rows(layer.qweight, layer.scales)
    reference = PeftModel.from_pretrained(reference, str(first), adapter_name="first")
    reference.load_adapter(str(second), adapter_name="second")
    reference.eval()

    ids = prompt_ids(served)
    seen = []
    for ours, theirs in ((a, "first"), (b, "second"), (a, "first")):
        served.use_adapter(ours)
        reference.set_adapter(theirs)
        seen.append(logits(served.hf_model, ids))
        assert relative_error(seen[-1], logits(reference, ids)) < BOUND
    assert relative_error(seen[0], seen[1]) > 10 * BOUND  # the two adapters really differ
    served.use_adapter(None)
    with reference.disable_adapter():
        assert relative_error(logits(served.hf_model, ids), logits(reference, ids)) < BOUND
    # the LoRA matrices stay fp32 beside the int8 base
    lora = [p for n, p in served.hf_model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)


def test_rows_for_different_adapters_under_int8_share_a_batch_and_equal_their_single_replies(tiny_model_dir, tmp_path):
    served = make_wrapper(tiny_model_dir, quantization="int8", do_sample=False, max_length=8)
    a = served.load_adapter(_random_adapter(tiny_model_dir, tmp_path / "first", seed=1)).name
    b = served.load_adapter(_random_adapter(tiny_model_dir, tmp_path / "second", seed=2)).name
    conversation = [{"role": "user", "content": "Who are you?"}]
    singles = []
    for name in ("base", a, b):
        served.use_adapter(name)
        singles.append(served.generate(conversation))
    assert len(set(singles)) == 3  # each adapter answers differently
    batch = served.generate_batch([conversation] * 3, adapters=["base", a, b])
    assert [r.text for r in batch] == singles
    assert served.handle.compute.batches[-1] == 3 and served.active_adapter == b


def test_fine_tune_with_int8_serving_trains_on_the_fp32_base(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    served = make_wrapper(tiny_model_dir, do_sample=False, quantization="int8")
    on_disk = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    layers = served.handle.int8.layers
    seen: list[bool] = []

    def progress(_: dict) -> None:  # during training every int8 layer multiplies with the exact fp32 weight
        seen.append(all(torch.equal(layer.weight, on_disk[f"{name}.weight"]) for name, layer in layers.items()
                        if f"{name}.weight" in on_disk))

    ids = prompt_ids(served)
    before = logits(served.hf_model, ids)
    data = write_jsonl(tmp_path / "identity.jsonl", identity_rows())
    result = served.fine_tune(str(data), fast_config(tmp_path), progress=progress)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert seen and all(seen)
    assert losses[-1] < losses[0]
    assert served.active_adapter == result.adapter_name
    assert all(layer.weight.dtype == torch.int8 for layer in layers.values())  # int8 serves again
    assert served.hf_model.get_input_embeddings().weight.dtype == torch.int8
    assert relative_error(logits(served.hf_model, ids), before) > 0.05  # the new adapter serves


def test_bad_quantization_value_names_every_valid_one(tiny_model_dir):
    from huggingface_model import ModelLoadError

    with pytest.raises(ModelLoadError) as info:
        make_wrapper(tiny_model_dir, quantization="int4")
    message = str(info.value)
    assert "'int4'" in message and '"int8"' in message and '"4bit"' in message and "quantization" in message


def test_int8_on_cuda_points_to_bitsandbytes():
    from huggingface_model import ModelLoadError

    with pytest.raises(ModelLoadError, match='"8bit"'):
        int8.int8_wanted(torch.device("cuda"))


def test_cpu_without_bf16_warns_once_and_serves_fp32(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr("hfmodel.common.cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="huggingface_model"):
        served = make_wrapper(tiny_model_dir, quantization="int8")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "int8" in warnings[0] and "fp32" in warnings[0]
    assert served.handle.int8 is None
    assert not any(isinstance(m, Int8Linear) for m in served.hf_model.modules())


def test_export_refuses_int8_weights_with_the_way_out(tiny_model_dir, tmp_path):
    from huggingface_model import FineTuneError

    served = make_wrapper(tiny_model_dir, quantization="int8")
    served.load_adapter(_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3))
    with pytest.raises(FineTuneError, match="int8"):
        served.export_merged(tmp_path / "merged")


def test_the_docs_example_runs_on_the_tiny_model(tiny_model_dir, capsys):
    import re
    from pathlib import Path

    from huggingface_model import DEFAULT_MODEL_ID

    docs = (Path(__file__).resolve().parent.parent / "docs" / "int8.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", docs, re.S)
    assert f'model_id="{DEFAULT_MODEL_ID}"' in code
    exec(code.replace(f'model_id="{DEFAULT_MODEL_ID}"', f'local_model_path="{tiny_model_dir}"'), {})  # noqa: S102
    assert "int8 serving weights: eval loss" in capsys.readouterr().out


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_bench_worker_measures_both_precisions(tiny_model_dir, quantization):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench_for_int8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.worker_int8({"folder": str(tiny_model_dir), "quantization": quantization, "tokens": 4, "repeats": 1})
    assert out["decode_tok_s"]["median"] > 0 and out["eval_loss"] > 0 and len(out["greedy_tokens"]) == 4
    assert (out["int8_check"] is not None) == (quantization == "int8")
    assert out["tensor_mb"] > 0
