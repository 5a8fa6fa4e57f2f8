"""Every patch of trl / transformers / accelerate / peft internals, in one file: re-read it on each upgrade.

Each entry names the library version it was checked against and the measurement that justifies it.
The patches are context managers that restore the library's own behaviour on exit; `switch_adapter` sets peft's
own per-layer state directly (and uses peft's calls for any model it does not recognise).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

PACKED_ATTENTION = "sdpa_per_sequence"
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # trl's padding-free batch keys


MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix saves too little to be worth the bookkeeping


class _SharedPrefix(threading.local):
    """Set by `shared_prefix_forward` for one decoder forward: the packed row is cut into pieces at `bounds` (each
    shared prefix once, then each sequence's rest); `after[i]` is the (start, end) of the prefix piece i attends to
    before itself, or None."""

    bounds: list[int] | None = None
    after: list[tuple[int, int] | None] = []


_shared = _SharedPrefix()


def sdpa_per_sequence(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA run once per sequence of a padding-free (packed) batch, in fp32.

    Checked against transformers 5.24 (`AttentionInterface`, `sdpa_attention_forward`) and trl 1.16 (which
    passes `cu_seq_lens_q` for padding-free batches). For a packed row transformers builds one block-diagonal
    mask, and the CPU kernel then computes the whole L x L square (8 rows of ~55 tokens: 12.8 ms per layer,
    forward + backward). Each sequence on its own with `is_causal` gives the same result from the diagonal
    blocks only (5.5 ms; in fp32, because this CPU kernel is slower in bf16): fine-tuning SmolLM2 on 2 cores
    went from 240 to 268 tokens/s. Batches without `cu_seq_lens_q` (generation, padded batches) go to the
    usual SDPA unchanged. Inside `shared_prefix_forward` the pieces are those it cut (`_shared`): each shared
    prefix, then every sequence's rest, which attends to its prefix's keys and values first.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = _shared.bounds
    bounds = kwargs.get("cu_seq_lens_q")
    if shared is None and (bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for packing_key in (*PACKING_KEYS, "position_ids", "is_causal"):
        kwargs.pop(packing_key, None)
    edges = shared if shared is not None else bounds.tolist() if bounds is not None else []
    after = _shared.after if shared is not None else [None] * (len(edges) - 1)
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        qs, ks, vs = (_pieces(x, edges) for x in (q, k, v))
        start_of = {start: i for i, start in enumerate(edges[:-1])}
        parts = []
        for i, prefix in enumerate(after):
            if prefix is None:
                parts.append(sdpa_attention_forward(module, qs[i], ks[i], vs[i], None, is_causal=True, **kwargs)[0])
            else:
                j = start_of[prefix[0]]
                parts.append(_attend_after(module, prefix[1] - prefix[0], qs[i], torch.cat([ks[j], ks[i]], dim=2),
                                           torch.cat([vs[j], vs[i]], dim=2), **kwargs))
    return torch.cat(parts, dim=1).to(query.dtype), None


def _pieces(x: torch.Tensor, edges: list[int]) -> list[torch.Tensor]:
    """`x` cut along the sequence at `edges` (0 ... length) by one split: its backward is one concatenation, where
    a slice per piece would zero-fill a tensor of the whole length per piece and add them up (30 layers x 3
    tensors x each piece; 0.6 s of a 16.3 s SmolLM2 step profiled, 1 thread, busy machine)."""
    return list(x.split([b - a for a, b in zip(edges[:-1], edges[1:], strict=True)], dim=2))


def _attend_after(module: torch.nn.Module, shared: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  **kwargs: Any) -> torch.Tensor:
    """One sequence's attention over the shared prefix's `shared` keys, then causally over its own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = q.shape[2]
    mask = torch.ones(n, shared + n, dtype=torch.bool, device=q.device)
    mask[:, shared:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return sdpa_attention_forward(module, q, k, v, mask[None, None], **kwargs)[0]  # 4-d: GQA's 1-query shortcut


def _common_length(ids: torch.Tensor, start: int, others: list[int], limit: int) -> list[int]:
    """For each start in `others`: how many first tokens (at most `limit`) it has in common with `start`'s."""
    rows = torch.stack([ids[a:a + limit] for a in others])
    differ = rows != ids[start:start + limit]
    first = torch.where(differ.any(dim=1), differ.float().argmax(dim=1), torch.full_like(differ[:, 0], limit,
                                                                                        dtype=torch.long))
    return [int(n) for n in first]


def _shared_prefixes(ids: torch.Tensor, edges: list[int]) -> list[tuple[int, int]]:
    """Group the packed sequences by the prefix they share (at least MIN_SHARED_PREFIX tokens, at most all but a
    member's last token): per sequence, (index of its group's first sequence, tokens shared), or (i, 0) alone.
    Greedy in order: each sequence joins the first group whose first sequence starts like it."""
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    plan: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(spans):
        leaders = [j for j, (lead, _) in enumerate(plan) if lead == j]
        limit = b - a - 1
        common = _common_length(ids, a, [spans[j][0] for j in leaders], limit) if leaders and limit > 0 else []
        match = next((j for j, n in zip(leaders, common, strict=True) if n >= MIN_SHARED_PREFIX), None)
        plan.append((i, limit) if match is None else (match, min(common[leaders.index(match)], limit)))
    # A group's prefix: the shortest any member shares with its first sequence, and never all of the first one
    # (whose own entry holds its length - 1).
    for lead in [i for i, (g, _) in enumerate(plan) if g == i]:
        group = [m for m, (g, _) in enumerate(plan) if g == lead]
        shared = min(plan[m][1] for m in group) if len(group) > 1 else 0
        for m in group:
            plan[m] = (lead, shared)
    return [(lead, n if n >= MIN_SHARED_PREFIX else 0) for lead, n in plan]


def _saved_tokens(plan: list[tuple[int, int]]) -> int:
    """How many packed tokens running each shared prefix of `_shared_prefixes`' plan once saves."""
    return sum(n for i, (lead, n) in enumerate(plan) if lead != i)


def _checkpointing(decoder: torch.nn.Module) -> bool:
    layers = getattr(decoder, "layers", None)
    modules = layers if isinstance(layers, torch.nn.ModuleList) else decoder.modules()
    return getattr(decoder, "gradient_checkpointing", False) or any(
        getattr(m, "gradient_checkpointing", False) for m in modules)


def _forward_sharing(original: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, edges: list[int],
                     plan: list[tuple[int, int]], kwargs: dict[str, Any]) -> torch.Tensor:
    """The decoder's hidden states for a packed batch in which groups of sequences start with the same tokens
    (`plan`): one forward over each group's prefix once followed by every sequence's rest, spread back to the
    batch's layout."""
    device = input_ids.device
    leaders = sorted({lead for lead, n in plan if n})
    pieces = [(edges[lead], edges[lead] + plan[lead][1]) for lead in leaders]
    pieces += [(a + n, b) for (a, b), (_, n) in zip(zip(edges[:-1], edges[1:], strict=True), plan, strict=True)]
    bounds = [0, *itertools.accumulate(b - a for a, b in pieces)]
    prefix_piece = {lead: (bounds[k], bounds[k + 1]) for k, lead in enumerate(leaders)}
    after = [None] * len(leaders) + [prefix_piece[lead] if n else None for lead, n in plan]
    keep = torch.cat([torch.arange(a, b, device=device) for a, b in pieces])
    _shared.bounds, _shared.after = bounds, after
    try:
        hidden = original(input_ids=input_ids[:, keep], position_ids=position_ids[:, keep], use_cache=False,
                          **kwargs).last_hidden_state
    finally:
        _shared.bounds, _shared.after = None, []
    spread = []
    for k, (lead, n) in enumerate(plan):
        if n:
            spread.append(torch.arange(*prefix_piece[lead], device=device))
        spread.append(torch.arange(bounds[len(leaders) + k], bounds[len(leaders) + k + 1], device=device))
    return hidden[:, torch.cat(spread)]  # each prefix's states once per sequence; gradients add up over them


def shared_prefix_forward(decoder: torch.nn.Module) -> Any:
    """A forward for `decoder` (the model's stack of layers) that runs a packed batch's shared prefix once.

    Agent rows start with the same system prompt and tool schemas (SmolLM2 with the calculator: 211 of about 276
    tokens); a log of several agents has one such start per agent. In a padding-free batch, sequences that begin
    with the same tokens (at least MIN_SHARED_PREFIX) form a group; the packed row becomes each group's prefix once
    followed by the rest of every sequence, and `sdpa_per_sequence` lets each rest attend to its group's prefix
    keys and values before its own. A prefix's hidden states are the same for every member (causal attention, same
    positions), so the hidden states spread back to the batch's layout are the ones a full forward gives, and the
    prefix's gradients add up as they would over its copies. Anything else (no `cu_seq_lens_q`, a
    cache, hidden states or attentions asked for, gradient checkpointing, whose recomputation would run outside
    this forward) takes the decoder's own forward. Demo rows, SmolLM2, 2 cores: 2.26x the tokens/s (`make bench`'s
    demo section), same losses.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    original = decoder.forward

    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        bounds = kwargs.get("cu_seq_lens_q")
        if (bounds is None or input_ids is None or position_ids is None or input_ids.shape[0] != 1
                or attention_mask is not None or kwargs.get("use_cache") or kwargs.get("cache") is not None
                or kwargs.get("past_key_values") is not None or kwargs.get("output_hidden_states")
                or kwargs.get("output_attentions") or _checkpointing(decoder)):
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        edges = bounds.tolist()
        plan = _shared_prefixes(input_ids[0], edges)
        if not _saved_tokens(plan):
            return original(input_ids=input_ids, position_ids=position_ids, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in (*PACKING_KEYS, "use_cache")}
        hidden = _forward_sharing(original, input_ids, position_ids, edges, plan, rest)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    return forward


@contextmanager
def packed_attention(model: Any, padding_free: bool) -> Iterator[None]:
    """During padding-free training on CPU, attend within each packed sequence only (`sdpa_per_sequence`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    original = model.config._attn_implementation
    if not padding_free or model.device.type != "cpu" or original != "sdpa":
        yield
        return
    AttentionInterface.register(PACKED_ATTENTION, sdpa_per_sequence)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # the mask is unused for packed rows
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


@contextmanager
def shared_prefix(model: Any, enabled: bool = True) -> Iterator[None]:
    """Inside `packed_attention`: run each prefix that packed sequences of a batch share once
    (`shared_prefix_forward`). Not for weights sharded across processes (FSDP, ZeRO-3), which expect each
    layer to run once per step."""
    if not enabled or model.config._attn_implementation != PACKED_ATTENTION:
        yield
        return
    decoder = model.get_decoder()
    decoder.forward = shared_prefix_forward(decoder)  # this instance only, until the block ends
    try:
        yield
    finally:
        decoder.__dict__.pop("forward", None)


@contextmanager
def own_forward(model: torch.nn.Module) -> Iterator[None]:
    """Undo accelerate's mixed-precision patch of `model.forward` when training ends (or fails).

    Checked against accelerate 1.15: with bf16/fp16 on, `prepare_model` replaces the module's forward by an
    autocast wrapper that outlives the Trainer; the chat would then answer in bf16 and a reloaded adapter
    would not reproduce the logits (a test compares them).
    """
    saved: dict[str, Any] = {k: model.__dict__[k] for k in ("forward", "_original_forward") if k in model.__dict__}
    try:
        yield
    finally:
        for key in ("forward", "_original_forward"):
            model.__dict__.pop(key, None)
        model.__dict__.update(saved)


LOG_PROBS_SAVE_LIMIT = 2**27  # positions x vocabulary: above this (512 MB of fp32 log-probabilities), trl's own head


class _CpuLogProbs(torch.autograd.Function):
    """trl's `ChunkedLogProbFunction` for one CPU batch of loss positions, in whole-vocabulary torch ops.

    Checked against trl 1.16 (`trl.kernels.chunked_logprob`). Without Triton, trl folds each vocabulary tile in
    about a dozen elementwise torch passes, recomputes the projection in the backward and accumulates the
    gradients through fp32 copies of the tile and the weight. Here the forward projects once (in the autocast
    dtype, as trl does), takes `log_softmax` and keeps the log-probabilities for the backward, which multiplies
    their softmax by the head in the same dtype. Same outputs (log-probabilities, entropy, log of the summed
    squared probabilities, mean logit, target is the first argmax). 320 loss positions x 49152 vocabulary,
    forward + backward on 2 cores: 0.59 s -> 0.29 s. The demo's training steps, each timed both ways in one
    process: 47.6 s -> 44.0 s over 8 steps (-7.6 %); its 20-step run gives the same losses (train 0.6426 /
    0.6425, eval 1.641 -> 0.362 both). The log-probabilities kept for the backward take positions x vocabulary
    x 4 bytes (63 MB for those 320 positions).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                outputs: tuple[str, ...]) -> tuple[torch.Tensor | None, ...]:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        with torch.autocast("cpu", enabled=False):
            head = weight.to(dtype)
            logits = (hidden.to(dtype) @ head.t()).float()
            if scale != 1.0:
                logits.mul_(scale)
            mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
            is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
            log_p = torch.log_softmax(logits, dim=-1)
            del logits
            entropy = -torch.linalg.vecdot(log_p.exp(), log_p) if "entropy" in outputs else None
            log_sum_sq = torch.logsumexp(2 * log_p, dim=-1) if "log_sum_sq_probs" in outputs else None
            log_probs = log_p.gather(-1, targets[:, None]).squeeze(-1)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(hidden, head, targets, log_p, entropy if entropy is not None else log_probs)
        ctx.scale, ctx.weight_dtype = scale, weight.dtype
        # An output the loss does not use (SFT logs the entropy, detached) then reaches the backward as None, not as
        # zeros: its term (three passes over positions x vocabulary) is skipped. Profiled on SmolLM2, one step of
        # 151 loss positions: that term took 1.8 s of 16.3 (1 thread, busy machine); the gradients are unchanged.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                 *_: Any) -> tuple[torch.Tensor | None, ...]:
        hidden, head, targets, log_p, entropy = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            p = log_p.exp()
            if grad_log_probs is not None:  # d log p_target / dz_j = 1[j = target] - p_j
                g = grad_log_probs.float()[:, None] * ctx.scale
                grad = p * -g if grad_entropy is not None else p.mul_(-g)
                grad.scatter_add_(-1, targets[:, None], g)
            else:
                grad = torch.zeros_like(p)
            if grad_entropy is not None:  # d entropy / dz_j = -p_j (log p_j + entropy)
                grad -= (grad_entropy.float()[:, None] * ctx.scale) * p * (log_p + entropy[:, None])
            # In the projection's dtype, as the backward of a plain LM head under autocast (one vocabulary-wide
            # product per position, so no rounding of partial sums)
            grad = grad.to(head.dtype)
            grad_hidden = (grad @ head).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (grad.t() @ hidden.to(head.dtype)).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


class _LogProbsOnCpu:
    """Stands in for trl's `ChunkedLogProbFunction` (same `apply` arguments): `_CpuLogProbs` for CPU batches
    with a bias-free, uncapped head whose log-probabilities fit LOG_PROBS_SAVE_LIMIT; trl's otherwise."""

    def __init__(self, trl_function: Any) -> None:
        self.trl_function = trl_function

    def apply(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] | None = None) -> Any:
        from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS

        outputs = OPTIONAL_OUTPUTS if outputs is None else outputs
        if (hidden.device.type != "cpu" or bias is not None or final_logit_softcapping is not None
                or hidden.shape[0] * weight.shape[0] > LOG_PROBS_SAVE_LIMIT):
            return self.trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                           final_logit_softcapping, logit_scale, outputs)
        return _CpuLogProbs.apply(hidden, weight, targets, logit_scale / temperature, tuple(outputs))


@contextmanager
def loss_positions_only(device: torch.device) -> Iterator[None]:
    """Make trl's fused LM head score only the positions that carry loss on CPU, as it already does on CUDA, and
    score them with `_CpuLogProbs`.

    Checked against trl 1.16 (`trl.trainer.utils._use_triton`, `_ChunkedLogProbFunction`). trl projects every
    position through the LM head except on Triton devices (fixed tile shapes keep compilers such as Neuron from
    recompiling). Eager CPU has nothing to recompile, and with assistant-only loss most positions are prompt
    tokens: scoring only the answers gives the same loss and gradients (SmolLM2-135M, 2 cores: 224 instead of
    135 tokens/s, identical losses). trl's kernel keeps its own reference to the check, so only this decision
    changes; both are restored on exit.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    function = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if device.type != "cpu" or original is None:
        yield
        return

    def cpu_or_triton(device: torch.device) -> bool:
        return device.type == "cpu" or bool(original(device))

    trl_utils._use_triton = cpu_or_triton
    if function is not None:
        setattr(trl_utils, "_ChunkedLogProbFunction", _LogProbsOnCpu(function))  # noqa: B010 - a stand-in, not a type
    try:
        yield
    finally:
        trl_utils._use_triton = original
        if function is not None:
            setattr(trl_utils, "_ChunkedLogProbFunction", function)  # noqa: B010


# =============================================================================================
# Preference trainers (DPO, KTO) on a model that already carries named adapters

TRL_REFERENCE = "ref"  # the adapter trl's DPO and KTO trainers score the reference with, when it exists


@contextmanager
def trl_reference(model: Any, adapter: str) -> Iterator[None]:
    """Build trl's DPOTrainer or KTOTrainer inside this block on a peft model whose new adapter is `adapter`.

    Checked against trl 1.16 (`DPOTrainer.__init__`, `KTOTrainer.__init__`, `trainer.utils.use_adapter`) and peft
    0.21. Given a peft model and no `ref_model`, trl reads `model.peft_config["default"]` (a KeyError for our
    adapters ft1, ft2, ...), adds an adapter "ref" with that config, copies the ".default." weights into it, and
    scores the reference with "ref" active (or with every adapter disabled when there is no "ref"): in each step,
    or once before training with `precompute_ref_log_probs`. Either way the reference is the same base weights: no
    second copy of the model exists.

    While the trainer is built, "default" names `adapter`, and "ref" gets `adapter`'s starting weights as soon as
    trl adds it (those of the adapter it continues from), so a reference computed during construction is right too.
    Afterwards "ref" is removed again when `adapter` starts from zero: the reference is then the model with the
    adapter disabled, as trl does for a fresh adapter. `drop_trl_reference` removes "ref" when training ends.
    """
    configs = model.peft_config
    if "default" in configs or TRL_REFERENCE in configs:
        raise RuntimeError(f"adapter names 'default' and '{TRL_REFERENCE}' are reserved for trl while training")
    add_adapter = model.add_adapter

    def add_reference(name: str, config: Any, *args: Any, **kwargs: Any) -> None:
        add_adapter(name, config, *args, **kwargs)
        if name == TRL_REFERENCE:
            _copy_adapter(model, adapter, TRL_REFERENCE)

    def restore() -> None:
        configs.pop("default", None)
        model.__dict__.pop("add_adapter", None)

    configs["default"] = configs[adapter]
    model.add_adapter = add_reference  # this instance only, while the trainer is built
    try:
        yield
    except BaseException:
        restore()
        drop_trl_reference(model)
        raise
    restore()
    starts_from_zero = not any(param.any() for name, param in model.named_parameters()
                               if f".lora_B.{adapter}." in name)
    if starts_from_zero:
        drop_trl_reference(model)


def _copy_adapter(model: Any, source: str, target: str) -> None:
    """`target`'s LoRA weights := `source`'s, frozen."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{source}." in name:
                copy = model.get_parameter(name.replace(f".{source}.", f".{target}."))
                copy.copy_(param)
                copy.requires_grad_(False)


def drop_trl_reference(model: Any) -> None:
    """Remove the "ref" adapter `trl_reference` may have left (after training, or when building failed)."""
    if TRL_REFERENCE in getattr(model, "peft_config", {}):
        model.delete_adapter(TRL_REFERENCE)


_tuner_layers: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], list[Any]]] = weakref.WeakKeyDictionary()
# a peft model -> (its adapters, its LoRA layers) for `switch_adapter`


