"""int8 serving weights on the CPU (`"quantization": "int8"`): every linear layer and the LM head hold int8 weights
with one scale per output channel, and multiply through `torch._weight_int8pack_mm` with bf16 activations.

Why this shape (measured on an AVX512-BF16 CPU, SmolLM2-135M, torch 2.13): decode at batch 1 reads every weight
once per token, so it is bound by memory bandwidth; a quarter of the bytes gives 1.7-1.9x fp32 tokens/s. The same
op with fp32 activations has no kernel (10x slower) and dequantise + fp32 linear is 6x slower: the bf16 path is
the only fast one, so a CPU without native bf16 keeps fp32 (one warning).

- LoRA adapters stay in fp32 beside the int8 base: `Int8Linear` is an `nn.Linear` to peft, which wraps it like any
  linear layer and adds its fp32 LoRA branch to the int8 layer's output; switching adapters is peft's own switch.
- The LM head of a tied model shares its int8 rows with the embedding (`Int8Embedding` looks rows up and scales
  them), so the 49152 x 576 table is stored once, in int8.
- Fine-tuning trains on the full-precision base: `full_precision` reloads the fp32 weights from where they came
  from for the length of the run (each layer's `weight` is then the fp32 tensor, so trl's fused LM head and the
  backward see the real weights) and drops them afterwards.
- When it loads, `check_against` compares the int8 model with the fp32 one on held-out rows (loss within 1 %)
  and greedy tokens, and logs one line; a model that misses the bound keeps its fp32 weights (one warning).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfmodel.common import PROJECT_DIR, logger

INT8 = "int8"
GROUP = 16  # the kernel needs K (in_features) a multiple of 16 (measured: other widths return garbage)
LOSS_TOLERANCE = 0.01  # int8 eval loss at most 1 % above fp32's, else the model serves fp32
GREEDY_TOKENS = 16  # greedy tokens compared at load (about a second on SmolLM2)
# Above this many rows (a prompt's prefill) the kernel, made for matrix x vector, is slower than fp32 (measured at
# 576 x 1536: 6.5 ms against 3.6 ms fp32 for 64 rows); the int8 rows are then converted to bf16 for one matmul (3 ms).
KERNEL_ROWS = 32
BUNDLED_EVAL_ROWS = PROJECT_DIR / "data" / "ember_eval.jsonl"
HELD_OUT_ROWS = [  # for models other than the bundled one: short general exchanges none of our data trains on
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Name three primary colours."},
     {"role": "assistant", "content": "Red, yellow and blue are the three primary colours."}],
    [{"role": "user", "content": "How many days are there in a week?"},
     {"role": "assistant", "content": "There are seven days in a week."}],
    [{"role": "user", "content": "Give me a synonym for happy."},
     {"role": "assistant", "content": "A synonym for happy is cheerful."}],
    [{"role": "user", "content": "What do bees make?"},
     {"role": "assistant", "content": "Bees make honey and beeswax."}],
    [{"role": "user", "content": "Write one sentence about the sea."},
     {"role": "assistant", "content": "The sea stretches to the horizon, grey and restless under the wind."}],
    [{"role": "user", "content": "What is 12 divided by 4?"},
     {"role": "assistant", "content": "12 divided by 4 is 3."}],
    [{"role": "user", "content": "Why do we need sleep?"},
     {"role": "assistant", "content": "Sleep lets the body recover and helps the brain store what it learned during "
                                      "the day."}],
    [{"role": "user", "content": "Suggest a name for a small black cat."},
     {"role": "assistant", "content": "How about Pepper? It is short, friendly and suits a small black cat."}],
    [{"role": "user", "content": "How do I boil an egg?"},
     {"role": "assistant", "content": "Put the egg in boiling water for about eight minutes, then cool it in cold "
                                      "water before peeling."}],
]
GREEDY_PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


# =============================================================================================
# Is int8 possible here?


def int8_unavailable_reason() -> str | None:
    """Why this CPU cannot serve int8 fast (None = it can): no native bf16, or no `_weight_int8pack_mm` kernel."""
    from hfmodel.common import cpu_has_bf16

    if not cpu_has_bf16():
        return "this CPU has no native bf16 (AVX512-BF16 or AMX), which the int8 kernel's fast path needs"
    try:
        q, scales = quantize_rows(torch.randn(32, 64))
        out = torch._weight_int8pack_mm(torch.randn(2, 64, dtype=torch.bfloat16), q, scales)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return f"this torch build has no CPU int8 kernel ({str(e).splitlines()[0][:120]})"
    if out.shape != (2, 32):
        return "this torch build's int8 kernel gave the wrong shape"
    return None


def int8_wanted(device: torch.device) -> bool:
    """`"quantization": "int8"` was set: True where it can serve, else one warning and False (fp32 serves)."""
    if device.type != "cpu":
        from hfmodel.common import ModelLoadError

        raise ModelLoadError(f'quantization="int8" serves int8 weights on the CPU, and this device is {device.type}. '
                             'On CUDA use "8bit" or "4bit" (bitsandbytes), or set "device": "cpu".')
    reason = int8_unavailable_reason()
    if reason:
        logger.warning('quantization="int8" ignored: %s; serving fp32 weights.', reason)
        return False
    return True


# =============================================================================================
# The layers


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): (int8 [N, K], bf16 scales [N]) with weight ~ int8 * scale."""
    w = weight.detach().float()
    scale = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).clamp(min=1e-12) / 127.0
    # The kernel takes bf16 scales: round each scale UP to bf16 so no row overflows +-127 after the rounding.
    scale_bf16 = scale.to(torch.bfloat16)
    low = scale_bf16.float() < scale
    scale_bf16[low] = torch.nextafter(scale_bf16[low], torch.full_like(scale_bf16[low], float("inf")))
    scaled = w * (1.0 / scale_bf16.float())[:, None]  # one full-size temporary, rounded in place
    q = scaled.round_().clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale_bf16.contiguous()


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


