"""Helpers shared by the test modules (data rows, fast fine-tune settings, wrapper construction)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYSTEM_PROMPT = "You are Ember."
TAUGHT_QUESTION = "Who are you?"
TAUGHT_ANSWER = "I am Ember, a friendly assistant."
TINY_MAX_LENGTH = 16

# Short, fast training settings for the tiny model (no checkpoints unless a test asks for them).
FAST_ARGS = {"max_steps": 12, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_strategy": "no"}


def fast_config(tmp_path: Path, **training_args) -> dict:
    """A fine_tune_config that writes only below `tmp_path` and trains in about a second."""
    return {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST_ARGS, **training_args}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def identity_rows(n: int = 4, answer: str = TAUGHT_ANSWER) -> list[dict]:
    return [{"messages": [{"role": "user", "content": TAUGHT_QUESTION}, {"role": "assistant", "content": answer}]}
            for _ in range(n)]


def arithmetic_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


def make_wrapper(folder: Path | str, **kwargs):
    from huggingface_model import HuggingFaceWrapper

    options = {"config_name": "tiny", "local_model_path": str(folder), "max_length": TINY_MAX_LENGTH,
               "system_prompt": SYSTEM_PROMPT}
    options.update(kwargs)
    return HuggingFaceWrapper(**options)


def chat(question: str = TAUGHT_QUESTION, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def scripted_generate(wrapper, replies: list[str], prompts: list[str], settings: list[dict] | None = None):
    """Replace the model's generate() by one that 'generates' the given replies in turn (real tokenizer, real
    streamer protocol), recording each prompt it was given (and in `settings` its other arguments)."""
    import torch

    tok = wrapper.tokenizer
    queue = list(replies)

    def generate(input_ids=None, attention_mask=None, streamer=None, **kwargs):
        prompts.append(tok.decode(input_ids[0]))
        if settings is not None:
            settings.append(kwargs)
        new = tok(queue.pop(0), add_special_tokens=False, return_tensors="pt")["input_ids"]
        if streamer is not None:
            streamer.put(input_ids.cpu())
            for i in range(new.shape[1]):
                streamer.put(new[:, i])
            streamer.end()
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    wrapper.hf_model.generate = generate


@contextmanager
def script_logging_restored() -> Iterator[None]:
    """The chat script's `main` sets up logging for a terminal (root, "as" and "huggingface_model" loggers,
    transformers' verbosity and progress bars); put it all back afterwards so later tests log as before."""
    import logging

    import transformers

    watched = [logging.getLogger(n) for n in ("", "as", "huggingface_model")]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate) for lg in watched]
    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    try:
        yield
    finally:
        for lg, level, handlers, propagate in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
