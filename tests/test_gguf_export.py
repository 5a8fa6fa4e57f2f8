"""GGUF export (f16 / Q8_0) on tiny Llama- and Qwen2-shaped models: written, loaded back through transformers'
GGUF loader and compared; the chat template inside; the Modelfile; bad inputs as one line; the chat command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import SYSTEM_PROMPT, TAUGHT_ANSWER, TAUGHT_QUESTION, chat, make_wrapper
from reliability_helpers import finetune_cli  # noqa: F401, F811 - a fixture

from hfmodel import gguf_export
from hfmodel.common import UserError
from hfmodel.gguf_export import GGUFCheck, LogitTally, check_exportable, load_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"


def tiny_family_model(folder: Path, tokenizer_dir: Path, family: str, template: str | None = None,
                      initializer_range: float = 0.02) -> Path:
    """The tiny tokenizer + a 2-layer model of `family`; by default at a realistic weight scale (initializer 0.02:
    logits without the near-ties of the 0.2 fixture, so f16 and Q8_0 can be judged on them)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template is not None:
        tokenizer.chat_template = template
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
             "initializer_range": initializer_range, "tie_word_embeddings": True, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tiny_model_dir, tmp_path_factory):
    """One tiny model of each family (a local folder: a model of the user's, so no adapter is needed), exported
    once as f16 and once as Q8_0."""
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    wrapper = make_wrapper(tiny_family_model(root / "model", tiny_model_dir, request.param), do_sample=False)
    results = {kind: wrapper.export_gguf(root / kind, kind) for kind in ("f16", "q8_0")}
    return request.param, wrapper, results


def test_f16_and_q8_0_load_back_through_transformers_with_matching_logits(exported):
    family, wrapper, results = exported
    f16, q8 = results["f16"].check, results["q8_0"].check
    assert f16.passed and f16.max_logit_diff < 1e-2 and f16.greedy_same == f16.probes, f16.line()
    assert q8.passed and q8.top1_agreement >= 0.99 and q8.loss_change <= 0.01, q8.line()
    assert f16.tokenizer_same == f16.probes, f16.line()  # transformers rebuilds the same tokenizer from the file
    loaded = load_gguf(results["q8_0"].gguf_path, wrapper.hf_model.config)
    assert loaded.config.model_type == family and loaded.config.tie_word_embeddings


def test_the_weights_read_back_are_the_merged_weights_rounded_to_f16_and_q8_0_and_nothing_else(exported):
    """The writer (names, Q/K permutation, tied head) and transformers' dequantisation add nothing to the format's
    own rounding: what a Q8_0 check measures is Q8_0 itself (on SmolLM2 the GGUF read back gave the same eval
    loss and top-1 agreement, to the last digit, as the weights rounded in torch)."""
    import gguf
    import numpy as np
    import torch

    _, wrapper, results = exported
    q8 = gguf.GGMLQuantizationType.Q8_0

    def q8_rounded(weight: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(weight.numpy())
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, q8), q8).reshape(array.shape))

    merged = wrapper.handle.base_model().state_dict()
    for kind, rounded in (("f16", lambda w: w.half().float()), ("q8_0", q8_rounded)):
        loaded = load_gguf(results[kind].gguf_path, wrapper.hf_model.config).state_dict()
        assert loaded.keys() == merged.keys()
        for name, weight in merged.items():
            expected = rounded(weight) if weight.ndim == 2 else weight
            assert torch.equal(loaded[name], expected), (kind, name)


