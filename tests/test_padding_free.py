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
