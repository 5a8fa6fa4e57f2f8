"""A `model_configs` entry checked and its weights and tokenizer loaded, before AgentScope is imported.

Importing AgentScope costs about 1.2 s on 2 cores (its package imports openai and mcp), and the import holds the GIL,
so it cannot overlap the model load. The chat script loads the model through `preload` (torch and transformers only),
shows its prompt, and imports AgentScope and builds the agents while the user types (chat/startup.py);
`HuggingFaceWrapper(..., preloaded=...)` then takes the loaded weights over instead of loading them again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from hfmodel.common import ModelLoadError, closest, describe_validation, logger, pick_device, pick_dtype
from hfmodel.generation import check_engine
from hfmodel.loading import (
    ModelHandle,
    ModelSource,
    check_fit,
    load_replacement,
    load_tokenizer,
    quantization_config,
    resolve_model_source,
    tokenizer_location,
)
from hfmodel.settings import FineTuneConfig

# `HuggingFaceWrapper.__init__`'s keywords, in order: the keys a `model_configs` entry may have (besides
# "model_type"). tests/test_script.py checks the two agree.
MODEL_CONFIG_KEYS = (
    "config_name", "model_id", "max_length", "data_path", "device", "local_model_path", "local_tokenizer_path",
    "fine_tune_config", "temperature", "top_p", "repetition_penalty", "do_sample", "seed", "dtype",
    "trust_remote_code", "quantization", "system_prompt", "stream", "engine",
)
# What the weights depend on: a preload is taken over only by a wrapper built with the same values.
LOAD_KEYS = ("model_id", "local_model_path", "local_tokenizer_path", "device", "dtype", "quantization",
             "trust_remote_code")


class GenerationParameters(BaseModel):
    """Generation settings (live: `/set` changes them between replies)."""

    max_length: int = Field(512, ge=1, description="max NEW tokens per reply (the original example's name)")
    temperature: float = Field(0.3, gt=0, le=5, description="sampling temperature (with do_sample)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass (with do_sample)")
    repetition_penalty: float = Field(1.1, gt=0, le=5, description=">1 discourages loops in small models")
    do_sample: bool = Field(True, description="False = greedy decoding")
    seed: int | None = Field(1234, ge=0, le=2**32 - 1,
                             description="reseeded before every reply: same history + settings -> same reply")


P = TypeVar("P", bound=GenerationParameters)


def generation_parameters(kind: type[P], **values: Any) -> P:
    """The generation settings (a `kind`), or one message naming what is wrong with them."""
    try:
        return kind(**values)
    except ValidationError as e:
        raise ModelLoadError(f"Invalid generation settings in model_configs: {describe_validation(e)} "
                             "(for greedy decoding set do_sample=False rather than temperature=0).") from None


def reject_unknown_keys(unknown: dict[str, Any]) -> None:
    unknown = {k: v for k, v in unknown.items() if k != "model_type"}
    if unknown:
        valid = list(MODEL_CONFIG_KEYS)
        raise ModelLoadError(f"Unknown model_configs key(s): {', '.join(unknown)}{closest(next(iter(unknown)), valid)}"
                             f". Valid keys: model_type, {', '.join(valid)}.")


def model_handle(device: str | None, dtype: str | None, quantization: str | None,
                 trust_remote_code: bool) -> ModelHandle:
    """An empty handle on the chosen device and dtype (one line logged)."""
    chosen = pick_device(device)
    handle = ModelHandle(device=chosen, dtype=pick_dtype(chosen, dtype),
                         bnb_config=quantization_config(quantization, chosen), trust_remote_code=trust_remote_code)
    logger.info("Device: %s, dtype: %s", chosen, str(handle.dtype).replace("torch.", ""))
    return handle


@dataclass
class Preloaded:
    """What `preload` loaded, for one `HuggingFaceWrapper` to take over (once)."""

    settings: dict[str, Any]  # the LOAD_KEYS values it was loaded with
    handle: ModelHandle  # the weights, the tokenizer and its chat format, and the compute thread that loaded them
    source: ModelSource
    taken: bool = False

    @property
    def name(self) -> str:
        """What the wrapper calls its model: the configured folder or id, else where the weights came from."""
        return str(self.settings["local_model_path"] or self.settings["model_id"] or self.source.path)

    def take(self, settings: dict[str, Any]) -> ModelHandle:
        """Hand the load over to a wrapper built with `settings` (a programming error otherwise)."""
        if self.taken:
            raise ValueError("This preloaded model has been taken over already: preload again.")
        if settings != self.settings:
            changed = [k for k in LOAD_KEYS if settings.get(k) != self.settings.get(k)]
            raise ValueError(f"The preloaded model was loaded with other settings ({', '.join(changed)}).")
        self.taken = True
        return self.handle


def preload(config: dict[str, Any]) -> Preloaded:
    """Check one `model_configs` entry as `HuggingFaceWrapper.from_config` would, then `load` it. Raises
    `ModelLoadError` (a `UserError`) with one message for a bad entry."""
    config = dict(config)
    model_type = config.pop("model_type", "huggingface")
    if model_type != "huggingface":
        raise ModelLoadError(f"model_type '{model_type}' is not supported here; use \"huggingface\".")
    reject_unknown_keys({k: v for k, v in config.items() if k not in MODEL_CONFIG_KEYS})
    generation_parameters(GenerationParameters,
                          **{k: config[k] for k in GenerationParameters.model_fields if k in config})
    FineTuneConfig.from_dict(config.get("fine_tune_config"), check_fields=bool(config.get("data_path")))
    check_engine(config.get("engine") or "transformers")
    return load({k: config.get(k, False if k == "trust_remote_code" else None) for k in LOAD_KEYS})


def load(settings: dict[str, Any]) -> Preloaded:
    """The weights and tokenizer for `settings` (the LOAD_KEYS values) on a new handle, with the chat format read;
    an adapter folder's adapter, int8 serving and the start-up fine-tune are left to the wrapper. A wrapper's first
    load is this too (`HuggingFaceWrapper.load_model` replaces a loaded model)."""
    handle = model_handle(settings["device"], settings["dtype"], settings["quantization"],
                          bool(settings["trust_remote_code"]))
    source = resolve_model_source(settings["model_id"], settings["local_model_path"])
    started = time.perf_counter()
    # On the compute thread that will generate with it: the process's torch work stays on one thread (one OpenMP
    # team; see hfmodel/compute.py).
    module, _ = handle.compute.call(load_replacement, source, handle)
    logger.info("Loaded model %s in %.1f s", source.describe(), time.perf_counter() - started)
    handle.module, handle.source = module, source
    handle.context_size = int(getattr(module.config, "max_position_embeddings", 0) or 2048)
    where, local_only = tokenizer_location(handle, settings["model_id"], settings["model_id"],
                                           settings["local_tokenizer_path"])
    tokenizer = load_tokenizer(where, local_only, handle.trust_remote_code)
    check_fit(module, tokenizer, where)
    handle.tokenizer = tokenizer
    handle.sync_tokenizer()  # the chat format is read here, before the prompt (it may log a line about it)
    return Preloaded(settings, handle, source)
