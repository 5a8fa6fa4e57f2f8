"""GGUF export (f16 / Q8_0) of a merged model for llama.cpp and Ollama, checked by loading it back.

    from hfmodel.gguf_export import write_gguf, verify_gguf
    path = write_gguf(merged_model, tokenizer, Path("ember-gguf/model-q8_0.gguf"), "q8_0")
    print(verify_gguf(merged_model, tokenizer, path, "q8_0").line())

The file is written the way llama.cpp's `convert_hf_to_gguf.py` writes it (tensor names from
`gguf.get_tensor_name_map`, Llama's Q/K rows permuted, the hyper-parameters under llama.cpp's keys, the
byte-level BPE tokenizer and the chat template), so llama.cpp, Ollama and transformers' GGUF loader all read it.
The check loads the file back through transformers' GGUF loader and compares it with the merged model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfmodel.common import FineTuneError

# Hugging Face model_type -> llama.cpp architecture: the families transformers' GGUF loader reads back (so every
# export can be checked). Others (mistral, gemma, phi3...) have llama.cpp converters but no check here yet.
SUPPORTED = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
OUT_TYPES = ("f16", "q8_0")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's tensor of Llama 3 RoPE frequency factors
Q8_0_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values; other rows stay f16, as llama.cpp does
# The check's pass marks. An f16 file must continue every probe exactly like the merged model. Q8_0 must lose at
# most 1 % in eval loss on held-out answers and pick the merged model's next token at >= 99 % of the positions
# where that model is decided (its top token leads the runner-up by DECIDED_MARGIN logits or more). 8-bit rounding
# moves logits by ~0.06 (median; SmolLM2-135M), so it flips near-ties: 2.5 % of SmolLM2's answer tokens, none of
# them where the merged model led by 0.25 logit or more. A wrong layout or scale flips decided positions too.
Q8_MIN_TOP1 = 0.99
Q8_MAX_LOSS_CHANGE = 0.01
DECIDED_MARGIN = 0.5  # logits, i.e. the top token is >= 1.65x as likely as the runner-up
MIN_DECIDED = 100  # fewer decided positions (an untrained model's flat logits): judge top-1 on every position
CHECK_BATCH = 4  # held-out rows per forward pass: ~100 MB of logits at SmolLM2's 49k vocabulary
PROBES = ("Who are you?", "What can you do for me?", "What is the capital of France?",
          "Write one sentence about the sea.")
PROBE_TOKENS = 24  # tokens of greedy continuation compared per probe

# The pre-tokenizer names llama.cpp gives the byte-level BPE vocabularies of the supported families.
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_QWEN2_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


class GGUFExportError(FineTuneError):
    """A model, tokenizer or folder this export cannot write (one line, with the fix)."""


@dataclass
class LogitTally:
    """The merged model's logits against the GGUF's at scored positions, summed over batches."""

    max_diff: float = 0.0
    positions: int = 0
    agree: int = 0
    decided: int = 0
    decided_agree: int = 0
    nll_reference: float = 0.0
    nll_gguf: float = 0.0

    def add(self, reference: Any, gguf: Any, targets: Any) -> None:
        """`reference`, `gguf`: [positions, vocab] logits predicting `targets` [positions]."""
        import torch.nn.functional as F

        if not len(targets):
            return
        self.max_diff = max(self.max_diff, float((reference - gguf).abs().max()))
        top2 = reference.topk(2, dim=-1).values
        same = reference.argmax(-1) == gguf.argmax(-1)
        decided = (top2[:, 0] - top2[:, 1]) >= DECIDED_MARGIN
        self.positions += len(targets)
        self.agree += int(same.sum())
        self.decided += int(decided.sum())
        self.decided_agree += int((same & decided).sum())
        self.nll_reference += float(F.cross_entropy(reference, targets, reduction="sum"))
        self.nll_gguf += float(F.cross_entropy(gguf, targets, reduction="sum"))


@dataclass
class GGUFCheck:
    """The merged model against its GGUF, loaded back through transformers: teacher-forced on held-out answers
    (logits, top-1, eval loss) and greedy on the probe questions."""

    out_type: str
    tally: LogitTally
    greedy_same: int
    probes: int
    tokenizer_same: int
    rope_factors_ok: bool | None = None  # Llama 3's RoPE frequency factors as written (None: the model has none)

    @property
    def max_logit_diff(self) -> float:
        return self.tally.max_diff

    @property
    def top1_agreement(self) -> float:
        return self.tally.agree / max(self.tally.positions, 1)

    @property
    def decided_agreement(self) -> float | None:
        """Top-1 agreement where the merged model was decided; None where too few positions were."""
        return self.tally.decided_agree / self.tally.decided if self.tally.decided >= MIN_DECIDED else None

    @property
    def loss_reference(self) -> float:
        return self.tally.nll_reference / max(self.tally.positions, 1)

    @property
    def loss_gguf(self) -> float:
        return self.tally.nll_gguf / max(self.tally.positions, 1)

    @property
    def loss_delta(self) -> float:
        """The GGUF's eval loss relative to the merged model's (+0.01 = 1 % higher)."""
        return (self.loss_gguf - self.loss_reference) / max(self.loss_reference, 1e-8)

    @property
    def loss_change(self) -> float:
        return abs(self.loss_delta)

    @property
    def passed(self) -> bool:
        if self.rope_factors_ok is False:
            return False
        if self.out_type == "f16":
            return self.greedy_same == self.probes
        top1 = self.decided_agreement if self.decided_agreement is not None else self.top1_agreement
        return top1 >= Q8_MIN_TOP1 and self.loss_change <= Q8_MAX_LOSS_CHANGE

    def line(self) -> str:
        """One line: what was compared, the numbers, and whether it passed."""
        decided = ("" if self.decided_agreement is None else
                   f" ({self.decided_agreement:.1%} at the {self.tally.decided} tokens where the merged model leads by "
                   f">= {DECIDED_MARGIN:g} logit)")
        numbers = (f"max logit difference {self.max_logit_diff:.2e}, top-1 agreement {self.top1_agreement:.1%}"
                   f"{decided}, eval loss {self.loss_reference:.4f} -> {self.loss_gguf:.4f} ({self.loss_delta:+.2%}) "
                   f"on {self.tally.positions} held-out answer tokens, "
                   f"greedy continuation identical on {self.greedy_same}/{self.probes} probes")
        tokens = ("" if self.tokenizer_same == self.probes else
                  f"; the GGUF's tokenizer (as transformers rebuilds it) differs on "
                  f"{self.probes - self.tokenizer_same}/{self.probes} probes")
        if self.rope_factors_ok is not None:
            tokens += ("; Llama 3 RoPE factors as the model's" if self.rope_factors_ok else
                       "; the Llama 3 RoPE factors written differ from the model's")
        verdict = "check passed" if self.passed else "CHECK FAILED (the file is kept)"
        return f"{verdict}: {numbers}{tokens}."


# ------------------------------------------------------------------------------------------- checks


def check_exportable(config: Any, tokenizer: Any, out_type: str) -> str:
    """The llama.cpp architecture for `config`; else one GGUFExportError naming what is supported."""
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"Unknown GGUF type '{out_type}'; choose one of: {', '.join(OUT_TYPES)}.")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise GGUFExportError(f"GGUF export supports the {', '.join(SUPPORTED)} families (Llama/SmolLM2, Qwen2/2.5, "
                              f"Qwen3); this model is '{model_type}'. Use /export for a merged safetensors folder.")
    rope_type = _rope_type(config)
    if rope_type not in (None, "default") and not (rope_type == "llama3" and SUPPORTED[model_type] == "llama"):
        raise GGUFExportError(f"This model uses '{rope_type}' RoPE scaling, which GGUF export does not write (it "
                              "writes Llama 3's); use /export for a safetensors folder.")
    pre_tokenizer_name(tokenizer, SUPPORTED[model_type])
    return SUPPORTED[model_type]


def _rope_type(config: Any) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_type", "default") if isinstance(rope, dict) else "default"


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Llama 3.1/3.2's RoPE scaling as llama.cpp reads it: one factor per frequency, the plain RoPE frequency
    divided by the scaled one (`rope_freqs.weight`, as convert_hf_to_gguf.py writes it). Computed with transformers'
    own llama3 RoPE, so the factors are the ones the merged model runs with."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return _plain_over(config, scaled)


def _plain_over(config: Any, scaled: Any) -> np.ndarray:
    """Plain RoPE frequencies (rope_theta ** (-2i / d)) divided by `scaled`, per frequency."""
    import torch

    dim = int(scaled.shape[0]) * 2
    theta = _rope_theta(config)
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.detach().float().cpu()).numpy().astype(np.float32)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizers) tokenizer; this one is "
                              f"{type(tokenizer).__name__}.")
    return dict(json.loads(backend.to_str()))


def pre_tokenizer_name(tokenizer: Any, arch: str) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    data = _backend_json(tokenizer)
    model = data.get("model") or {}
    text = json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in text:
        raise GGUFExportError("GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2/3); this one is "
                              f"a {model.get('type')} tokenizer without byte-level pre-tokenization.")
    if _QWEN2_SPLIT in text.replace("\\\\", "\\"):
        return "qwen2"
    if _LLAMA3_SPLIT in text.replace("\\\\", "\\"):
        return "llama-bpe"
    if '"individual_digits": true' in text:
        return "smollm"  # SmolLM2: digits one by one, then GPT-2's byte-level split
    if "Split" not in text:
        return "gpt2"
    raise GGUFExportError("This tokenizer splits text with a pattern llama.cpp has no name for here; GGUF export "
                          "knows SmolLM2's, GPT-2's, Llama 3's and Qwen2's. Use /export for a safetensors folder.")


# ------------------------------------------------------------------------------------------- writing


def write_gguf(model: Any, tokenizer: Any, path: Path, out_type: str, name: str = "model") -> Path:
    """Write `model` (a merged, plain transformers model) and `tokenizer` to the GGUF file `path`."""
    import gguf

    config = model.config.get_text_config()
    arch = check_exportable(config, tokenizer, out_type)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    _add_hyper_parameters(writer, config, arch, out_type)
    _add_tokenizer(writer, tokenizer, config, arch)
    for gguf_name, array, qtype in _tensors(model, config, arch, out_type):
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    if _rope_type(config) == "llama3":
        writer.add_tensor(ROPE_FREQS, llama3_rope_factors(config), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hyper_parameters(writer: Any, config: Any, arch: str, out_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: Any, tokenizer: Any, config: Any, arch: str) -> None:
    import gguf

    size = len(tokenizer)
    if size > config.vocab_size:
        raise GGUFExportError(f"The tokenizer has {size} tokens but the model only {config.vocab_size} embeddings; "
                              "export the tokenizer the model was trained with.")
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index >= size:  # embedding rows with no token (padded vocabularies): llama.cpp names them the same way
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tokenizer.convert_ids_to_tokens(index))
        types.append(gguf.TokenType.CONTROL if index in special else
                     gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    merges = _backend_json(tokenizer)["model"].get("merges") or []
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, arch))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_space_prefix(False)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    if template:
        writer.add_chat_template(template)


def _tensors(model: Any, config: Any, arch: str, out_type: str) -> Any:
    """(GGUF name, array, GGML type) for every weight, in llama.cpp's layout."""
    import gguf
    import torch

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp (and transformers' loader) read a missing output.weight as tied embeddings
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise GGUFExportError(f"No GGUF name for the weight {hf_name}; this model's layout differs from the "
                                  f"{arch} family llama.cpp knows.")
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if arch == "llama" and stem.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            # llama.cpp's rotary embedding pairs neighbouring rows; HF's pairs the two halves of each head
            array = _permute_for_llama_cpp(array, heads, heads if stem.endswith("q_proj") else kv_heads)
        yield f"{gguf_stem}.{suffix}", *_encode(array, out_type)


def _permute_for_llama_cpp(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute` (transformers' loader applies the inverse)."""
    if heads != kv_heads:
        heads = kv_heads
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(array: np.ndarray, out_type: str) -> tuple[np.ndarray, Any]:
    import gguf

    kind = gguf.GGMLQuantizationType
    if array.ndim == 1:  # norms and biases stay f32, as in every llama.cpp file type
        return np.ascontiguousarray(array, dtype=np.float32), kind.F32
    if out_type == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(np.ascontiguousarray(array), kind.Q8_0), kind.Q8_0
    return np.ascontiguousarray(array, dtype=np.float16), kind.F16


# ------------------------------------------------------------------------------------------- the check


def probe_prompts(tokenizer: Any, system_prompt: str | None) -> list[list[int]]:
    """The probe questions as the chat renders them (system prompt included), ready for generation."""
    prompts = []
    for question in PROBES:
        chat = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(ids["input_ids"]))
    return prompts


def load_gguf(path: Path, config: Any) -> Any:
    """The GGUF through transformers' loader, dequantized to float32 (what `transformers serve` runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    extra: dict[str, Any] = {}
    if _rope_type(config) == "llama3":
        # transformers' GGUF loader reads no RoPE scaling (the factors are checked on their own: `rope_factors_ok`)
        extra["rope_parameters"] = dict(config.rope_parameters)
    if config.model_type == "qwen3":  # transformers reads no head size from a Qwen3 GGUF and assumes 128
        extra["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True, **extra)


def verify_gguf(reference: Any, tokenizer: Any, path: Path, out_type: str, system_prompt: str | None = None,
                stop_ids: list[int] | None = None) -> GGUFCheck:
    """Load `path` back and compare it with `reference` (the merged model): teacher-forced on held-out answers
    (CHECK_ROWS, with the agent's system prompt), greedy on the probe questions."""
    from transformers import AutoTokenizer

    from hfmodel.held_out import CHECK_ROWS, with_system_prompt

    loaded = load_gguf(path, reference.config.get_text_config())
    loaded.to(next(reference.parameters()).device)
    tally = compare_on_rows(reference, loaded, tokenizer, with_system_prompt(CHECK_ROWS, system_prompt))
    prompts = probe_prompts(tokenizer, system_prompt)
    same = greedy_same(reference, loaded, tokenizer, prompts, stop_ids or [tokenizer.eos_token_id])
    del loaded
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    texts = [tokenizer.decode(p) for p in prompts]
    tokenizer_same = sum(gguf_tokenizer(t, add_special_tokens=False)["input_ids"] ==
                         tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    return GGUFCheck(out_type, tally, same, len(prompts), tokenizer_same, _rope_factors_ok(path, reference))


def _rope_factors_ok(path: Path, reference: Any) -> bool | None:
    """For Llama 3 RoPE: the factors in the file against the model's; None for a model without them."""
    import gguf
    import torch

    config = reference.config.get_text_config()
    if _rope_type(config) != "llama3":
        return None
    written = next((t for t in gguf.GGUFReader(path).tensors if t.name == ROPE_FREQS), None)
    if written is None:
        return False
    rotary = next((m for m in reference.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
    # What the merged model really runs with (its rotary embedding's frequencies), else what its config says.
    expected = _plain_over(config, rotary.inv_freq) if rotary is not None else llama3_rope_factors(config)
    return bool(np.allclose(np.asarray(written.data, dtype=np.float32), expected, rtol=1e-5))


def compare_on_rows(reference: Any, loaded: Any, tokenizer: Any, rows: list[list[dict[str, str]]]) -> LogitTally:
    """Both models teacher-forced on `rows`, scored on each row's answer tokens (real text, not either model's own
    continuation: a model's loss on its own greedy tokens is small and any change to it looks large)."""
    import torch

    from hfmodel.int8 import reply_batch

    device = next(reference.parameters()).device
    tally = LogitTally()
    with torch.inference_mode():
        for start in range(0, len(rows), CHECK_BATCH):
            ids, mask, labels = (t.to(device) for t in reply_batch(tokenizer, rows[start:start + CHECK_BATCH]))
            scored = labels[:, 1:] != -100
            logits_ref = reference(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
            logits_got = loaded(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
            tally.add(logits_ref, logits_got, labels[:, 1:][scored])
    return tally


def greedy_same(reference: Any, loaded: Any, tokenizer: Any, prompts: list[list[int]], stop: list[int]) -> int:
    """How many probe prompts both models continue greedily with the same PROBE_TOKENS tokens."""
    import torch
    from transformers import GenerationConfig

    device = next(reference.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    # One explicit greedy setting for both: the merged model's generation_config.json (a repetition penalty, say)
    # must not make its continuation differ from the GGUF's, which comes with none.
    greedy = GenerationConfig(max_new_tokens=PROBE_TOKENS, do_sample=False, eos_token_id=stop, pad_token_id=pad)
    same = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
            got = loaded.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
            same += int(torch.equal(expected, got))
    return same


# ------------------------------------------------------------------------------------------- Modelfile, README

# Ollama's own ChatML template (SmolLM2, Qwen2/2.5 without tools): the one family whose template is known here.
CHATML_OLLAMA_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


def is_plain_chatml(tokenizer: Any) -> bool:
    """A ChatML template without tools, whose Ollama equivalent is CHATML_OLLAMA_TEMPLATE."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return "<|im_start|>" in template and "tools" not in template


def modelfile_text(gguf_name: str, tokenizer: Any, system_prompt: str | None, temperature: float | None,
                   top_p: float | None, stop_tokens: list[str]) -> str:
    """An Ollama Modelfile: FROM, SYSTEM, stop tokens and sampling; TEMPLATE where the family's is known."""
    lines = [f"FROM ./{gguf_name}"]
    if is_plain_chatml(tokenizer):
        lines.append(f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""')
    else:
        lines.append("# No TEMPLATE: Ollama uses the chat template stored in the GGUF (tokenizer.chat_template).")
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt.replace(chr(34) * 3, chr(39) * 3)}"""')
    for token in stop_tokens:
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and math.isfinite(value):
            lines.append(f"PARAMETER {key} {value:g}")
    return "\n".join(lines) + "\n"


def readme_text(folder_name: str, gguf_name: str, check: GGUFCheck | None, templated: bool) -> str:
    """How to run the export: Ollama, llama.cpp, `transformers serve`."""
    result = check.line() if check else "not checked"
    template = ("the Modelfile sets Ollama's ChatML TEMPLATE" if templated else
                "Ollama and llama.cpp use the chat template stored in the GGUF")
    return f"""# {folder_name}

`{gguf_name}`: the merged model (base + adapter) as GGUF, written by this project ({template}).
Check after writing (loaded back with transformers, compared with the merged model): {result}

## Ollama

    ollama create {folder_name} -f Modelfile
    ollama run {folder_name}

## llama.cpp

    llama-cli -m {gguf_name} -cnv
    llama-server -m {gguf_name} --host 127.0.0.1 --port 8080

## transformers serve (OpenAI-compatible, http://127.0.0.1:8000/v1)

    transformers serve "$PWD:{gguf_name}" --host 127.0.0.1 --port 8000

Clients name the model `$PWD:{gguf_name}` (the folder's absolute path, a colon, the file).
"""


def stop_token_texts(tokenizer: Any, stop_ids: list[int]) -> list[str]:
    """The stop tokens as text (for Modelfile PARAMETER stop), each once."""
    texts: list[str] = []
    for token_id in stop_ids:
        text = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(text, str) and text not in texts:
            texts.append(text)
    return texts


# ------------------------------------------------------------------------------------------- the whole folder


@dataclass
class GGUFExport:
    """What `export_folder` wrote and how the check went."""

    folder: Path
    gguf_path: Path
    check: GGUFCheck

    @property
    def size_mb(self) -> float:
        return self.gguf_path.stat().st_size / 1e6


def check_destination(dest: Path) -> None:
    """A new (or empty) folder that can be written: else one line, before any work is done."""
    from hfmodel.common import check_writable_folder

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GGUFExportError(f"{dest} already exists and is not an empty folder; choose a new folder.")
    check_writable_folder(dest, "GGUF export folder")


def export_folder(merged: Any, tokenizer: Any, dest: Path, out_type: str, system_prompt: str | None = None,
                  temperature: float | None = None, top_p: float | None = None,
                  stop_ids: list[int] | None = None) -> GGUFExport:
    """`dest`/model-<type>.gguf + Modelfile + README.md from a merged model; the GGUF is checked after writing."""
    from hfmodel.common import atomic_folder, write_text_atomic

    check_exportable(merged.config.get_text_config(), tokenizer, out_type)
    check_destination(dest)
    gguf_name = f"model-{out_type}.gguf"
    stops = stop_ids or [tokenizer.eos_token_id]
    with atomic_folder(dest) as tmp:
        write_gguf(merged, tokenizer, tmp / gguf_name, out_type, name=dest.name)
        (tmp / "Modelfile").write_text(modelfile_text(gguf_name, tokenizer, system_prompt, temperature, top_p,
                                                      stop_token_texts(tokenizer, stops)), encoding="utf-8")
    check = verify_gguf(merged, tokenizer, dest / gguf_name, out_type, system_prompt, stops)
    write_text_atomic(dest / "README.md", readme_text(dest.name, gguf_name, check, is_plain_chatml(tokenizer)))
    return GGUFExport(dest, dest / gguf_name, check)
