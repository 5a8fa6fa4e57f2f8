"""`HuggingFaceWrapper`: an AgentScope chat model that loads, chats with and fine-tunes a Hugging Face causal LM.

    from huggingface_model import HuggingFaceWrapper
    model = HuggingFaceWrapper(config_name="demo", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    print(model.generate([{"role": "user", "content": "Hi!"}]))
    model.fine_tune("data/ember_train.jsonl", {"training_args": {"max_steps": 20}})

Headless fine-tuning (no chat; runs unchanged under `accelerate launch` and `torchrun`):

    python finetune.py --config configs/finetune/demo.yaml

The class is a thin adapter, like AgentScope's own model classes: `_call_api` formats the messages, calls a
generation engine and wraps what comes back. The work happens in the `hfmodel` package: loading (where the
weights come from), generation (engines), adapters (the adapter set), training (the fine-tune recipe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from agentscope.credential import CredentialBase
from agentscope.formatter import OllamaChatFormatter
from agentscope.message import Msg
from agentscope.model import ChatModelBase, ChatResponse

from hfmodel import replies, training
from hfmodel.adapters import AdapterRecord, AdapterSet, check_layers
from hfmodel.chat_format import CHATML_TEMPLATE, MASK_SOURCES, ChatFormat, ChatTemplateError, has_generation_markers
from hfmodel.common import (
    FineTuneConfigError,
    FineTuneError,
    FineTuneInterrupted,
    ModelLoadError,
    UserError,
    cpu_has_bf16,
    describe_validation,
    distributed_state,
    fsdp_requested,
    hf_token,
    is_main_process,
    logger,
    pick_dtype,
    redact,
)
from hfmodel.generation import check_engine, create_engine
from hfmodel.gguf_export import GGUFExport, check_destination, check_exportable, export_folder
from hfmodel.int8 import INT8, Int8Check, full_precision, int8_wanted, quantize_checked
from hfmodel.loading import (
    DEFAULT_MODEL_ID,
    ModelSource,
    build_bnb_config,
    bundled_copy_folder,
    bundled_model_folder,
    is_cached_on_hub,
    load_replacement,
    load_tokenizer,
    quantization_config,
    resolve_model_source,
    tokenizer_location,
)
from hfmodel.practice import PracticeResult, PracticeSettings
from hfmodel.preference import PreferenceDryRun
from hfmodel.preload import (
    GenerationParameters,
    Preloaded,
    generation_parameters,
    load,
    reject_unknown_keys,
)
from hfmodel.settings import (
    DEFAULT_LORA_CONFIG,
    DEFAULT_TRAINING_ARGS,
    TOP_LEVEL_KEYS,
    FineTuneConfig,
    device_training_args,
    training_precision,
)
from hfmodel.speedups import PACKED_ATTENTION, loss_positions_only, packed_attention, shared_prefix
from hfmodel.training import DryRun, FineTuneResult, find_completed_run, new_run_dir

__all__ = [  # what tests, the bench and users import from here
    "CHATML_TEMPLATE", "DEFAULT_LORA_CONFIG", "DEFAULT_MODEL_ID", "DEFAULT_TRAINING_ARGS", "PACKED_ATTENTION",
    "TOP_LEVEL_KEYS", "MASK_SOURCES", "AdapterRecord", "ChatFormat", "ChatTemplateError", "DryRun", "FineTuneConfig", "FineTuneConfigError", "FineTuneError",
    "FineTuneInterrupted", "FineTuneResult", "HuggingFaceWrapper", "ModelLoadError", "ModelSource", "UserError",
    "build_bnb_config", "bundled_model_folder", "cpu_has_bf16", "describe_validation", "device_training_args",
    "distributed_state", "find_completed_run", "fsdp_requested", "has_generation_markers", "hf_token",
    "is_cached_on_hub", "loss_positions_only", "new_run_dir", "packed_attention", "pick_dtype",
    "quantization_config", "redact", "shared_prefix", "training_precision",
]

Chat = list[dict[str, str]]


class HuggingFaceWrapper(ChatModelBase):
    """A local Hugging Face causal LM as an AgentScope chat model, with SFT + LoRA fine-tuning."""

    class Parameters(GenerationParameters):
        """Generation settings (live: `/set` changes them between replies)."""

    type = "huggingface"
    parameters: Parameters  # ChatModelBase declares a plain BaseModel

    def __init__(
        self,
        config_name: str = "huggingface",
        model_id: str | None = None,
        max_length: int = 512,
        data_path: str | None = None,
        device: str | None = None,
        local_model_path: str | None = None,
        local_tokenizer_path: str | None = None,
        fine_tune_config: dict[str, Any] | None = None,
        temperature: float = 0.3,
        top_p: float = 0.9,
        repetition_penalty: float = 1.1,
        do_sample: bool = True,
        seed: int | None = 1234,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        quantization: str | None = None,
        system_prompt: str | None = None,
        stream: bool = True,
        engine: str = "transformers",
        *,
        preloaded: Preloaded | None = None,
        **unknown: Any,
    ) -> None:
        """Load the model once; if `data_path` is given, fine-tune once (or reuse an identical earlier run).

        Args:
            config_name: name of this configuration (agents refer to it).
            model_id: hub id, or the bundled default `HuggingFaceTB/SmolLM2-135M-Instruct`.
            max_length: maximum number of NEW tokens per reply.
            data_path: fine-tune on this dataset at start-up (file or hub dataset id).
            device: "cpu", "cuda", "cuda:1", "mps"; default: cuda > mps > cpu.
            local_model_path: a model folder, or a LoRA adapter folder (its base is loaded too).
            local_tokenizer_path: a tokenizer folder (default: the model's).
            fine_tune_config: {"lora_config": {...}, "training_args": {...}, ...}; see TOP_LEVEL_KEYS.
            temperature, top_p, repetition_penalty, do_sample, seed: generation settings.
            dtype: "auto" (default: suits the device), "float32", "bfloat16", "float16".
            trust_remote_code: run model code from the hub repository (off unless you trust it).
            quantization: "int8" serves int8 weights on the CPU (fine-tuning still trains the fp32 base; see
                docs/int8.md); "4bit" or "8bit" loads the base with bitsandbytes for QLoRA (CUDA only).
            system_prompt: used for training rows that have none (the agent sets it to its own).
            stream: stream replies to AgentScope (True) or return them whole.
            engine: the generation engine (see hfmodel/generation.py ENGINES).
            preloaded: the weights and tokenizer `hfmodel.preload.preload(config)` loaded for these settings
                (the chat script loads them before AgentScope is imported): taken over, not loaded again.
                Without it they load here, the same way (`hfmodel.preload.load`).
        """
        reject_unknown_keys(unknown)
        parameters = generation_parameters(self.Parameters, max_length=max_length, temperature=temperature,
                                           top_p=top_p, repetition_penalty=repetition_penalty, do_sample=do_sample,
                                           seed=seed)
        super().__init__(credential=CredentialBase(), model=str(local_model_path or model_id or config_name),
                         parameters=parameters, stream=stream, max_retries=0)
        self.formatter = OllamaChatFormatter()
        self.config_name = config_name
        self.model_id = model_id
        self.local_model_path = local_model_path
        self.data_path = data_path
        self.system_prompt = system_prompt
        self.fine_tune_config = fine_tune_config
        # Fail fast on a wrong config before a long load; field names are checked against trl/peft
        # only when fine-tuning starts (importing them costs seconds at every start-up).
        FineTuneConfig.from_dict(fine_tune_config, check_fields=bool(data_path))
        check_engine(engine)  # before the load, as every other setting
        settings = {"model_id": model_id, "local_model_path": local_model_path, "device": device,
                    "local_tokenizer_path": local_tokenizer_path, "dtype": dtype, "quantization": quantization,
                    "trust_remote_code": trust_remote_code}
        preloaded = preloaded or load(settings)
        self.handle = preloaded.take(settings)
        self.serve_int8 = quantization == INT8 and int8_wanted(self.handle.device)
        self.int8_check: Int8Check | None = None  # how int8 compared with fp32 when it loaded
        self.engine = create_engine(engine, self.handle)
        self.adapter_set = AdapterSet(self.handle)
        self._reply_state()

        self.model = preloaded.name
        if preloaded.source.adapter:
            self.load_adapter(preloaded.source.adapter)
        self.quantize_int8()
        if data_path:
            self.fine_tune(data_path, fine_tune_config)

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> HuggingFaceWrapper:
        """Build from one `model_configs` entry (`{"model_type": "huggingface", "config_name": ...}`)."""
        config = {**config, **overrides}
        model_type = config.get("model_type", "huggingface")
        if model_type != "huggingface":
            raise ModelLoadError(f"model_type '{model_type}' is not supported here; use \"huggingface\".")
        return cls(**config)

    # ---------------------------------------------------------------------------------------- state

    hf_model = property(lambda self: self.handle.module, lambda self, v: setattr(self.handle, "module", v),
                        doc="The torch model (a peft model once adapters exist).")
    tokenizer = property(lambda self: self.handle.tokenizer, doc="The tokenizer (with the chat template).")
    source = property(lambda self: self.handle.source, doc="Where the weights came from.")
    device = property(lambda self: self.handle.device)
    dtype = property(lambda self: self.handle.dtype)

    @property
    def context_size(self) -> int:
        """The model's window in tokens (AgentScope's ChatModelBase sets a default before the model loads)."""
        return self.handle.context_size if "handle" in self.__dict__ else 0

    @context_size.setter
    def context_size(self, value: int) -> None:
        if "handle" in self.__dict__:
            self.handle.context_size = value

    stop_token_ids = property(lambda self: self.handle.stop_token_ids)
    sharded_by = property(lambda self: self.handle.sharded_by, lambda self, v: setattr(self.handle, "sharded_by", v))
    adapters = property(lambda self: self.adapter_set.records, doc="name -> AdapterRecord, this session's adapters.")
    active_adapter = property(lambda self: self.adapter_set.active, doc="The adapter serving replies (None = base).")
    adapter_stack = property(lambda self: self.adapter_set.stack)
    trust_remote_code = property(lambda self: self.handle.trust_remote_code)

    # ---------------------------------------------------------------------------------------- loading

    def load_model(self, model_id: str | None, local_model_path: str | None = None) -> None:
        """Load weights from a local folder, an adapter folder, the hub (cache first) or the bundled copy.

        A transaction: replacing a loaded model also loads the new model's own tokenizer and checks the two fit
        before anything is swapped; on any failure the previous model, tokenizer and adapters keep serving.
        """
        source = resolve_model_source(model_id, local_model_path)
        started = time.perf_counter()
        # On the compute thread that will generate with it: the process's torch work stays on one thread (one
        # OpenMP team; see hfmodel/compute.py).
        module, tokenizer = self.handle.compute.call(load_replacement, source, self.handle)
        before = dict(vars(self.handle)), dict(vars(self.adapter_set)), (self.model_id, self.local_model_path,
                                                                          self.model)
        try:
            self.handle.module, self.handle.source, self.handle.tokenizer = module, source, tokenizer
            self.handle.context_size = int(getattr(module.config, "max_position_embeddings", 0) or 2048)
            self.model_id, self.local_model_path = model_id, local_model_path
            self.model = str(local_model_path or model_id or source.path)
            self.adapter_set.reset()
            logger.info("Loaded model %s in %.1f s", source.describe(), time.perf_counter() - started)
            if source.adapter:
                self.load_adapter(source.adapter)
        except BaseException:  # the adapter does not fit the new base (or Ctrl-C): put everything back
            vars(self.handle).update(before[0])
            vars(self.adapter_set).update(before[1])
            self.model_id, self.local_model_path, self.model = before[2]
            raise
        self.handle.int8 = None
        self.handle.sync_tokenizer()
        if self.handle.tokenizer is not None:  # a replacement (the first load quantises once its tokenizer loads)
            self.quantize_int8()

    def quantize_int8(self) -> None:
        """With `"quantization": "int8"`, serve the loaded base with int8 weights, checked against fp32 on held-out
        rows (one line logged); a model the check rejects keeps its fp32 weights (one warning)."""
        if not self.serve_int8 or self.handle.int8 is not None:
            return
        source = self.handle.source
        bundled = self.model_id == DEFAULT_MODEL_ID or (source is not None and (
            source.kind == "bundled" or Path(source.path).expanduser().resolve() == bundled_copy_folder().resolve()))
        weights, check = quantize_checked(self.handle.base_model(), self.tokenizer, bundled)
        if weights is None:
            logger.warning("%s: above the bound, so this model serves fp32 weights.", check.line())
            return
        self.handle.int8 = weights
        self.int8_check = check
        logger.info("%s.", check.line())

    def _reply_state(self, pure_tools: set[str] | None = None) -> None:
        """What this wrapper keeps between replies (a SharedBaseModel starts with it too)."""
        self.last_result: FineTuneResult | None = None
        self.unread_calls = 0  # replies whose tool-call markup could not be read (they stayed text)
        # Tools whose result depends only on their arguments (the calculator): a call that repeats one of them that
        # already answered in this turn is not run again; the model answers from the result it has.
        self.pure_tools: set[str] = set(pure_tools or ())

    def load_tokenizer(self, model_id: str | None, local_tokenizer_path: str | None = None) -> None:
        """Load the tokenizer (an adapter folder's own copy first: it carries the template it was trained with);
        it replaces the current one only if it fits the model."""
        from hfmodel.loading import check_fit

        where, local_only = tokenizer_location(self.handle, model_id, self.model_id, local_tokenizer_path)
        tokenizer = load_tokenizer(where, local_only, self.handle.trust_remote_code)
        check_fit(self.handle.module, tokenizer, where)
        self.handle.tokenizer = tokenizer
        self.handle.sync_tokenizer()

    # ---------------------------------------------------------------------------------------- generation

    def encode(self, messages: Chat, max_new_tokens: int) -> dict[str, Any]:
        """Render with the chat template; leave out the oldest turns if the prompt would not fit the window."""
        return self.engine.encode(messages, max_new_tokens)

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        return self.engine.generation_kwargs(self.parameters, **overrides)

    def generate(self, messages: Chat, **overrides: Any) -> str:
        """Reply to `messages` (role/content dicts) synchronously; `overrides` are HF generation arguments."""
        return self.engine.generate(messages, self.parameters, overrides).text

    def generate_batch(self, conversations: list[Chat], n: int = 1, tools: list[dict] | None = None,
                       adapters: list[str | None] | None = None, **overrides: Any) -> list[replies.BatchReply]:
        """Reply to several conversations (or `n` times to each) in one left-padded `generate`.

        Returns `n` replies per conversation, conversation-major (all of the first conversation's, then the next).
        Each row stops at its own end of turn and reads its own tool calls (when `tools`, AgentScope tool schemas,
        are given). The settings are this model's, as for `generate`; with a seed, sample `i` is seeded with
        `seed + i`, so sample 0 is exactly the reply `generate` gives. `adapters`: one adapter name per
        conversation (None or "base" = the base model) instead of the active adapter for all; rows for different
        adapters still share the batch.
        """
        if n < 1:
            raise UserError(f"generate_batch: n must be at least 1 (got {n}).")
        if adapters is not None:
            if len(adapters) != len(conversations):
                raise UserError(f"generate_batch: adapters names one adapter per conversation ({len(conversations)}), "
                                f"got {len(adapters)}.")
            adapters = [self._known_adapter(name) for name in adapters]
        offered = replies.offered_tools(tools, None, self.handle.format)
        generated = self.engine.generate_batch(conversations, self.parameters, overrides, offered, n, adapters)
        chats = [chat for chat in conversations for _ in range(n)]
        return [replies.batch_reply(self.handle.format, g, chat, offered, self._count_unread)
                for g, chat in zip(generated, chats, strict=True)]

    def stream_text(self, messages: Chat, stop: threading.Event, streamer: Any = None,
                    **overrides: Any) -> tuple[Any, Any, int]:
        """Start generating on the compute thread; text pieces arrive on the returned streamer (an iterator by
        default); the second item's `join()` waits for the reply to finish."""
        return self.engine.stream_text(messages, self.parameters, stop, streamer, **overrides)

    async def _call_api(self, model_name: str, messages: list[Msg], tools: list[dict] | None = None,
                        tool_choice: Any = None, **kwargs: Any) -> ChatResponse | AsyncGenerator[ChatResponse, None]:
        """Format the messages (tool calls and results included), generate, read the reply (text + tool calls)."""
        chat = await self._format(messages)
        offered = replies.offered_tools(tools, tool_choice, self.handle.format)
        settled = replies.settled_calls(messages, self.pure_tools) if offered else set()
        if not self.stream:
            started = time.perf_counter()
            reply = await self.engine.generate_async(chat, self.parameters, kwargs, offered)
            content, only_repeats = replies.without_repeats(
                replies.whole_reply(self.handle.format, reply.text, chat, offered, self._count_unread), settled)
            if only_repeats:  # answer from the results it has (the usage is the answer's, as when streaming)
                reply = await self.engine.generate_async(chat, self.parameters,
                                                         replies.answer_overrides(self.handle.format, kwargs, offered))
                content = [b for b in content if b.type == "text"] + replies.words_only(
                    replies.whole_reply(self.handle.format, reply.text, chat, offered))
            return ChatResponse(content=content, is_last=True, usage=replies.usage(reply, started))
        return replies.stream_responses(self.engine, self.handle.format, self.parameters, chat, kwargs, offered,
                                        self._count_unread, settled)

    def _count_unread(self) -> None:
        self.unread_calls += 1

    async def count_tokens(self, messages: list[Msg], tools: list[dict] | None = None) -> int:
        return self.engine.count_tokens(await self._format(messages), replies.offered_tools(tools, None,
                                                                                              self.handle.format))

    async def _format(self, messages: list[Msg]) -> Chat:
        return replies.template_messages(await self.formatter.format(messages))

    # ---------------------------------------------------------------------------------------- fine-tuning

    def fine_tune(self, data_path: str | None = None, fine_tune_config: dict[str, Any] | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  stop: threading.Event | None = None) -> FineTuneResult:
        """Train a new LoRA adapter on `data_path` (SFT, or DPO/ORPO/KTO with `method`); afterwards it serves replies.

        A second call continues from the current adapter's weights in a new, named adapter (the previous
        one stays available for `use_adapter`/`undo`); nothing stacks. An identical earlier run (same
        base, data, config, system prompt) is reused unless `force_retrain` is set.
        """
        self.handle.require_whole_weights("fine-tune again")
        data_path = data_path or self.data_path
        if not data_path:
            raise FineTuneError("No data to fine-tune on: give data_path (a .jsonl/.json/.csv/.parquet file or hub id).")
        cfg = FineTuneConfig.from_dict(self._config(fine_tune_config), self.device)
        check_layers(cfg.lora_config, self.handle.module)
        recipe = training.fine_tune
        if cfg.method != "sft":  # DPO / ORPO / KTO on preference data: the preference recipe
            from hfmodel import preference

            recipe = preference.fine_tune
        # int8 serving weights: the run trains on the fp32 base (reloaded for the run), then int8 serves again.
        with full_precision(self.handle) if self.handle.int8 is not None else nullcontext():
            self.last_result = recipe(self.handle, self.adapter_set, str(data_path), cfg, self.system_prompt,
                                      self.model, progress, stop or threading.Event())
        return self.last_result

    def dry_run(self, data_path: str | None = None,
                fine_tune_config: dict[str, Any] | None = None) -> DryRun | PreferenceDryRun:
        """What a fine-tune would see: format, rows, token lengths, truncation, and the loss mask of row 1."""
        data_path = data_path or self.data_path
        if not data_path:
            raise FineTuneError("No data given: /dryrun <file or hub dataset id>.")
        cfg = FineTuneConfig.from_dict(self._config(fine_tune_config))
        from hfmodel import preference

        if cfg.method != "sft" or preference.looks_like_preference(str(data_path)):  # pairs need no method=...
            return preference.dry_run(self.handle, str(data_path), cfg, self.system_prompt)
        return training.dry_run(self.handle, str(data_path), cfg, self.system_prompt)

    def practice(self, tasks: str | list[Any], settings: dict[str, Any] | PracticeSettings | None = None,
                 fine_tune_config: dict[str, Any] | None = None, toolkit: Any = None,
                 agent_factory: Callable[[Any, Any], Any] | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None, stop: threading.Event | None = None
                 ) -> PracticeResult:
        """Improve from verified outcomes: sample `k` attempts per task through an AgentScope agent with `toolkit`
        (a `Toolkit`), score them (the task's `answer`, or `settings["verifier"]`), train on the accepted ones (RFT)
        or with GRPO; then report before/after on held-out tasks (`report.md` + `loss.png` in the run folder).

        `tasks`: a tasks file or hub id (rows with `prompt` or `messages`, and `answer`; optional `tools`: the names
        of the toolkit's tools the task offers, [] for none, all of them without the key), or a list of `Task`s.
        `settings`: practice keys (see `hfmodel.practice.PracticeSettings`: k, rounds, method, keep, temperature,
        ...); `fine_tune_config`: the training step's settings (default: this model's configured ones).
        `agent_factory(view, toolkit)`: builds the agent of one attempt around a model view and that task's toolkit
        (a `Toolkit` of its tools, or None; default: a plain AgentScope Agent).
        On Ctrl-C or a failure the adapter that served before keeps serving.
        """
        from hfmodel import practice

        self.handle.require_whole_weights("practise")
        chosen = practice.make_settings(settings)
        factory = agent_factory or practice.agent_factory("assistant", self.system_prompt)
        result = practice.practice(self, tasks, chosen, self._config(fine_tune_config), factory,
                                   practice.tool_schemas(toolkit), self.system_prompt, self.data_path, progress, stop,
                                   toolkit=toolkit)
        if is_main_process():
            practice.write_report(result)
        return result

    def _config(self, fine_tune_config: dict[str, Any] | None) -> dict[str, Any] | None:
        return fine_tune_config if fine_tune_config is not None else self.fine_tune_config

    # ---------------------------------------------------------------------------------------- adapters

    def load_adapter(self, path: str | Path, note: str = "loaded") -> AdapterRecord:
        """Load a LoRA adapter folder on top of the current base model and make it active."""
        return self.adapter_set.load(path, note)

    def use_adapter(self, name: str | None) -> None:
        """Serve with adapter `name` (None or "base" = the base model); instant, nothing reloads."""
        self.adapter_set.use(name)

    def undo(self) -> str | None:
        """Go back to the adapter that was active before the last switch or fine-tune."""
        return self.adapter_set.undo()

    def adapter_disabled(self) -> Any:
        """Temporarily serve the base model (for before/after comparisons)."""
        return self.adapter_set.disabled()

    def serving(self, name: str | None) -> Any:
        """Serve with adapter `name` (None = base) inside a `with` block only."""
        return self.adapter_set.serving(name)

    def reply_adapter(self, name: str | None) -> Any:
        """Inside this `with` block (in this thread or asyncio task), this model's replies are served with adapter
        `name` (None or "base" = the base model) while the active adapter stays as it is; concurrent replies for
        different adapters share one batch."""
        from hfmodel.generation import reply_adapter

        return reply_adapter(self._known_adapter(name))

    def _known_adapter(self, name: str | None) -> str | None:
        """`name` as served: None for the base ("base" too); an unknown name is refused in one line."""
        if name in (None, "base"):
            return None
        self.adapter_set._check_known(name)
        return name

    def save_adapter(self, dest: str | Path, name: str | None = None) -> Path:
        """Save adapter `name` (default: the active one) + tokenizer to a new folder `dest`."""
        chosen = name or self.active_adapter
        if chosen is None:
            raise FineTuneError("No adapter is active; nothing to save (the base model is unchanged).")
        return self.adapter_set.save(chosen, Path(dest).expanduser())

    def export_merged(self, dest: str | Path) -> Path:
        """Write base + active adapter merged into one model folder loadable by `from_pretrained`."""
        return self.adapter_set.export_merged(dest)

    def verify_export(self, folder: str | Path) -> float:
        """Max logit difference between a merged folder, loaded back, and base + active adapter."""
        return self.adapter_set.verify_export(Path(folder))

    def export_gguf(self, dest: str | Path, out_type: str = "q8_0", system_prompt: str | None = None) -> GGUFExport:
        """Write base + active adapter merged as `dest`/model-<out_type>.gguf ("f16" or "q8_0") with an Ollama
        Modelfile (SYSTEM = `system_prompt`, else this model's) and a README, then load the GGUF back through
        transformers and compare: `result.check.line()` says how it went (a failed check keeps the file).

        With no adapter active the base is exported only when it is a local folder (a model of yours); the
        unchanged hub or bundled model is refused."""
        dest = Path(dest).expanduser()
        check_exportable(self.handle.base_model().config.get_text_config(), self.tokenizer, out_type)
        if self.active_adapter is None and (self.source is None or self.source.kind != "local"):
            where = self.source.describe() if self.source else self.model_id
            raise FineTuneError(f"No adapter is active and the base is the unchanged {where}: nothing of yours to "
                                "export. Fine-tune or /use an adapter first.")
        self.adapter_set.check_mergeable(allow_base=True)
        check_destination(dest)
        with self.adapter_set.merged(allow_base=True) as merged:
            return export_folder(merged, self.tokenizer, dest, out_type,
                                 system_prompt if system_prompt is not None else self.system_prompt,
                                 self.parameters.temperature, self.parameters.top_p, list(self.stop_token_ids))
