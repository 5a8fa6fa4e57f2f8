"""ChatFormat against every text-model chat template that the installed trl ships (`trl/chat_templates/`).

Each template gets its own tiny byte-level BPE tokenizer (trained in milliseconds, Llama-3/Qwen-style
pre-tokenizer) with the template's literal markers (`<|...|>`, `<start_of_turn>`, `<｜...｜>`, `[gMASK]`, ...)
added as special tokens; eos is a generic `<|endoftext|>`, so the end-of-turn marker has to be found by rendering.
Models are 2-layer Llama (hidden 64) built in memory.

Templates left out (decided by name and content, see `is_vision`):
- `*_training.jinja`: trl's patched training variants; ChatFormat uses them, they are not model templates.
- idefics3, smolvlm, llava_next: vision-language only; they index `message['content'][0]` as a list of
  image/text parts, so plain-string messages render empty (idefics3, smolvlm) or raise (llava_next).
- qwen2_5_vl, qwen3_vl, lfm2_2_5_vl: the `_vl` templates of vision-language processors.
Templates that merely accept image/video parts (Gemma 3/4, DiffusionGemma, Qwen3.5/3.6/3.8, LFM2.5, Muse Glimmer)
also serve text chat and are included.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import trl
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from hfmodel.chat_format import ChatFormat, ChatTemplateError

TEMPLATE_DIR = Path(trl.__file__).parent / "chat_templates"
MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>|<\|[a-z_]{1,20}>|<[a-z_]{1,20}\|>|<｜[^｜]{1,40}｜>|\[/?[A-Za-z_]{2,20}\]"
                    r"|</?[a-zA-Z_][a-zA-Z0-9_:.-]{0,30}>")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Who are you? I am Ember, a friendly assistant. What is two plus two? Four. Be brief. Line one two.",
          "system user assistant model the quick brown fox jumps over the lazy dog 0123456789 .,!?'\"-:;()"] * 20
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"


def is_vision(name: str, text: str) -> bool:
    return bool(re.search(r"(^|_)vl(_|$)", name) or "message['content'][0]" in text)


def template_text(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


ALL = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja") if not p.stem.endswith("_training"))
TEMPLATES = [n for n in ALL if not is_vision(n, template_text(n))]

# What ChatFormat finds, per template (the report's table); a key ending in "*" covers names that start with it.
# EOT: the end-of-turn text after the final assistant turn. SOURCE: the mask source for single-turn rows, and for a
# set that also holds multi-turn rows. Default: trl's training template for both. EXPANDED: templates that render
# earlier turns differently once later turns follow, so their multi-turn rows train as one example per turn.
TRL, OWN, PREFIX = "trl training template", "generation markers", "prefix rendering"
EOT = {"cohere": "<|END_OF_TURN_TOKEN|>", "cohere2": "<|END_RESPONSE|>", "deepseek*": "<｜end▁of▁sentence｜>",
       "diffusion_gemma": "<turn|>", "gemma4*": "<turn|>", "gemma*": "<end_of_turn>", "glm4moe": "<|user|>",
       "gptoss": "<|return|>", "lfm2*": "<|im_end|>", "llama3*": "<|eot_id|>", "muse_glimmer": "<|eot|>",
       "nemotron*": "<|im_end|>", "phi3*": "<|end|>", "qwen*": "<|im_end|>"}
EOT_BEFORE_NEXT_TURN = {"gptoss": "<|end|>"}
SOURCE = {"gemma4*": (PREFIX, PREFIX), "glm4moe": (PREFIX, PREFIX), "llama3_1": (PREFIX, PREFIX),
          "llama3_2": (PREFIX, PREFIX), "lfm2_2_5*": (OWN, OWN), "qwen3": (TRL, PREFIX),
          "qwen3_5*": (TRL, PREFIX), "qwen3_6": (TRL, PREFIX)}
EXPANDED = {"qwen3_5*": True, "qwen3_6": True}
# Text the model generates before the content (earlier turns, final turn), when the template renders one. For
# "<think>\n" generation prompts, the marked text starts after the tokens the prompt shares with the row.
PREAMBLE = {"glm4moe": ("\n<think></think>\n",) * 2, "gptoss": ("<|channel|>final<|message|>",) * 2,
            "muse_glimmer": (" to=user<|message|>",) * 2, "nemotron*": ("</think>",) * 2,
            "qwen3_8": ("\n</think>\n\n",) * 2, "qwen3_5_think": ("", "\n</think>\n\n"),
            "qwen3_6": ("", "\n</think>\n\n"), "qwen3": ("", "<think>\n\n</think>\n\n")}


def lookup(table: dict, name: str, default=None):
    if name in table:
        return table[name]
    keys = [k for k in table if k.endswith("*") and name.startswith(k[:-1])]
    return table[max(keys, key=len)] if keys else default


SYSTEM = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ember."}
U2, A2 = {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}
U3, A3 = {"role": "user", "content": "Say two lines."}, {"role": "assistant", "content": "Line one.\nLine {{ two }}."}
SINGLE = {"single": [U1, A1], "system": [SYSTEM, U1, A1], "newlines-braces": [U3, A3]}
MULTI = {"multi": [U1, A1, U2, A2], "system-multi": [SYSTEM, U1, A1, U2, A2, U3, A3]}


def build_tokenizer(template: str, pre_tokenizer=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    markers = sorted(set(MARKER.findall(template)) - {BOS, EOS, PAD})
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.chat_template = template
    return tokenizer


@cache
def tokenizer_for(name: str) -> PreTrainedTokenizerFast:
    return build_tokenizer(template_text(name))


@cache
def format_for(name: str) -> ChatFormat:
    return ChatFormat(tokenizer_for(name))


def tiny_model(vocab_size: int, tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


def loss_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


def expected_loss_text(name: str, row: list[dict]) -> str:
    """Each assistant turn's content plus its end-of-turn text, in order (plus any reasoning preamble)."""
    turns = [m for m in row if m["role"] == "assistant"]
    earlier_pre, final_pre = lookup(PREAMBLE, name, ("", ""))
    between = lookup(EOT_BEFORE_NEXT_TURN, name, lookup(EOT, name))
    return "".join((final_pre if last else earlier_pre) + m["content"] + (lookup(EOT, name) if last else between)
                   for last, m in ((k == len(turns) - 1, m) for k, m in enumerate(turns)))


