"""Rough peak GPU memory of LoRA / QLoRA fine-tuning (`python finetune.py --estimate-memory`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only transformer's config.json."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = True

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes())
        if self.qkv_bias:
            per_layer += self.hidden + 2 * self.kv_dim
        return per_layer * self.layers

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (if untied) and RMSNorms: not quantized by bitsandbytes."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, rank: int) -> int:
        return rank * sum(a + b for a, b in self.linear_shapes()) * self.layers


# Shapes from the models' config.json. The 70B row uses Llama-3.1-70B (Qwen2.5's largest is 72B).
MODEL_SHAPES: dict[float, ModelShape] = {
    0.5: ModelShape("Qwen2.5-0.5B", 896, 24, 4864, 14, 2, 151936, tied=True),
    1.5: ModelShape("Qwen2.5-1.5B", 1536, 28, 8960, 12, 2, 151936, tied=True),
    7: ModelShape("Qwen2.5-7B", 3584, 28, 18944, 28, 4, 152064, tied=False),
    14: ModelShape("Qwen2.5-14B", 5120, 48, 13824, 40, 8, 152064, tied=False),
    70: ModelShape("Llama-3.1-70B", 8192, 80, 28672, 64, 8, 128256, tied=False, qkv_bias=False),
}

GIB = 1024**3
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8  # 4-bit codes + double-quantised absmax (8-bit per 64, fp32 per 256 blocks)


def shape_for(params_billion: float) -> ModelShape:
    """The listed shape for a listed size; otherwise the nearest one with hidden/intermediate scaled."""
    if params_billion in MODEL_SHAPES:
        return MODEL_SHAPES[params_billion]
    if params_billion <= 0:
        raise ValueError(f"params_billion must be > 0, got {params_billion}")
    ref = min(MODEL_SHAPES.values(), key=lambda s: abs(math.log(s.params / (params_billion * 1e9))))
    # Scale width so the non-embedding params match: linear params grow with hidden^2 at fixed depth.
    target_linear = max(params_billion * 1e9 - ref.other_params, 0.05 * params_billion * 1e9)
    scale = math.sqrt(target_linear / ref.linear_params)
    step = ref.hidden // ref.heads
    hidden = max(step, int(round(ref.hidden * scale / step)) * step)
    return ModelShape(f"~{params_billion:g}B ({ref.name}-like)", hidden, ref.layers,
                      max(8, int(ref.intermediate * hidden / ref.hidden)), hidden // step,
                      min(ref.kv_heads, hidden // step), ref.vocab, ref.tied, ref.qkv_bias)


def estimate_memory(params_billion: float, method: str = "lora", seq_len: int = 2048, batch: int = 1,
                    lora_rank: int = 16, activation_checkpointing: bool = False, act_factor: float = 34.0,
                    shards: int = 1) -> dict[str, Any]:
    """Rough peak GPU memory (GiB) of LoRA / QLoRA fine-tuning on one GPU (or per GPU when sharded).

    Assumptions (each term is a returned key; total = their sum):
    - weights: LoRA keeps the frozen base in bf16 (2 bytes/param). QLoRA stores the linear layers of
      the decoder as NF4 with double quantisation (0.5 byte/param + ~0.016 for the quantisation
      constants); embeddings, lm_head and norms are not quantized, and `prepare_model_for_kbit_training`
      (called by HuggingFaceWrapper for quantized bases) upcasts them to fp32 (4 bytes/param).
    - lora_params: LoRA A and B on every linear layer of every decoder layer ("all-linear": q, k, v, o,
      gate, up, down; not lm_head), rank r: r x (in + out) per layer; fp32 (peft upcasts adapters).
    - optimizer: AdamW, two fp32 moments per trainable param (8 bytes); no master copy (already fp32).
    - gradients: fp32, trainable params only (4 bytes/param); frozen weights get none.
    - activations: per decoder layer ~ seq x batch x hidden x `act_factor` bytes, act_factor 34 for bf16
      with SDPA/flash attention (Korthikanti et al. 2022, "Reducing Activation Recomputation": 34*s*b*h,
      the 5*a*s^2*b attention-score term dropped because flash/SDPA kernels do not store it). With
      activation checkpointing only each layer's input (2*s*b*h bytes) is kept, plus one layer's full
      activations during recomputation. Plus the logits: seq x batch x vocab x 8 bytes (fp32 logits
      for the loss and their gradient). Rough: expect +-30 %.
    - shards > 1 (FSDP full shard / DeepSpeed ZeRO-3 over `shards` GPUs) divides weights, LoRA params,
      gradients and optimizer state by `shards`; activations are per GPU and unchanged. DDP and ZeRO-2
      keep a full copy of the weights on every GPU (shards=1; ZeRO-2 only splits the tiny LoRA state).
    Not included: the CUDA context and allocator slack (add ~1-2 GiB), KV caches for evaluation with
    generation, and dataloader/tokenizer memory on the host.

    Model shapes: Qwen2.5 0.5B/1.5B/7B/14B and Llama-3.1-70B for 70 (see MODEL_SHAPES); other sizes
    use the nearest shape with its width scaled to match the parameter count.
    """
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora' or 'qlora', got {method!r}")
    if min(seq_len, batch, lora_rank, shards) < 1:
        raise ValueError("seq_len, batch, lora_rank and shards must be >= 1")
    shape = shape_for(params_billion)
    if method == "lora":
        weight_bytes = shape.params * 2.0
    else:
        weight_bytes = shape.linear_params * NF4_BYTES_PER_PARAM + shape.other_params * 4.0
    lora = shape.lora_params(lora_rank)
    tokens = seq_len * batch
    if activation_checkpointing:
        layer_bytes = tokens * shape.hidden * (2.0 * shape.layers + act_factor)
    else:
        layer_bytes = tokens * shape.hidden * act_factor * shape.layers
    activation_bytes = layer_bytes + tokens * shape.vocab * 8.0
    out: dict[str, Any] = {
        "model": shape.name,
        "params_billion": round(shape.params / 1e9, 2),
        "method": method,
        "trainable_params": lora,
        "weights": weight_bytes / shards / GIB,
        "lora_params": lora * 4.0 / shards / GIB,
        "optimizer": lora * 8.0 / shards / GIB,
        "gradients": lora * 4.0 / shards / GIB,
        "activations": activation_bytes / GIB,
    }
    out["total"] = sum(out[k] for k in ("weights", "lora_params", "optimizer", "gradients", "activations"))
    return out


TABLE_SIZES = (0.5, 1.5, 7, 14, 70)


def memory_table(seq_len: int = 2048, batch: int = 1, lora_rank: int = 16,
                 activation_checkpointing: bool = False) -> str:
    """Markdown table of `estimate_memory` for the 5 sizes under LoRA (bf16 base) and QLoRA (NF4 base)."""
    lines = [
        f"Estimated peak GPU memory, GiB (seq {seq_len}, batch {batch}, LoRA r={lora_rank} on all linear layers, "
        f"AdamW; activation checkpointing {'on' if activation_checkpointing else 'off'}; add ~1-2 GiB CUDA context)",
        "",
        "| Model | Params | Method | Weights | LoRA | Optimizer | Gradients | Activations | Total |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in TABLE_SIZES:
        for method, label in (("lora", "LoRA (bf16)"), ("qlora", "QLoRA (NF4)")):
            m = estimate_memory(size, method, seq_len, batch, lora_rank, activation_checkpointing)
            lines.append(
                f"| {m['model']} | {m['params_billion']:.2f}B | {label} | {m['weights']:.1f} | "
                f"{m['lora_params']:.2f} | {m['optimizer']:.2f} | {m['gradients']:.2f} | "
                f"{m['activations']:.1f} | {m['total']:.1f} |"
            )
    return "\n".join(lines)