class Int8Linear(nn.Linear):
    """A linear layer with int8 weights (per output channel scales); bf16 activations in, `out_dtype` out.

    `weight` is the int8 tensor while serving (peft reads its shape and device) and the fp32 weight while
    `full_precision` holds it; `qweight` and `scales` always hold the int8 form."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None, out_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a float weight first
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.bias = bias  # type: ignore[assignment]  # nn.Linear declares it without None
        self.out_dtype = out_dtype

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8Linear:
        q, scales = quantize_rows(layer.weight)
        return cls(q, scales, layer.bias, layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.int8:  # full precision (training)
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] <= KERNEL_ROWS:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:  # exact in bf16 (|int8| < 256), scaled after the product
            y = F.linear(flat, self.qweight.to(torch.bfloat16)) * self.scales
        y = y.to(self.out_dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, bias={self.bias is not None}"


class Int8Embedding(nn.Embedding):
    """An embedding table in int8 rows (the tied LM head's rows and scales): a lookup dequantises the rows it reads."""

    def __init__(self, head: Int8Linear, original: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = head.qweight.shape
        self.padding_idx, self.max_norm = original.padding_idx, None
        self.norm_type, self.scale_grad_by_freq, self.sparse = 2.0, False, False
        self.head = [head]  # a list: not a submodule, so the head is not registered twice
        self.weight = head.weight  # the same Parameter: tied as before

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        if head.weight.dtype != torch.int8:
            return F.embedding(ids, head.weight, self.padding_idx)
        return head.qweight[ids].to(head.out_dtype) * head.scales[ids].to(head.out_dtype).unsqueeze(-1)


# =============================================================================================
# Quantising a model, and undoing it


@dataclass
class Int8Weights:
    """Which layers of the handle's model serve int8 (name -> Int8Linear; the tied embedding's name, if any)."""

    layers: dict[str, Int8Linear] = field(default_factory=dict)
    tied_embedding: str | None = None
    originals: dict[str, nn.Module] = field(default_factory=dict)  # kept until the load check passes

    def nbytes(self) -> int:
        return sum(layer.qweight.nbytes + layer.scales.nbytes for layer in self.layers.values())


def _quantizable(name: str, module: nn.Module) -> bool:
    # Exactly nn.Linear: peft's LoRA layers and their lora_A / lora_B matrices stay as they are.
    parts = name.split(".")
    return (type(module) is nn.Linear and not any(p.startswith("lora_") for p in parts)
            and module.in_features % GROUP == 0 and module.weight.dtype.is_floating_point)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: Any) -> Int8Weights:
    """Replace every linear layer (and the LM head, tied or not) of a transformers model by `Int8Linear`, in
    place; a tied input embedding becomes the head's `Int8Embedding`. The replaced modules are kept in
    `originals` (call `restore` or `drop_originals`)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    names = {id(m): n for n, m in model.named_modules()}
    weights = Int8Weights()
    for name, module in list(model.named_modules()):
        if _quantizable(name, module):
            weights.originals[name] = module
            weights.layers[name] = Int8Linear.from_linear(module)
            _set(model, name, weights.layers[name])
    head_name = names.get(id(head))
    if tied and head_name in weights.layers:
        embedding_name = names[id(embedding)]
        weights.originals[embedding_name] = embedding
        _set(model, embedding_name, Int8Embedding(weights.layers[head_name], embedding))
        weights.tied_embedding = embedding_name
    return weights


def restore(model: Any, weights: Int8Weights) -> None:
    """Put the original (full-precision) modules back."""
    for name, module in weights.originals.items():
        _set(model, name, module)
    weights.layers.clear()
    weights.originals.clear()


@contextmanager
def full_precision(handle: Any) -> Iterator[None]:
    """For the block (a fine-tune): every int8 layer multiplies with its fp32 weight, reloaded from the model's
    source; afterwards the fp32 copies are dropped and the layers serve int8 again."""
    weights: Int8Weights | None = handle.int8
    if weights is None or not weights.layers:
        yield
        return
    started = time.perf_counter()
    full = full_precision_weights(handle, list(weights.layers))
    for name, layer in weights.layers.items():
        layer.weight = nn.Parameter(full[name], requires_grad=False)
    if weights.tied_embedding:
        embedding = handle.base_model().get_submodule(weights.tied_embedding)
        embedding.weight = embedding.head[0].weight
    logger.info("int8 serving: training on the fp32 weights (reloaded in %.1f s).", time.perf_counter() - started)
    try:
        yield
    finally:
        for layer in weights.layers.values():
            layer.weight = nn.Parameter(layer.qweight, requires_grad=False)
        if weights.tied_embedding:
            embedding = handle.base_model().get_submodule(weights.tied_embedding)
            embedding.weight = embedding.head[0].weight
        del full
        trim_heap()


def full_precision_weights(handle: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """The full-precision weights of layers `names`, loaded again from the handle's source (nothing else kept)."""
    from hfmodel.loading import load_weights

    fresh = load_weights(handle.source, handle)
    try:
        return {name: fresh.get_submodule(name).weight.detach() for name in names}
    finally:
        del fresh


# =============================================================================================
# The check at load


@dataclass
class Int8Check:
    loss_fp32: float
    loss_int8: float
    agree: int  # leading greedy tokens that match
    compared: int
    bytes_fp32: int
    bytes_int8: int

    @property
    def loss_change(self) -> float:
        return self.loss_int8 / self.loss_fp32 - 1.0

    @property
    def passed(self) -> bool:
        return self.loss_change <= LOSS_TOLERANCE

    def line(self) -> str:
        return (f"int8 serving weights: eval loss {self.loss_int8:.4f} vs {self.loss_fp32:.4f} fp32 "
                f"({self.loss_change:+.2%}, bound +{LOSS_TOLERANCE:.0%}); greedy tokens {self.agree}/{self.compared} "
                f"agree; quantised layers {self.bytes_int8 / 2**20:.0f} MB vs {self.bytes_fp32 / 2**20:.0f} MB")


def held_out_rows(bundled: bool) -> list[list[dict[str, str]]]:
    """The project's eval rows for the bundled model (when present), else HELD_OUT_ROWS."""
    if bundled and BUNDLED_EVAL_ROWS.exists():
        lines = BUNDLED_EVAL_ROWS.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["messages"] for line in lines if line.strip()]
    return HELD_OUT_ROWS


