"""Padding-free batches (our default when every row fits) must not let examples attend to each other."""

from __future__ import annotations

import torch


def test_padding_free_batch_matches_separate_forwards(tiny_wrapper):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, model = tiny_wrapper.tokenizer, tiny_wrapper.hf_model
    rows = [
        [{"role": "system", "content": "You are Ember."}, {"role": "user", "content": "Who are you?"},
         {"role": "assistant", "content": "I am Ember."}],
        [{"role": "system", "content": "You are Ember."}, {"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "Four. The capital of France is Paris."}],
        [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
    ]
    examples = [{"input_ids": tok.apply_chat_template(r, tokenize=True)["input_ids"]} for r in rows]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # one flattened row

    with torch.no_grad():
        # trl's compute_loss passes use_cache=False (train and eval); only then does transformers split a
        # flattened row into its sequences by position_ids. With a cache, later rows would see earlier ones.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            segment = packed[start : start + ids.shape[1]]
            # Identical up to float noise: a later example that saw an earlier one would differ by O(1).
            assert torch.allclose(segment, alone, atol=1e-4), (segment - alone).abs().max()
            start += ids.shape[1]


def test_trl_disables_cache_in_compute_loss():
    """The guarantee the test above relies on: trl's SFTTrainer.compute_loss forces use_cache=False."""
    import inspect

    from trl import SFTTrainer

    assert 'inputs["use_cache"] = False' in inspect.getsource(SFTTrainer.compute_loss)


def test_loss_positions_only_scores_answers_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """On CPU the fused LM head must project only the positions with a label (not all), with unchanged results."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from hfmodel.speedups import _CpuLogProbs
    from huggingface_model import loss_positions_only

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[:, :18] = -100  # a prompt of 18 tokens, an answer of 6: 2 x 6 labelled positions after the shift
    rows_scored = []

    def spy(function):
        original_apply = function.apply

        def apply(hidden, *args):
            rows_scored.append((function.__name__, hidden.reshape(-1, hidden.shape[-1]).shape[0]))
            return original_apply(hidden, *args)
        return apply

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy(trl_utils._ChunkedLogProbFunction))
    monkeypatch.setattr(_CpuLogProbs, "apply", spy(_CpuLogProbs))

    def loss_and_grad():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), model.get_output_embeddings().weight.grad.clone()

    before = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    loss_all, grad_all = loss_and_grad()
    with loss_positions_only(torch.device("cpu")):
        loss_compact, grad_compact = loss_and_grad()
    assert (trl_utils._use_triton, trl_utils._ChunkedLogProbFunction) == before  # restored
    # trl's kernel on every shifted position, then ours on the labelled ones only
    assert rows_scored == [("ChunkedLogProbFunction", 2 * 23), ("_CpuLogProbs", 2 * 6)]
    assert torch.allclose(loss_all, loss_compact, atol=1e-6)
    assert torch.allclose(grad_all, grad_compact, atol=1e-6)


def test_cpu_log_probs_match_trls_fused_head_in_outputs_and_gradients(monkeypatch):
    """`_CpuLogProbs` (what `loss_positions_only` scores CPU batches with) against trl's own kernel: every output
    and both gradients, in fp32 and under bf16 autocast; a head it does not cover (a bias) goes to trl's."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    from hfmodel.speedups import _LogProbsOnCpu

    torch.manual_seed(0)
    hidden0, weight0 = torch.randn(9, 16), torch.randn(70, 16) * 0.5
    targets = torch.randint(0, 70, (9,))

    def run(function, autocast):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = function.apply(hidden, weight, None, targets, 0.7, 32, None, 1.3, OPTIONAL_OUTPUTS)
        log_probs, entropy = out[0], out[1]
        (-log_probs.sum() + 0.3 * entropy.sum()).backward()  # a gradient through both differentiable outputs
        return [x.detach() for x in out] + [hidden.grad, weight.grad]

    for autocast, tolerance in ((False, 1e-5), (True, 3e-2)):
        theirs, ours = run(ChunkedLogProbFunction, autocast), run(_LogProbsOnCpu(ChunkedLogProbFunction), autocast)
        names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "grad hidden", "grad weight")
        for name, a, b in zip(names, theirs, ours, strict=True):
            if a.dtype == torch.bool:
                assert torch.equal(a, b), name
            else:
                assert torch.allclose(a, b, atol=tolerance, rtol=tolerance), (name, autocast, (a - b).abs().max())

    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda *args: "trl's")
    bias = torch.zeros(70)
    assert _LogProbsOnCpu(ChunkedLogProbFunction).apply(hidden0, weight0, bias, targets, 1.0, 32) == "trl's"


def test_per_sequence_attention_matches_separate_forwards_with_gradients(tiny_model_dir, monkeypatch):
    """`packed_attention` (per-sequence SDPA for padding-free training on CPU): same logits and gradients."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from huggingface_model import PACKED_ATTENTION, packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    examples = [{"input_ids": torch.randint(3, model.config.vocab_size, (n,)).tolist()} for n in (9, 14, 5)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert "cu_seq_lens_q" in batch  # what sdpa_per_sequence splits on

    def packed_logits_and_grad():
        model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits[0]
        logits.square().mean().backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k))
    with packed_attention(model, padding_free=True):
        assert model.config._attn_implementation == PACKED_ATTENTION
        packed, grad_packed = packed_logits_and_grad()
    assert calls == [9, 14, 5] * model.config.num_hidden_layers  # one call per sequence, not one 28-token square
    calls.clear()
    assert model.config._attn_implementation == "sdpa"  # restored
    _, grad_masked = packed_logits_and_grad()  # transformers' block-diagonal mask, one square
    assert calls == [28] * model.config.num_hidden_layers
    assert torch.allclose(grad_packed, grad_masked, atol=1e-6)

    start = 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
        # A sequence that saw its neighbours would differ by O(1).
        assert torch.allclose(packed[start : start + ids.shape[1]], alone, atol=1e-5)
        start += ids.shape[1]


def _shared_prefix_batch(vocab_size: int, prefix: int, tails: tuple[int, ...]) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(1)
    head = torch.randint(3, vocab_size, (prefix,)).tolist()
    examples = [{"input_ids": head + torch.randint(3, vocab_size, (n,)).tolist()} for n in tails]
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)


def _lora_model(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B is non-zero (a fresh one is zero and would not take part)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    return model


def _loss_logits_grads(model, batch: dict) -> tuple:
    model.zero_grad()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_same(shared: tuple, full: tuple) -> None:
    assert torch.allclose(shared[0], full[0], atol=1e-6)
    assert torch.allclose(shared[1], full[1], atol=1e-5)
    assert len(shared[2]) == len(full[2]) > 0
    for a, b in zip(shared[2], full[2], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def _key_lengths(monkeypatch) -> list[int]:
    """The key length of every SDPA call from now on."""
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: calls.append(k.shape[2]) or sdpa(q, k, *a, **kw))
    return calls


def _shared_then_full(model, batch, monkeypatch):
    """Loss, logits and gradients of one packed batch with the shared prefix, then with every sequence whole, and
    the key lengths SDPA saw in each pass."""
    from huggingface_model import packed_attention, shared_prefix

    calls = _key_lengths(monkeypatch)
    base = model.base_model.model
    with packed_attention(base, padding_free=True):
        with shared_prefix(base):
            shared = _loss_logits_grads(model, batch)
        assert "forward" not in base.get_decoder().__dict__  # restored
        shared_calls = list(calls)
        calls.clear()
        full = _loss_logits_grads(model, batch)
    return shared_calls, list(calls), shared, full


def test_shared_prefix_runs_once_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """Packed rows that begin alike (system prompt + tool schemas): the prefix runs once, nothing else changes."""
    model = _lora_model(tiny_model_dir)
    batch = _shared_prefix_batch(model.config.vocab_size, prefix=40, tails=(7, 12, 1))  # 1: a one-token tail
    layers = model.config.num_hidden_layers
    shared_calls, full_calls, shared, full = _shared_then_full(model, batch, monkeypatch)
    assert shared_calls == [40, 47, 52, 41] * layers  # per layer: the prefix once, then each rest after its keys
    assert full_calls == [47, 52, 41] * layers  # every packed sequence whole, one call each
    _assert_same(shared, full)


def test_shared_prefix_leaves_other_batches_to_the_decoder(tiny_model_dir, monkeypatch):
    """No common prefix, a short one, or gradient checkpointing (which recomputes layers later): the usual path."""
    from transformers import AutoModelForCausalLM

    from huggingface_model import packed_attention, shared_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    calls = _key_lengths(monkeypatch)
    layers = model.config.num_hidden_layers
    with packed_attention(model, padding_free=True), shared_prefix(model), torch.no_grad():
        for prefix in (0, 8):  # nothing shared; less than MIN_SHARED_PREFIX tokens
            calls.clear()
            model(**_shared_prefix_batch(model.config.vocab_size, prefix=prefix, tails=(20, 25)), use_cache=False)
            assert calls == [prefix + 20, prefix + 25] * layers
        model.gradient_checkpointing_enable()
        model.train()
        calls.clear()
        model(**_shared_prefix_batch(model.config.vocab_size, prefix=40, tails=(5, 6)), use_cache=False)
        assert calls == [45, 46] * layers
    assert "forward" not in model.get_decoder().__dict__  # restored


def test_fine_tune_runs_the_shared_prefix_once_with_the_same_losses(tiny_model_dir, tmp_path, monkeypatch):
    """End to end: rows with one long system prompt train on the shared prefix path, with the losses the full path
    gives (fp32, so the two agree to rounding)."""
    from helpers import arithmetic_rows, fast_config, make_wrapper, write_jsonl

    import hfmodel.speedups as speedups

    system = "You are Ember, the friendly assistant of this project. Answer briefly and name yourself."
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(12))
    found = []  # (sequences in the packed batch, tokens sharing saves) per forward
    plan_of = speedups._shared_prefixes
    monkeypatch.setattr(speedups, "_shared_prefixes", lambda ids, edges: found.append(
        (len(edges) - 1, speedups._saved_tokens(plan_of(ids, edges)))) or plan_of(ids, edges))

    def losses(folder: str) -> list[float]:
        config = fast_config(tmp_path / folder, max_steps=4, bf16=False)
        result = make_wrapper(tiny_model_dir, system_prompt=system).fine_tune(str(data), config)
        return [e["loss"] for e in result.log_history if "loss" in e]

    shared = losses("shared")
    batches = [n for rows, n in found if rows > 1]
    assert len(batches) >= 3 and min(batches) > speedups.MIN_SHARED_PREFIX  # every batch shared the prompt
    monkeypatch.setattr(speedups, "MIN_SHARED_PREFIX", 10**9)
    full = losses("full")
    assert len(shared) == len(full) == 4
    for a, b in zip(shared, full, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_groups_of_rows_with_different_prefixes_each_run_theirs_once(tiny_model_dir, monkeypatch):
    """Two agents' rows in one batch (two system prompts), plus one row alike neither and a short row whose start is
    another group's: each group's prefix runs once, with the full forward's losses and gradients."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _lora_model(tiny_model_dir)
    torch.manual_seed(2)
    vocab = model.config.vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,)).tolist()

    ember, critic = tokens(30), tokens(25)
    short = ember[:20]  # a row shorter than Ember's prompt: the group shares only 19 tokens then
    examples = [ember + tokens(6), critic + tokens(9), tokens(12), ember + tokens(4), critic + tokens(3), short]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": ids} for ids in examples])
    layers = model.config.num_hidden_layers
    shared_calls, full_calls, shared, full = _shared_then_full(model, batch, monkeypatch)
    # Ember's group shares 19 tokens (its shortest member has 20), Critic's 25; the odd row runs alone.
    assert shared_calls == [19, 25, 36, 34, 12, 34, 28, 20] * layers
    assert full_calls == [36, 34, 12, 34, 28, 20] * layers
    _assert_same(shared, full)


def test_cpu_log_probs_skip_the_entropy_term_when_the_loss_ignores_the_entropy():
    """SFT logs the entropy (detached): its backward term is skipped, and the gradients equal trl's kernel's."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    from hfmodel.speedups import _LogProbsOnCpu

    torch.manual_seed(1)
    hidden0, weight0 = torch.randn(7, 16), torch.randn(50, 16) * 0.5
    targets = torch.randint(0, 50, (7,))
    seen = []

    def run(function):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        out = function.apply(hidden, weight, None, targets, 1.0, 32, None, 1.0, OPTIONAL_OUTPUTS)
        (-out[0].sum()).backward()
        return hidden.grad, weight.grad

    original = torch.Tensor.__isub__

    def spy(self, other):  # the entropy term is the backward's only in-place subtraction
        seen.append(tuple(self.shape))
        return original(self, other)

    theirs = run(ChunkedLogProbFunction)
    torch.Tensor.__isub__ = spy
    try:
        ours = run(_LogProbsOnCpu(ChunkedLogProbFunction))
    finally:
        torch.Tensor.__isub__ = original
    assert seen == []
    for a, b in zip(theirs, ours, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