def switch_adapter(model: Any, name: str | None) -> None:
    """Serve adapter `name` (None = the base) on a peft model with several adapters: one flag per LoRA layer.

    Checked against peft 0.21.2. `PeftModel.set_adapter` and `enable/disable_adapter_layers` walk every module of the
    model and set `requires_grad` on every adapter weight (for training). Serving needs only each tuner layer's
    `_active_adapter` and `_disable_adapters`; the layers are found once per set of adapters (adding or deleting one
    changes `peft_config`, which re-walks the model). SmolLM2-135M with 3 adapters on 7 projections each (210 LoRA
    layers), 2 CPU cores: a switch between agents took 16 ms through peft's calls, well under 1 ms here. Adapter
    weights keep their `requires_grad` (serving never trains). Models that peft's calls must handle (merged layers,
    `modules_to_save`, anything but one active adapter per layer) go through peft's own calls.
    """
    layers = _lora_layers(model)
    if not layers or any(layer.merged for layer in layers):
        from hfmodel.adapters import serve_with_peft

        serve_with_peft(model, name)
        return
    for layer in layers:
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]
    if name is not None:
        model.active_adapter = model.base_model.active_adapter = name


def _lora_layers(model: Any) -> list[Any]:
    """The tuner layers of a peft model whose serving state is one flag and one active adapter each ([] for any
    other model: `modules_to_save`, layers without those fields), found once per set of adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    adapters = tuple(model.peft_config)
    cached = _tuner_layers.get(model)
    if cached is None or cached[0] != adapters:
        modules = list(model.modules())
        special = any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)
        layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        fits = not special and all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters") for m in layers)
        cached = _tuner_layers[model] = (adapters, layers if fits else [])
    return cached[1]


def served_adapter(model: Any) -> str | None:
    """The adapter a peft model serves now (None = the base: its adapter layers are off)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next(iter(_lora_layers(model)), None) or next(
        (m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return None if layer is None or layer.disable_adapters else model.active_adapter


PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch (`adapter_names=`)


def can_mix_adapters(model: Any, names: list[str | None]) -> bool:
    """Whether one generate() can serve each row its own adapter through peft's mixed batches (`adapter_names=`).

    Checked against peft 0.21.2: every LoRA layer adds each row's own adapter to the base layer's output; merged
    layers and DoRA adapters are refused by peft (and layers we do not recognise are left to peft's own switch)."""
    from hfmodel.common import is_peft_model

    if not is_peft_model(model):
        return all(name is None for name in names)
    layers = _lora_layers(model)
    return bool(layers) and not any(layer.merged for layer in layers) and not any(
        getattr(layer, "use_dora", {}).get(name, False) for layer in layers for name in set(names) if name)


@contextmanager
def serving_rows(model: Any, names: list[str | None] | None) -> Iterator[dict[str, Any]]:
    """For one generate() of the block: row i served with adapter `names[i]` (None = the base); yields the extra
    generate() arguments. All rows the same: a switch to that adapter; different ones: peft's mixed batch (see
    `can_mix_adapters`). Afterwards the model serves what it served before. `names` None: nothing changes."""
    from hfmodel.common import is_peft_model

    if names is None or not is_peft_model(model):
        yield {}
        return
    before = served_adapter(model)
    distinct = set(names)
    if len(distinct) == 1:
        switch_adapter(model, names[0])
        extra: dict[str, Any] = {}
    else:
        switch_adapter(model, next(name for name in names if name))  # adapter layers on; each row picks its own
        extra = {"adapter_names": [name or PEFT_BASE for name in names]}
    try:
        yield extra
    finally:
        switch_adapter(model, before)