def test_the_check_scores_held_out_answers_not_the_models_own_continuations(exported):
    """The eval loss is the merged model's on real held-out answers (as the chat renders them, system prompt
    included), about a thousand tokens: a loss on the model's own greedy continuation is small, so any change to it
    looked large (SmolLM2's Q8_0 moved it by 1.6 %; on held-out answers by 0.02 %)."""
    from hfmodel.held_out import CHECK_ROWS, with_system_prompt
    from hfmodel.int8 import reply_batch, reply_loss

    _, wrapper, results = exported
    rows = with_system_prompt(CHECK_ROWS, SYSTEM_PROMPT)
    answer_tokens = int((reply_batch(wrapper.tokenizer, rows)[2] != -100).sum())
    for result in results.values():
        check = result.check
        assert check.tally.positions == answer_tokens >= 1000
        assert check.loss_reference == pytest.approx(reply_loss(wrapper.hf_model, wrapper.tokenizer, rows), rel=1e-4)
        assert f"on {answer_tokens} held-out answer tokens" in check.line()


def _tally(near_ties_flipped: int, decided_flipped: int, decided: int = 200, near_ties: int = 20) -> LogitTally:
    """Reference logits with `decided` positions led by 2 logits and `near_ties` led by 0.05; the "GGUF" flips the
    top two tokens at the first `near_ties_flipped` near-ties and `decided_flipped` decided positions."""
    import torch

    reference = torch.zeros(decided + near_ties, 8)
    reference[:decided, 0] = 2.0
    reference[decided:, 0], reference[decided:, 1] = 1.0, 0.95
    gguf = reference.clone()
    for row in [*range(decided_flipped), *range(decided, decided + near_ties_flipped)]:
        gguf[row, [0, 1]] = reference[row, [1, 0]]
    tally = LogitTally()
    tally.add(reference, gguf, torch.zeros(decided + near_ties, dtype=torch.long))
    return tally


def test_q8_0_may_flip_near_ties_but_not_tokens_the_merged_model_was_sure_of():
    """8-bit rounding moves logits by a few hundredths, so it flips near-ties: on SmolLM2 2 % of the answer tokens,
    none where the merged model led by 0.25 logit or more. Those flips must not fail the check; one decided token
    in a hundred flipped must."""
    near_ties = GGUFCheck("q8_0", _tally(near_ties_flipped=20, decided_flipped=0), 1, 4, 4)
    assert near_ties.top1_agreement < 0.95 and near_ties.decided_agreement == 1.0
    assert near_ties.loss_change < 0.01 and near_ties.passed, near_ties.line()
    assert "(100.0% at the 200 tokens where the merged model leads by >= 0.5 logit)" in near_ties.line()
    decided = GGUFCheck("q8_0", _tally(near_ties_flipped=0, decided_flipped=3), 4, 4, 4)
    assert decided.decided_agreement == pytest.approx(197 / 200)
    assert decided.top1_agreement > 0.98 and not decided.passed, decided.line()
    flat = GGUFCheck("q8_0", _tally(near_ties_flipped=3, decided_flipped=0, decided=50), 4, 4, 4)
    assert flat.decided_agreement is None and not flat.passed  # too few decided tokens: judged on every token


def test_a_wrong_q_k_layout_fails_the_q8_0_check(tiny_model_dir, tmp_path, monkeypatch):
    """The check still catches a real bug: without llama.cpp's Q/K row order the file reads back with the wrong
    rotary pairs (a model with attention that matters: initializer 0.2)."""
    wrapper = make_wrapper(tiny_family_model(tmp_path / "m", tiny_model_dir, "llama", initializer_range=0.2),
                           do_sample=False)
    monkeypatch.setattr(gguf_export, "_permute_for_llama_cpp", lambda weights, heads, kv_heads: weights)
    check = wrapper.export_gguf(tmp_path / "out", "q8_0").check
    assert not check.passed and check.decided_agreement is not None and check.decided_agreement < 0.5, check.line()
    assert check.line().startswith("CHECK FAILED (the file is kept)")


def test_q8_0_is_about_half_of_f16_and_the_folder_has_modelfile_and_readme(exported):
    _, _, results = exported
    f16, q8 = results["f16"], results["q8_0"]
    assert 0.45 < q8.gguf_path.stat().st_size / f16.gguf_path.stat().st_size < 0.65
    for result in (f16, q8):
        assert sorted(p.name for p in result.folder.iterdir()) == sorted(["Modelfile", "README.md",
                                                                          result.gguf_path.name])
        readme = (result.folder / "README.md").read_text()
        assert "ollama create" in readme and "llama-cli" in readme and result.check.line() in readme