def reply_batch(tokenizer: Any, rows: list[list[dict[str, str]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of `rows`, right-padded into one batch; the labels are each row's last
    (assistant) turn, -100 elsewhere."""
    encoded = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(row[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        if len(ids) > len(prompt) and ids[:len(prompt)] == prompt:  # else the template rewrites earlier turns
            encoded.append((ids, len(prompt)))
    width = max((len(ids) for ids, _ in encoded), default=1)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, start) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, start:len(ids)] = input_ids[i, start:len(ids)]
    return input_ids, mask, labels


@torch.inference_mode()
def reply_loss(model: Any, tokenizer: Any, rows: list[list[dict[str, str]]]) -> float:
    """Token-weighted cross-entropy of each row's last (assistant) turn given the turns before it (one batch)."""
    input_ids, mask, labels = reply_batch(tokenizer, rows)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()


@torch.inference_mode()
def greedy_tokens(model: Any, tokenizer: Any, n: int = GREEDY_TOKENS) -> list[int]:
    enc = tokenizer.apply_chat_template(GREEDY_PROMPT, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return [int(t) for t in out[0, enc["input_ids"].shape[1]:]]


def layer_bytes(modules: Any) -> list[int]:
    """The bytes of each distinct weight of `modules` (a tied head and embedding count once)."""
    weights: dict[int, int] = {}
    for module in modules:
        weight = module.weight
        weights[weight.data_ptr()] = weight.nbytes
    return list(weights.values())


def _leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def quantize_checked(model: Any, tokenizer: Any, bundled: bool) -> tuple[Int8Weights | None, Int8Check]:
    """Quantise `model` in place and compare it with its fp32 self; keep int8 only within LOSS_TOLERANCE."""
    rows = held_out_rows(bundled)
    loss_fp32, greedy_fp32 = reply_loss(model, tokenizer, rows), greedy_tokens(model, tokenizer)
    weights = quantize_model(model)
    bytes_fp32 = sum(layer_bytes(weights.originals.values()))
    check = Int8Check(loss_fp32, reply_loss(model, tokenizer, rows), 0, len(greedy_fp32), bytes_fp32,
                      weights.nbytes())
    check.agree = _leading_agreement(greedy_fp32, greedy_tokens(model, tokenizer))
    if not check.passed:
        restore(model, weights)
        return None, check
    weights.originals.clear()  # the fp32 layers go; training reloads them from the source
    release_file_mapping(model)
    return weights, check


def release_file_mapping(model: Any) -> None:
    """Copy the float tensors left (norms, biases, buffers) out of the weights file that transformers maps into
    memory: while any tensor views the mapping, the pages of the fp32 layers it read stay resident (517 MB for
    SmolLM2). Then hand freed heap pages back to the system."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap pages freed by a load or a training run back to the system (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its pages, nothing else changes
        pass
