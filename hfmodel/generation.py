"""Generation engines: render a conversation, generate a reply (blocking or streamed), count tokens.

An engine knows nothing of AgentScope or the chat loop. To add a backend, write a class with the methods of
`TransformersEngine` (`encode`, `generate`, `stream_text`, `stream`, `count_tokens`) and register it in `ENGINES`;
`model_configs` then picks it with `"engine": "<name>"`.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hfmodel.common import logger
from hfmodel.loading import ModelHandle

Chat = list[dict[str, str]]
# Rows of a batch that begin with at least this many equal tokens (the system prompt and tool schemas of practice
# rollouts or of agents sharing a prompt) have that part computed once for the whole batch. Below it, the extra forward
# call costs about what it saves.
SHARED_PREFIX_MIN = 32
# A reply's adapter chosen per reply (`reply_adapter`, `generate_batch(adapters=...)`), rather than the model's active
# one: such replies share a batch whatever their adapters (peft serves each row its own, see `speedups.serving_rows`).
ACTIVE = "<active>"  # Request.adapter: no per-reply choice, the model serves whichever adapter is active
_REPLY_ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("reply_adapter")


@contextmanager
def reply_adapter(name: str | None) -> Iterator[None]:
    """Replies requested inside the block (in this thread, or this asyncio task) are served with adapter `name`
    (None = the base model) whatever adapter is active, and batch with replies for other adapters."""
    token = _REPLY_ADAPTER.set(name)
    try:
        yield
    finally:
        _REPLY_ADAPTER.reset(token)


@dataclass
class Generated:
    """One finished reply and its token counts."""

    text: str
    input_tokens: int
    output_tokens: int


@dataclass(eq=False)
class Request:
    """One reply waiting for the compute thread: its rendered prompt, its generate() settings (the repetition penalty
    apart: its processor is built per batch), its seed, and for a streamed reply its streamer and stop event."""

    engine: TransformersEngine
    enc: dict[str, torch.Tensor]
    kwargs: dict[str, Any]
    penalty: float | None
    seed: int | None
    streamer: Any
    stop: threading.Event
    key: Hashable
    adapter: str | None = ACTIVE  # the adapter this row is served with (ACTIVE: the model's active one)
    future: Future = field(default_factory=Future)
    streamed: bool = False  # text of this reply has reached its reader (it cannot be generated again unseen)

    @property
    def n_in(self) -> int:
        return int(self.enc["input_ids"].shape[1])

    def run_group(self, group: list[Request]) -> None:
        self.engine.run_group(group)

    def finish(self, result: Generated) -> None:
        self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if self.streamer is not None:
            self.streamer.error = error
            self.streamer.end()
        self.future.set_exception(error)


class Pending:
    """A reply running on the compute thread; `join` waits for it (like the generation thread it replaces)."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def join(self, timeout: float | None = None) -> None:
        try:
            self.future.exception(timeout)
        except TimeoutError:
            pass

    def is_alive(self) -> bool:
        return not self.future.done()