# ---- which templates ------------------------------------------------------------------------------------------
def test_excluded_templates_are_the_vision_ones():
    excluded = {n for n in ALL if n not in TEMPLATES}
    assert excluded == {"idefics3", "smolvlm", "llava_next", "qwen2_5_vl", "qwen3_vl", "lfm2_2_5_vl"}
    assert len(TEMPLATES) >= 35


# ---- probing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_probe_system_and_end_of_turn(name):
    fmt, tok = format_for(name), tokenizer_for(name)
    assert fmt.supports_system == (name != "gemma")  # gemma.jinja raises "System role not supported"
    assert fmt.end_of_turn_text == lookup(EOT, name)
    assert tok.convert_tokens_to_ids(lookup(EOT, name)) in fmt.end_of_turn_ids
    assert tok.eos_token_id in fmt.end_of_turn_ids
    between = lookup(EOT_BEFORE_NEXT_TURN, name)
    assert between is None or tok.convert_tokens_to_ids(between) in fmt.end_of_turn_ids


def test_generation_config_eos_ids_are_stop_ids():
    tok = tokenizer_for("llama3_2")
    fmt = ChatFormat(tok, GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>"), 7]))
    assert fmt.end_of_turn_ids == [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id, 7]
    assert ChatFormat(tok, GenerationConfig(eos_token_id=9)).end_of_turn_ids[-1] == 9


# ---- (a) chat prompts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_render_prompt_is_the_templates_own_rendering(name):
    fmt, tok = format_for(name), tokenizer_for(name)
    for messages in ([U1], [SYSTEM, U1], [SYSTEM, U1, A1, U2]):
        expected = messages
        if not fmt.supports_system and messages[0]["role"] == "system":
            expected = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{U1['content']}"}, *messages[2:]]
        want = tok.apply_chat_template(expected, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        assert torch.equal(fmt.render_prompt(messages)["input_ids"], want["input_ids"]), messages
    assert torch.equal(fmt.render_prompt([U1], system_prompt="Be brief.")["input_ids"],
                       fmt.render_prompt([SYSTEM, U1])["input_ids"])


def test_prepare_keeps_or_adds_the_system_message_once():
    fmt = format_for("qwen2_5")
    assert fmt.prepare([SYSTEM, U1], system_prompt="Other.") == [SYSTEM, U1]
    assert fmt.prepare([U1], system_prompt="Other.") == [{"role": "system", "content": "Other."}, U1]
    assert fmt.prepare([U1]) == [U1]  # the template's own default system prompt renders, in chat and training alike
    row = fmt.prepare([U1, A1])
    ids, _ = fmt.mask_plan([row]).tokenize(row)
    assert "You are Qwen" in tok_decode("qwen2_5", ids)
    assert "You are Qwen" in tok_decode("qwen2_5", fmt.render_prompt([U1])["input_ids"][0].tolist())


def tok_decode(name: str, ids: list[int]) -> str:
    return tokenizer_for(name).decode(ids)


# SmolLM2's template shape (the project's bundled model): ChatML that injects a default system prompt.
SMOLLM2_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
                "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_default_system_prompt_renders_alike_in_chat_and_training():
    tok = build_tokenizer(SMOLLM2_LIKE)
    fmt = ChatFormat(tok)
    row = fmt.prepare([U1, A1])
    plan = fmt.mask_plan([row])
    ids, mask = plan.tokenize(row)
    assert plan.source == PREFIX and fmt.end_of_turn_text == "<|im_end|>"
    assert ids[:mask.index(1)] == fmt.render_prompt([U1])["input_ids"][0].tolist()
    assert "You are a tiny test model." in tok.decode(ids)
    assert loss_text(tok, ids, mask) == "I am Ember.<|im_end|>"


def test_chat_side_does_not_import_trl(tmp_path):
    """Chat only probes the template; trl is imported when training asks for a mask plan."""
    build_tokenizer(SMOLLM2_LIKE).save_pretrained(tmp_path)
    code = ("import sys; from transformers import AutoTokenizer; from hfmodel.chat_format import ChatFormat; "
            "f = ChatFormat(AutoTokenizer.from_pretrained(sys.argv[1])); "
            "f.render_prompt([{'role': 'user', 'content': 'hi'}], system_prompt='s'); "
            "assert 'trl' not in sys.modules, 'trl was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_system_is_folded_once_for_templates_without_a_system_role(caplog):
    fmt = ChatFormat(tokenizer_for("gemma"))
    with caplog.at_level(logging.INFO, logger="huggingface_model.chat_format"):
        first = fmt.prepare([U1, A1], system_prompt="Be brief.")
        fmt.prepare([SYSTEM, U1])
    assert first == [{"role": "user", "content": "Be brief.\n\nWho are you?"}, A1]
    assert sum("no system role" in r.getMessage() for r in caplog.records) == 1
    assert fmt.prepare([U1, A1]) == [U1, A1]


# ---- (b) loss tokens ------------------------------------------------------------------------------------------
def check_rows(name: str, rows: dict[str, list[dict]], source: str) -> None:
    fmt, tok = format_for(name), tokenizer_for(name)
    plan = fmt.mask_plan([fmt.prepare(r) for r in rows.values()])
    assert plan.source == source
    for label, row in rows.items():
        ids, mask = plan.tokenize(fmt.prepare(row))
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        assert loss_text(tok, ids, mask) == expected_loss_text(name, row), label
        if source == PREFIX:  # the tokens before the first marked one are exactly the chat prompt
            first = [i for i, m in enumerate(row) if m["role"] == "assistant"][0]
            prompt = fmt.render_prompt(row[:first])["input_ids"][0].tolist()
            assert ids[:mask.index(1)] == prompt


def check_expanded_rows(name: str, rows: dict[str, list[dict]]) -> None:
    """Each row is one example per assistant turn: the chat's prompt at that turn, then the turn (the only loss)."""
    fmt, tok = format_for(name), tokenizer_for(name)
    plan = fmt.mask_plan([fmt.prepare(r) for r in rows.values()])
    assert plan.source == PREFIX
    for label, row in rows.items():
        examples = plan.examples(fmt.prepare(row))
        turns = [i for i, m in enumerate(row) if m["role"] == "assistant"]
        assert len(examples) == len(turns), label
        for i, (ids, mask) in zip(turns, examples, strict=True):
            start, stop = mask.index(1), len(mask) - mask[::-1].index(1)
            assert mask == [0] * start + [1] * (stop - start) + [0] * (len(ids) - stop)  # one turn has loss
            if len(turns) > 1:  # a split row's example ends with its turn, where the chat stops generating
                assert stop == len(ids)
            assert ids[:start] == fmt.render_prompt(row[:i])["input_ids"][0].tolist(), (label, i)
            assert loss_text(tok, ids, mask) == expected_loss_text(name, [row[i]]), (label, i)


@pytest.mark.parametrize("name", TEMPLATES)
def test_loss_tokens_are_assistant_content_plus_end_of_turn(name):
    single_source, multi_source = lookup(SOURCE, name, (TRL, TRL))
    check_rows(name, SINGLE, single_source)
    if lookup(EXPANDED, name, False):
        check_expanded_rows(name, {**SINGLE, **MULTI})
    else:
        check_rows(name, {**SINGLE, **MULTI}, multi_source)


def test_every_text_template_trains_multi_turn_rows_and_only_rewriting_ones_expand():
    """All text templates trl ships train multi-turn rows under assistant-only loss (none is refused); the ones
    expanded turn by turn are exactly those whose earlier turns render differently from the chat's prompt."""
    rows = [*SINGLE.values(), *MULTI.values()]
    expanded = set()
    for name in TEMPLATES:
        fmt = format_for(name)
        prepared = [fmt.prepare(r) for r in rows]
        _, expansion = fmt.mask_plan(prepared).tokenize_rows(prepared)
        if expansion.rows:
            expanded.add(name)
            assert expansion.rows == len(MULTI) and expansion.examples == sum(len(r) // 2 for r in MULTI.values())
            assert expansion.tokens > expansion.whole_tokens  # every example repeats its prompt
    assert expanded == {n for n in TEMPLATES if lookup(EXPANDED, n, False)}
    assert expanded == {"qwen3_5_nothink", "qwen3_5_think", "qwen3_6"} and len(TEMPLATES) == 35


@pytest.mark.parametrize("name", [n for n in TEMPLATES if not lookup(EXPANDED, n, False)])
def test_an_assistant_turn_with_weight_0_is_context_only(name):
    """OpenAI's per-message `"weight": 0` (the session log's earlier exchanges): rendered, never trained on."""
    fmt, tok = format_for(name), tokenizer_for(name)
    row = fmt.prepare([SYSTEM, U1, {**A1, "weight": 0}, U2, A2])
    plan = fmt.mask_plan([fmt.prepare(r) for r in MULTI.values()] + [row])
    ids, mask = plan.tokenize(row)
    assert ids == plan.tokenize(fmt.prepare([SYSTEM, U1, A1, U2, A2]))[0]  # the same tokens
    assert loss_text(tok, ids, mask) == expected_loss_text(name, [U2, A2])  # the last turn's only


def test_whole_sequence_marks_every_token():
    fmt = format_for("llama3_2")
    plan = fmt.mask_plan([[U1, A1]], assistant_only=False)
    ids, mask = plan.tokenize([U1, A1])
    assert plan.source == "whole sequence" and mask == [1] * len(ids) and len(ids) > 10


@pytest.mark.parametrize("name", [n for n in TEMPLATES if lookup(EXPANDED, n, False)])
def test_expanded_row_with_weight_0_turns_trains_only_the_weighted_ones(name):
    fmt, tok = format_for(name), tokenizer_for(name)
    row = fmt.prepare([SYSTEM, U1, {**A1, "weight": 0}, U2, A2, U3, {**A3, "weight": 0}])
    plan = fmt.mask_plan([row])
    (ids, mask), = plan.examples(row)  # one example: A2 after the chat's prompt at A2
    assert ids[:mask.index(1)] == fmt.render_prompt(row[:4])["input_ids"][0].tolist()
    assert loss_text(tok, ids, mask) == expected_loss_text(name, [A2])
    assert plan.tokenize(row) == (ids, mask)
    with pytest.raises(ValueError, match="examples"):  # a row of several examples is not one token sequence
        plan.tokenize(fmt.prepare([SYSTEM, U1, A1, U2, A2]))


# Earlier assistant turns render in upper case once later turns follow: no single mask over the row matches the chat.
UPPER_EARLIER = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                 "{{ m.content | upper if (m.role == 'assistant' and not loop.last) else m.content }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_any_template_that_rewrites_earlier_turns_is_expanded():
    """Decided by rendering, not by name: a made-up template that rewrites earlier turns is expanded too."""
    tok = build_tokenizer(UPPER_EARLIER)
    fmt = ChatFormat(tok)
    row = [U1, A1, U2, A2]
    assert fmt.mask_plan([[U1, A1]]).examples([U1, A1]) == [fmt.mask_plan([[U1, A1]]).tokenize([U1, A1])]
    examples, expansion = fmt.mask_plan([row]).tokenize_rows([row])
    assert (expansion.rows, expansion.examples) == (1, 2)
    assert [loss_text(tok, ids, mask) for ids, mask in examples[0]] == ["I am Ember.<|im_end|>", "Four.<|im_end|>"]
    assert "I AM EMBER." in tok.decode(examples[0][1][0])  # the second example's prompt: as the chat renders it


def test_template_that_never_renders_the_answer_raises_one_line():
    # Assistant content is replaced: neither a mask nor a per-turn example can match what the chat generates.
    template = UPPER_EARLIER.replace("if (m.role == 'assistant' and not loop.last)", "if m.role == 'assistant'")
    fmt = ChatFormat(build_tokenizer(template))
    with pytest.raises(ChatTemplateError) as err:
        fmt.mask_plan([[U1, A1, U2, A2]])
    assert "\n" not in str(err.value) and "assistant_only_loss=False" in str(err.value)
    assert "verbatim" in str(err.value)


def test_tokenizer_merging_across_the_prompt_boundary_still_marks_chat_tokens():
    # GPT-2 style pre-tokenization: "\n\n" at the end of the prompt and "\n\nI" inside the row split differently.
    tok = build_tokenizer(template_text("llama3_2"), pre_tokenizers.ByteLevel(add_prefix_space=False))
    fmt = ChatFormat(tok)
    plan = fmt.mask_plan([[U1, A1, U2, A2]])
    ids, mask = plan.tokenize([U1, A1, U2, A2])
    start = mask.index(1)
    assert ids[:start] == fmt.render_prompt([U1])["input_ids"][0].tolist()
    answer = tok("I am Ember.<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert ids[start:start + len(answer)] == answer and mask[start:start + len(answer) + 1] == [1] * len(answer) + [0]


# ---- (c) 2-step LoRA fine-tune with trl's SFTTrainer, (d) generation stops at the end-of-turn id --------------
SFT_TEMPLATES = ["llama3_2", "qwen3", "gemma", "glm4moe", "qwen2_5", "gemma4", "gptoss", "phi3_5"]


class ForceTokenAt(LogitsProcessor):
    """Forces `token_id` as the `step`-th generated token."""

    def __init__(self, prompt_length: int, step: int, token_id: int) -> None:
        self.at, self.token_id = prompt_length + step - 1, token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -math.inf)
            scores[:, self.token_id] = 0.0
        return scores


def sft_trainer(name: str, padding_free: bool, tmp_path: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    fmt, tok = format_for(name), tokenizer_for(name)
    rows = [fmt.prepare(r, system_prompt="Be brief.") for r in [*SINGLE.values(), *MULTI.values()]]
    plan = fmt.mask_plan(rows)
    data = [dict(zip(("input_ids", "assistant_masks"), plan.tokenize(r), strict=True)) for r in rows]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                     padding_free=padding_free, max_length=None, assistant_only_loss=False, report_to="none",
                     save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=tiny_model(len(tok), tok), args=args, train_dataset=Dataset.from_list(data),
                         processing_class=tok, peft_config=lora)
    return trainer, data


@pytest.mark.parametrize("name", [n for n in SFT_TEMPLATES if n in TEMPLATES])
def test_two_step_lora_fine_tune_and_generation_stop(name, tmp_path):
    fmt, tok = format_for(name), tokenizer_for(name)
    trainer, data = sft_trainer(name, padding_free=True, tmp_path=tmp_path)
    prepared = trainer.train_dataset  # mask -> labels (-100 off the assistant tokens), shuffled
    expected = sorted([i if m else -100 for i, m in zip(d["input_ids"], d["assistant_masks"], strict=True)]
                      for d in data)
    assert sorted(prepared["labels"]) == expected
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0

    model = trainer.model.eval()
    enc = fmt.render_prompt([U1], system_prompt="Be brief.")
    out = model.generate(**enc, eos_token_id=fmt.end_of_turn_ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert 0 < out.shape[1] - enc["input_ids"].shape[1] <= 8
    eot = tok.convert_tokens_to_ids(fmt.end_of_turn_text)
    force = ForceTokenAt(enc["input_ids"].shape[1], step=3, token_id=eot)
    out = model.generate(**enc, eos_token_id=fmt.end_of_turn_ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([force]))
    assert out.shape[1] - enc["input_ids"].shape[1] == 3 and out[0, -1].item() == eot


def test_padding_free_gives_the_same_loss_as_padded(tmp_path):
    losses = [sft_trainer("llama3_2", padding_free=pf, tmp_path=tmp_path)[0].train().training_loss
              for pf in (False, True)]
    # fp32 sums over other shapes: 1.9e-5 apart on this CPU (AVX512); a masking difference moves the loss far more
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