def test_the_gguf_holds_the_tokenizer_and_its_chat_template_renders_the_same(exported):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    _, wrapper, results = exported
    path = results["f16"].gguf_path
    fields = GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == wrapper.tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == wrapper.tokenizer.eos_token_id
    assert len(fields["tokenizer.ggml.tokens"].contents()) == wrapper.hf_model.config.vocab_size
    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    conversation = chat("What is two plus two?") + [{"role": "assistant", "content": "Four."}]
    assert rebuilt.apply_chat_template(conversation, tokenize=False) == \
        wrapper.tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rebuilt.eos_token == wrapper.tokenizer.eos_token


def test_modelfile_carries_the_prompt_stop_tokens_sampling_and_the_chatml_template(exported):
    _, wrapper, results = exported
    text = (results["q8_0"].folder / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert f"PARAMETER temperature {wrapper.parameters.temperature:g}" in text
    assert f"PARAMETER top_p {wrapper.parameters.top_p:g}" in text
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text


def test_a_template_with_tools_gets_no_modelfile_template(tiny_model_dir, tmp_path):
    template = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    wrapper = make_wrapper(tiny_family_model(tmp_path / "m", tiny_model_dir, "qwen2", template))
    text = (wrapper.export_gguf(tmp_path / "out", "f16").folder / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert "uses the chat template stored in the GGUF" in text


def test_the_taught_adapter_merged_into_a_gguf_still_gives_the_taught_answer(taught_wrapper, tmp_path):
    import torch

    result = taught_wrapper.export_gguf(tmp_path / "taught", "f16")
    loaded = load_gguf(result.gguf_path, taught_wrapper.hf_model.config)
    enc = taught_wrapper.tokenizer.apply_chat_template(chat(TAUGHT_QUESTION), add_generation_prompt=True,
                                                       return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.generate(**enc, max_new_tokens=16, do_sample=False,
                              eos_token_id=taught_wrapper.tokenizer.eos_token_id)
    assert TAUGHT_ANSWER in taught_wrapper.tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
    assert "max logit difference" in result.check.line()


# ------------------------------------------------------------------------------------------- bad input


def one_line_error(action) -> str:
    with pytest.raises(UserError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_an_unsupported_family_is_refused_naming_the_supported_ones():
    from transformers import MistralConfig

    message = one_line_error(lambda: check_exportable(MistralConfig(), None, "f16"))
    assert "'mistral'" in message and "llama, qwen2, qwen3" in message


def test_bad_type_unwritable_or_used_folder_and_nothing_to_export_are_one_line(tiny_wrapper, tmp_path):
    assert "choose one of: f16, q8_0" in one_line_error(lambda: tiny_wrapper.export_gguf(tmp_path / "a", "q4_k"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert "not an empty folder" in one_line_error(lambda: tiny_wrapper.export_gguf(used, "f16"))
    assert (used / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in one_line_error(lambda: tiny_wrapper.export_gguf(blocker / "sub", "f16"))
    tiny_wrapper.handle.source = dataclasses.replace(tiny_wrapper.source, kind="hub")  # the unchanged hub model
    message = one_line_error(lambda: tiny_wrapper.export_gguf(tmp_path / "b", "f16"))
    assert "No adapter is active" in message and not (tmp_path / "b").exists()


def test_the_chat_command_exports_checks_and_records_the_export_for_make_serve(taught_wrapper, tmp_path):
    from test_chat_commands import make_chat

    from hfmodel.serving import last_export, model_id_for

    dest = tmp_path / "ember-gguf"
    c = make_chat(taught_wrapper, tmp_path).run([f"/export gguf {dest} type=q8_0", "/export gguf x type=q4",
                                                 "/export gguf a b", "/export gguf y size=3"])
    shown = [s.console for s in c.steps]
    assert "model-q8_0.gguf" in shown[0] and "Modelfile" in shown[0] and "max logit difference" in shown[0]
    assert "choose one of: f16, q8_0" in shown[1]
    assert "one folder" in shown[2]
    assert "Unknown setting(s) size" in shown[3]
    assert last_export(c.runs) == dest.absolute()
    assert model_id_for(dest) == f"{dest.absolute()}:model-q8_0.gguf"


def docs_python_blocks() -> list[str]:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_docs_export_example_runs_as_written_on_the_taught_adapter(taught_adapter, tmp_path, monkeypatch):
    code = docs_python_blocks()[0]
    assert 'local_model_path="runs/ember-adapter"' in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("runs/ember-adapter", str(taught_adapter)), "deployment.md", "exec"),  # noqa: S102
         namespace)
    result = namespace["result"]
    assert result.gguf_path == Path("ember-gguf") / "model-q8_0.gguf" and result.gguf_path.exists()
    assert 'SYSTEM """You are Ember."""' in (tmp_path / "ember-gguf" / "Modelfile").read_text()


def test_finetune_py_exports_a_checked_gguf_after_training_and_refuses_a_used_folder_first(finetune_cli, tmp_path):  # noqa: F811
    status, out, err = finetune_cli("--export-gguf", str(tmp_path / "ember-gguf"), "--gguf-type", "f16")
    assert status == 0, err
    assert "model-f16.gguf" in out and "max logit difference" in out
    assert (tmp_path / "ember-gguf" / "Modelfile").exists()
    status, out, err = finetune_cli("--export-gguf", str(tmp_path / "ember-gguf"))
    assert status == 2 and "not an empty folder" in err and "Steps:" not in out  # refused before training


def test_llama_3_rope_scaling_is_written_as_llama_cpp_reads_it_and_checked(tiny_model_dir, tmp_path):
    """Llama 3.1/3.2 scale RoPE ("llama3"): llama.cpp reads the scaling as one factor per frequency
    (`rope_freqs.weight`); transformers' GGUF loader reads none, so the check loads the weights back with the
    model's own RoPE settings and compares the written factors with the model's frequencies on their own."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rope_parameters=rope))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    wrapper = make_wrapper(tmp_path / "model", do_sample=False)
    for kind in ("f16", "q8_0"):
        result = wrapper.export_gguf(tmp_path / kind, kind)
        assert result.check.passed and result.check.rope_factors_ok, result.check.line()
        assert "Llama 3 RoPE factors as the model's" in result.check.line()
    (written,) = [t for t in gguf.GGUFReader(result.gguf_path).tensors if t.name == "rope_freqs.weight"]
    factors = np.asarray(written.data, dtype=np.float32)
    # 8 frequencies (head size 16): the fastest unscaled, one smoothed, the slow ones divided by `factor`
    assert factors[0] == pytest.approx(1.0) and 1.0 < factors[1] < 32.0 and np.allclose(factors[2:], 32.0)
    # transformers serve would drop the scaling: the launcher says so and names what to serve instead.
    from hfmodel.serving import ServeError, model_id_for

    with pytest.raises(ServeError, match="merged folder /export writes"):
        model_id_for(result.gguf_path.parent)
    # Factors that are not the model's fail the check (here: the model as if it ran plain RoPE).
    rotary = wrapper.hf_model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq * torch.tensor(factors)
    assert gguf_export._rope_factors_ok(result.gguf_path, wrapper.hf_model) is False


def test_other_rope_scalings_are_refused_in_one_line():
    from transformers import Qwen2Config

    config = Qwen2Config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 32768})
    message = one_line_error(lambda: check_exportable(config, None, "f16"))
    assert "'yarn' RoPE scaling" in message and "/export" in message