class TransformersEngine:
    """`model.generate` from transformers, on the handle's model (with whichever adapter is active)."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        # An agent sharing one base with others (team.py): its own adapter, named by each of its replies, so the
        # switch happens under the generation lock with the reply it serves, and agents' replies share batches.
        self.agent_adapter: Callable[[], str | None] | None = None
        self._digits: tuple[Any, torch.Tensor] | None = None  # (tokenizer, its digit token ids), for the penalty

    # ------------------------------------------------------------------------------------ prompt

    def encode(self, messages: Chat, max_new_tokens: int, tools: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """Render with the chat template (and the tool schemas); leave out the oldest turns if the prompt would not
        fit the window."""
        handle = self.handle
        handle.require_whole_weights("generate")
        window = handle.context_size
        # Keep at least half the window for the prompt, whatever max_new_tokens asks for.
        budget = window - min(max_new_tokens, window // 2)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]

        def render(dropped: int) -> dict[str, torch.Tensor]:
            kept = turns[dropped:] if dropped == 0 else _from_user_turn(turns[dropped:])
            return dict(handle.format.render_prompt(system + kept, tools=tools))

        enc = render(0)
        if enc["input_ids"].shape[1] > budget and len(turns) > 1:
            dropped = self._fewest_to_drop(turns, budget, lambda n: int(render(n)["input_ids"].shape[1]))
            enc = render(dropped)
            logger.warning("The conversation is longer than the model's window (%d tokens): left out the %d "
                           "oldest message(s) for this reply.", window, dropped)
        length = enc["input_ids"].shape[1]
        if length > budget:
            logger.warning("This message alone is %d tokens; the model sees only its last %d.", length, budget)
            enc = {k: v[:, -budget:] for k, v in enc.items()}
        return {k: v.to(handle.device) for k, v in enc.items()}

    @staticmethod
    def _fewest_to_drop(turns: Chat, budget: int, length_without: Callable[[int], int]) -> int:
        """Fewest oldest messages to leave out, by bisection: O(log n) renders, not one per turn."""
        low, high = 1, len(turns) - 1
        while low < high:
            mid = (low + high) // 2
            if length_without(mid) <= budget:
                high = mid
            else:
                low = mid + 1
        if turns[low]["role"] != "user" and low < len(turns) - 1:
            low += 1  # start on a user turn, as every chat template expects
        return low

    def generation_kwargs(self, parameters: Any, **overrides: Any) -> dict[str, Any]:
        """transformers' generate() arguments from the wrapper's Parameters; `overrides` win."""
        p = parameters
        kwargs: dict[str, Any] = {
            "max_new_tokens": p.max_length,
            "do_sample": p.do_sample,
            "repetition_penalty": p.repetition_penalty,
            "eos_token_id": self.handle.stop_token_ids,
            "pad_token_id": self.handle.tokenizer.pad_token_id if self.handle.tokenizer else None,
        }
        if p.do_sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p)
        kwargs.update(overrides)
        if not kwargs.get("do_sample"):
            for key in ("temperature", "top_p", "top_k"):
                kwargs.pop(key, None)
        return kwargs

    def _prepare(self, messages: Chat, parameters: Any, overrides: dict[str, Any], tools: list[dict] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        kwargs = self.generation_kwargs(parameters, **overrides)
        enc = self.encode(messages, kwargs["max_new_tokens"], tools)
        n_in = int(enc["input_ids"].shape[1])
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], self.handle.context_size - n_in)
        # Our own repetition penalty (see ReplyRepetitionPenalty); 1.0 also turns off one in the generation_config.
        penalty = kwargs.pop("repetition_penalty", None)
        kwargs["repetition_penalty"] = 1.0
        if penalty is not None and penalty != 1.0:
            kwargs["logits_processor"] = LogitsProcessorList(
                [*(kwargs.get("logits_processor") or []),
                 ReplyRepetitionPenalty(float(penalty), n_in, self._digit_ids())])
        return enc, kwargs

    def _run(self, enc: dict[str, torch.Tensor], kwargs: dict[str, Any], seed: int | None, shared: int = 0,
             adapters: list[str | None] | None = None) -> torch.Tensor:
        """One generate() call under the lock; reseeded first: same history + settings -> same reply. `shared`: the
        rows' first `shared` tokens are the same (see `_layout`); they are run once and the batch starts from
        their cache. `adapters`: each row's own adapter (None = the base), else the active one serves every row."""
        from hfmodel.speedups import serving_rows

        with self.handle.lock, torch.inference_mode(), serving_rows(self.handle.module, adapters) as extra:
            if seed is not None:
                torch.manual_seed(seed)
            if shared:
                kwargs = {**kwargs, "cache": self._prefix_cache(enc["input_ids"], shared)}
            return self.handle.module.generate(**enc, **kwargs, **extra)

    def _prefix_cache(self, ids: torch.Tensor, shared: int) -> Any:
        """The KV cache of the rows' shared first tokens, computed for one row and repeated for every row."""
        from transformers import DynamicCache

        module = self.handle.module
        cache = DynamicCache(config=self.handle.base_model().config)
        extra = {"logits_to_keep": 1} if self._keeps_logits() else {}
        module(input_ids=ids[:1, :shared], cache=cache, use_cache=True, **extra)
        cache.batch_repeat_interleave(int(ids.shape[0]))
        return cache

    def _keeps_logits(self) -> bool:
        import inspect

        return "logits_to_keep" in inspect.signature(self.handle.base_model().forward).parameters

    def _can_share_prefix(self) -> bool:
        """Only for models whose every layer keeps a plain attention cache (no recurrent or linear-attention state,
        no cache type chosen by the model's generation config), which `DynamicCache` holds exactly."""
        model = self.handle.base_model()
        if getattr(model.generation_config, "cache_implementation", None) not in (None, "dynamic"):
            return False
        text = model.config.get_text_config()
        kinds = getattr(text, "layer_types", None) or ["full_attention"]
        return all(kind in ("full_attention", "sliding_attention") for kind in kinds)

    # ------------------------------------------------------------------------------------ requests

    def request(self, messages: Chat, parameters: Any, overrides: dict[str, Any], tools: list[dict] | None = None,
                streamer: Any = None, stop: threading.Event | None = None, seed: int | None | str = "settings",
                adapter: str | None = ACTIVE) -> Request:
        """One reply to run on the compute thread (the prompt rendered here, on the caller's thread). `adapter`: the
        adapter to serve it with (None = the base); by default the one `reply_adapter` chose, else the agent's own
        (a team, see team.py), else the active one."""
        enc, kwargs = self._prepare(messages, parameters, overrides, tools)
        processors = list(kwargs.pop("logits_processor", None) or [])
        penalty = next((p.penalty for p in processors if isinstance(p, ReplyRepetitionPenalty)), None)
        own = [p for p in processors if not isinstance(p, ReplyRepetitionPenalty)]
        if own:  # a caller's own processors run as given (such a request never shares a batch: see _batch_key)
            kwargs["logits_processor"] = LogitsProcessorList(own)
        chosen = parameters.seed if seed == "settings" else seed
        if adapter == ACTIVE:
            adapter = _REPLY_ADAPTER.get(self.agent_adapter() if self.agent_adapter is not None else ACTIVE)
        # Every reply can be stopped: a Ctrl-C or a cancelled await stops its row, not just the wait for it.
        return Request(self, enc, kwargs, penalty,
                       None if chosen is None else int(chosen), streamer, stop or threading.Event(),
                       self._batch_key(kwargs, adapter), adapter)

    def _batch_key(self, kwargs: dict[str, Any], adapter: str | None = ACTIVE) -> Hashable:
        """Requests with equal keys may share one generate(): the same model and settings, and the same adapter unless
        each row names its own (each row keeps its own max_new_tokens, seed and named adapter)."""
        settings = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
        try:
            frozen = repr(sorted((k, _frozen(v)) for k, v in settings.items()))
        except TypeError:  # an override we cannot compare (a processor object, ...): this reply runs alone
            return object()
        return id(self.handle), adapter == ACTIVE, frozen

    def run_group(self, group: list[Request]) -> None:
        """Run requests that share a key as one batch (the compute thread calls this). If the batch fails, each
        request that has not streamed anything yet runs again alone, so one bad request costs only its own reply."""
        live = [r for r in group if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._generate_rows(live)
        except Exception as e:  # noqa: BLE001 - handed to each caller (re-raised there) or retried alone
            if len(live) == 1:
                live[0].fail(e)
                return
            for r in live:
                if r.streamed:
                    r.fail(e)
                    continue
                try:
                    r.finish(self._generate_rows([r])[0])
                except Exception as alone:  # noqa: BLE001 - the caller re-raises it
                    r.fail(alone)
            return
        for r, result in zip(live, results, strict=True):
            r.finish(result)

    def _generate_rows(self, rows: list[Request]) -> list[Generated]:
        """One generate() over `rows` (left-padded when there are several), each row cut at its own end of turn."""
        from hfmodel.speedups import can_mix_adapters

        adapters = [r.adapter for r in rows]
        named = adapters[0] != ACTIVE
        mixed = named and len(set(adapters)) > 1
        if mixed and not can_mix_adapters(self.handle.module, adapters):  # one generate() per adapter
            results: dict[int, Generated] = {}
            for name in dict.fromkeys(adapters):
                part = [i for i, a in enumerate(adapters) if a == name]
                results.update(zip(part, self._generate_rows([rows[i] for i in part]), strict=True))
            return [results[i] for i in range(len(rows))]
        sampled = bool(rows[0].kwargs.get("do_sample")) and len(rows) > 1
        warpers = self._warpers(rows[0].kwargs) if sampled else []
        if warpers is None:  # a sampling setting the per-row sampler does not reproduce: one row at a time
            return [self._generate_rows([r])[0] for r in rows]
        shared = 0 if mixed else self._shared_prefix(rows)  # the shared part's cache differs between adapters
        enc = rows[0].enc if len(rows) == 1 else self._layout(rows, shared)
        width = int(enc["input_ids"].shape[1])
        kwargs = dict(rows[0].kwargs)
        limits = [int(r.kwargs["max_new_tokens"]) for r in rows]
        kwargs["max_new_tokens"] = max(limits)
        processors: list[Any] = list(kwargs.pop("logits_processor", None) or [])
        if rows[0].penalty is not None:
            processors.append(ReplyRepetitionPenalty(rows[0].penalty, width, self._digit_ids()))
        if sampled:
            processors.append(RowSampler(warpers, [self._generator(r.seed) for r in rows]))
            kwargs["do_sample"] = False
            for key in ("temperature", "top_p", "top_k", "min_p"):
                kwargs.pop(key, None)
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        stops = _StopRows([r.stop for r in rows], limits, width)
        kwargs["stopping_criteria"] = StoppingCriteriaList([stops])
        if any(r.streamer is not None for r in rows):
            kwargs["streamer"] = _RowStreams(rows, set(self.handle.stop_token_ids), stops)
        out = self._run(enc, kwargs, rows[0].seed if len(rows) == 1 else None, shared, adapters if named else None)
        return [self._row_result(out[i, width:], r, stops.stopped_at[i]) for i, r in enumerate(rows)]

    def _row_result(self, new: torch.Tensor, request: Request, stopped_at: int | None) -> Generated:
        """The row's reply: up to its first end-of-turn token (the rest is padding) or where it was stopped."""
        count = len(new) if stopped_at is None else min(len(new), stopped_at)
        ends = [i for i, t in enumerate(new[:count].tolist()) if t in self.handle.stop_token_ids]
        count = ends[0] + 1 if ends else count
        text = self.handle.tokenizer.decode(new[:count], skip_special_tokens=True).strip()
        return Generated(text, request.n_in, count)

    def _shared_prefix(self, rows: list[Request]) -> int:
        """How many first tokens all rows share (the system prompt and tool schemas, typically), when it is worth
        computing them once for the batch: several rows, at least SHARED_PREFIX_MIN tokens, a model whose cache can
        be shared. Every row keeps at least one token of its own."""
        if len(rows) < 2 or any("attention_mask" in r.enc and not bool(r.enc["attention_mask"].all()) for r in rows):
            return 0
        first = rows[0].enc["input_ids"][0]
        n = min(r.n_in for r in rows) - 1
        for r in rows[1:]:
            differ = (r.enc["input_ids"][0][:n] != first[:n]).nonzero()
            n = int(differ[0]) if len(differ) else n
        return n if n >= SHARED_PREFIX_MIN and self._can_share_prefix() else 0

    def _layout(self, rows: list[Request], shared: int = 0) -> dict[str, torch.Tensor]:
        """The batch as [shared tokens][padding][each row's own tokens]; with nothing shared, plain left padding.
        The shared part sits at the same positions in every row (so its cache, computed once, fits every row), the
        padding is masked out, and the position ids generate() derives from the mask count on from the shared part,
        as in a row of its own."""
        width = shared + max(r.n_in - shared for r in rows)
        pad = self.handle.tokenizer.pad_token_id
        pad = pad if pad is not None else self.handle.stop_token_ids[0]
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long, device=self.handle.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.handle.device)
        for i, r in enumerate(rows):
            row_ids = r.enc["input_ids"][0]
            row_mask = r.enc.get("attention_mask", torch.ones_like(r.enc["input_ids"]))[0]
            ids[i, :shared], mask[i, :shared] = row_ids[:shared], row_mask[:shared]
            own = r.n_in - shared
            ids[i, width - own:], mask[i, width - own:] = row_ids[shared:], row_mask[shared:]
        return {"input_ids": ids, "attention_mask": mask}

    def _digit_ids(self) -> torch.Tensor:
        tokenizer = self.handle.tokenizer
        if self._digits is None or self._digits[0] is not tokenizer:  # /load can bring another tokenizer
            self._digits = (tokenizer, digit_tokens(tokenizer))
        return self._digits[1]

    def _warpers(self, kwargs: dict[str, Any]) -> list[Any] | None:
        """The warpers transformers would apply when sampling with these settings (same order, same arguments), or
        None for settings this sampler does not reproduce."""
        config = copy.deepcopy(self.handle.base_model().generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        if config.top_h is not None or (config.typical_p is not None and config.typical_p < 1.0) or any(
                c is not None and 0.0 < c < 1.0 for c in (config.epsilon_cutoff, config.eta_cutoff)):
            return None
        warpers: list[Any] = []
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
        return warpers

    def _generator(self, seed: int | None) -> torch.Generator:
        """A row's own random numbers: seeded like a single reply (the global generator after manual_seed(seed)
        draws the same numbers), or from the global generator when there is no seed."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        return torch.Generator(device=self.handle.device).manual_seed(seed)

    # ------------------------------------------------------------------------------------ generate

    def generate(self, messages: Chat, parameters: Any, overrides: dict[str, Any],
                 tools: list[dict] | None = None) -> Generated:
        """The whole reply at once (run on the compute thread; the caller waits)."""
        return self._wait(self.request(messages, parameters, overrides, tools))

    async def generate_async(self, messages: Chat, parameters: Any, overrides: dict[str, Any],
                             tools: list[dict] | None = None) -> Generated:
        """The whole reply, awaited: replies requested in the same event-loop turn run as one batch."""
        request = self.request(messages, parameters, overrides, tools)
        try:
            return await asyncio.wrap_future(self.handle.compute.submit_soon(request))
        except asyncio.CancelledError:
            request.stop.set()
            raise

    def generate_batch(self, conversations: list[Chat], parameters: Any, overrides: dict[str, Any],
                       tools: list[dict] | None = None, n: int = 1, adapters: list[str | None] | None = None
                       ) -> list[Generated]:
        """`n` replies to each conversation (conversation-major order) in as few generate() calls as fit.

        Each reply is the one `generate` would give alone: the same settings, and with a seed, sample `i` of a
        conversation is seeded with `seed + i` (sample 0 is the single reply). `adapters`: each conversation's
        adapter (None = the base); the rows still share one batch."""
        seed = parameters.seed
        chosen = adapters or [ACTIVE] * len(conversations)
        requests = [self.request(chat, parameters, overrides, tools,
                                 seed=None if seed is None else (seed + i) % 2**32, adapter=adapter)
                    for chat, adapter in zip(conversations, chosen, strict=True) for i in range(n)]
        futures = self.handle.compute.submit_all(requests)
        try:
            return [self._result(f) for f in futures]
        except KeyboardInterrupt:
            for r in requests:
                r.stop.set()
            raise

    def _wait(self, request: Request) -> Generated:
        compute = self.handle.compute
        if compute.on_worker():  # already on the compute thread (a job that generates): run here
            self.run_group([request])
            return self._result(request.future)
        try:
            return self._result(compute.submit(request))
        except KeyboardInterrupt:  # Ctrl-C while waiting: the reply stops too
            request.stop.set()
            raise

    @staticmethod
    def _result(future: Future) -> Generated:
        result = future.result()
        assert isinstance(result, Generated)
        return result

    def stream_text(self, messages: Chat, parameters: Any, stop: threading.Event, streamer: Any = None,
                    tools: list[dict] | None = None, **overrides: Any) -> tuple[Any, Pending, int]:
        """Start generating on the compute thread; text pieces arrive on the returned streamer (an iterator by
        default). Also returned: the pending reply (`join()` waits for it) and the prompt length.

        The streamer gets `.counter` (tokens generated so far) and, if generation fails, `.error`.
        """
        if streamer is None:
            streamer = TextIteratorStreamer(self.handle.tokenizer, skip_prompt=True, skip_special_tokens=True)
        request = self.request(messages, parameters, overrides, tools, streamer=streamer, stop=stop)
        return streamer, Pending(self.handle.compute.submit(request)), request.n_in

    async def stream(self, messages: Chat, parameters: Any, overrides: dict[str, Any],
                     tools: list[dict] | None = None) -> AsyncIterator[str | Generated]:
        """Text pieces as they are generated, then one `Generated` with the token counts (its text is empty)."""
        stop = threading.Event()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        streamer: Any = _AsyncQueueStreamer(self.handle.tokenizer, asyncio.get_running_loop(), queue)
        request = self.request(messages, parameters, overrides, tools, streamer=streamer, stop=stop)
        future = asyncio.wrap_future(self.handle.compute.submit_soon(request))
        try:
            while (piece := await queue.get()) is not None:
                if piece:
                    yield piece
            error = getattr(streamer, "error", None)
            if error is not None:
                raise error
            yield Generated("", request.n_in, streamer.counter.count)
        finally:
            stop.set()
            await asyncio.wait([future])  # the row has stopped
            if not future.cancelled():
                future.exception()  # its error, if any, was raised above

    def count_tokens(self, messages: Chat, tools: list[dict] | None = None) -> int:
        fmt = self.handle.format
        prepared = fmt.prepare(messages)
        enc = self.handle.tokenizer.apply_chat_template(prepared, chat_template=fmt.template_for(prepared, tools),
                                                        tools=tools, tokenize=True, return_dict=True)
        return len(enc["input_ids"])


def _from_user_turn(turns: Chat) -> Chat:
    """Turns left after dropping the oldest start at a user turn: never on an orphaned tool result or call."""
    start = next((i for i, m in enumerate(turns) if m.get("role") == "user"), 0)
    return turns[start:]


ENGINES: dict[str, type[TransformersEngine]] = {"transformers": TransformersEngine}


def check_engine(name: str) -> None:
    if name not in ENGINES:
        from hfmodel.common import ModelLoadError

        raise ModelLoadError(f"Unknown engine '{name}'. Available: {', '.join(ENGINES)}.")


def create_engine(name: str, handle: ModelHandle) -> TransformersEngine:
    check_engine(name)
    return ENGINES[name](handle)


class ReplyRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """transformers' repetition penalty, counting only the reply's own tokens and sparing digits.

    transformers counts the prompt too, and the prompt holds what a reply has to copy: the question's numbers and
    names, the tool results and the tool-call format. Digit tokens repeat inside any number ("6048" after "96 times
    63"), so penalising them changes the number. Loops of words are still held back, which is what the penalty is for.
    """

    def __init__(self, penalty: float, prompt_length: int, spared: torch.Tensor) -> None:
        super().__init__(penalty, prompt_ignore_length=prompt_length)
        self.spared = spared

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        spared = self.spared.to(scores.device)
        kept = scores[..., spared].clone()
        out = super().__call__(input_ids, scores)
        out[..., spared] = kept
        return out


def digit_tokens(tokenizer: Any) -> torch.Tensor:
    """Ids of the tokens that are digits only (with or without a leading space marker)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([i for i, t in enumerate(pieces) if isinstance(t, str) and t.lstrip("Ġ▁ ").isdecimal()],
                        dtype=torch.long)


def _frozen(value: Any) -> Any:
    """`value` as something comparable by repr, for batch keys; TypeError for objects (processors, tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    raise TypeError(type(value).__name__)


class RowSampler(LogitsProcessor):
    """Sampling for a batch in which every row draws from its own generator, so a row's reply does not depend on
    the other rows: transformers' warpers (temperature, top-k, top-p, min-p), softmax and multinomial per row, as
    generate() does for one reply with the global generator. Returns scores where only the drawn token is finite;
    generate() then runs greedy (do_sample=False) and picks it."""

    def __init__(self, warpers: list[Any], generators: list[torch.Generator]) -> None:
        self.warpers, self.generators = warpers, generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        drawn = torch.cat([torch.multinomial(probs[i:i + 1], num_samples=1, generator=g)
                           for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, drawn, 0.0)  # type: ignore[return-value]


# =============================================================================================
# Streaming helpers


class _StopRows(StoppingCriteria):
    """Stops each row on its own: when its reader closed the stream (its stop event) or at its own max_new_tokens.
    Records where each row stopped, for its token count."""

    def __init__(self, events: list[threading.Event], limits: list[int], prompt_width: int) -> None:
        self.events, self.limits, self.width = events, limits, prompt_width
        self.stopped_at: list[int | None] = [None] * len(events)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        made = int(input_ids.shape[1]) - self.width
        done = []
        for i, (event, limit) in enumerate(zip(self.events, self.limits, strict=True)):
            stop = made >= limit or event.is_set()
            if stop and self.stopped_at[i] is None:
                self.stopped_at[i] = made
            done.append(self.stopped_at[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _RowStreams:
    """generate()'s streamer for a batch: hands each row's tokens to that row's own streamer (its prompt first, as
    transformers does), until the row's end of turn or until `_StopRows` stopped it; counts each row's tokens."""

    def __init__(self, rows: list[Request], stop_ids: set[int], stops: _StopRows) -> None:
        self.rows, self.stop_ids, self.stops = rows, stop_ids, stops
        self.done = [r.streamer is None for r in rows]
        self.started = False
        for r in rows:
            if r.streamer is not None:
                r.streamer.counter = _TokenCounter()

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first call carries the (padded) prompts: each row's own prompt instead
            self.started = True
            for r in self.rows:
                if r.streamer is not None:
                    r.streamer.put(r.enc["input_ids"][0].cpu())
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            row = self.rows[i]
            row.streamer.put(torch.tensor([token]))
            row.streamed = True
            row.streamer.counter.count += 1
            if token in self.stop_ids or self.stops.stopped_at[i] is not None:
                self._end(i)

    def _end(self, i: int) -> None:
        self.done[i] = True
        self.rows[i].streamer.end()

    def end(self) -> None:
        for i, done in enumerate(self.done):
            if not done:
                self._end(i)


class _AsyncQueueStreamer(TextStreamer):
    """Hands decoded text from the generation thread straight to the event loop (no thread hop per token)."""

    def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop, self.queue = loop, queue

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _TokenCounter:
    """Tokens handed to one row's streamer so far (`streamer.counter.count`)."""

    def __init__(self) -> None:
        self.count = 0
