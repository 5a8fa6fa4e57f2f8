"""Generation engines: render a conversation, generate a reply (blocking or streamed), count tokens.

An engine knows nothing of AgentScope or the chat loop. To add a backend, write a class with the methods of
`TransformersEngine` (`encode`, `generate`, `stream_text`, `stream`, `count_tokens`) and register it in `ENGINES`;
`model_configs` then picks it with `"engine": "<name>"`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from hfmodel.common import logger
from hfmodel.loading import ModelHandle

Chat = list[dict[str, str]]


@dataclass
class Generated:
    """One finished reply and its token counts."""

    text: str
    input_tokens: int
    output_tokens: int


class TransformersEngine:
    """`model.generate` from transformers, on the handle's model (with whichever adapter is active)."""

    def __init__(self, handle: ModelHandle, before_run: Callable[[], None] | None = None) -> None:
        self.handle = handle
        # Called under the generation lock right before generate(): agents sharing one base switch to their own
        # adapter there, so the switch and the reply are one step (see team.py).
        self.before_run = before_run
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
            tokenizer = self.handle.tokenizer
            if self._digits is None or self._digits[0] is not tokenizer:  # /load can bring another tokenizer
                self._digits = (tokenizer, digit_tokens(tokenizer))
            kwargs["logits_processor"] = LogitsProcessorList(
                [ReplyRepetitionPenalty(float(penalty), n_in, self._digits[1])])
        return enc, kwargs

    def _run(self, enc: dict[str, torch.Tensor], kwargs: dict[str, Any], seed: int | None) -> torch.Tensor:
        """One generate() call under the lock; reseeded first: same history + settings -> same reply."""
        with self.handle.lock, torch.inference_mode():
            if self.before_run is not None:
                self.before_run()
            if seed is not None:
                torch.manual_seed(seed)
            return self.handle.module.generate(**enc, **kwargs)

    # ------------------------------------------------------------------------------------ generate

    def generate(self, messages: Chat, parameters: Any, overrides: dict[str, Any],
                 tools: list[dict] | None = None) -> Generated:
        """The whole reply at once."""
        enc, kwargs = self._prepare(messages, parameters, overrides, tools)
        out = self._run(enc, kwargs, parameters.seed)
        n_in = int(enc["input_ids"].shape[1])
        new = out[0, n_in:]
        return Generated(self.handle.tokenizer.decode(new, skip_special_tokens=True).strip(), n_in, len(new))

    def stream_text(self, messages: Chat, parameters: Any, stop: threading.Event, streamer: Any = None,
                    tools: list[dict] | None = None, **overrides: Any) -> tuple[Any, threading.Thread, int]:
        """Start generating in a thread; text pieces arrive on the returned streamer (an iterator by default).

        The streamer gets `.counter` (tokens generated so far) and, if generation fails, `.error`.
        """
        enc, kwargs = self._prepare(messages, parameters, overrides, tools)
        if streamer is None:
            streamer = TextIteratorStreamer(self.handle.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(stop)])
        counter = _TokenCounter()
        kwargs["streamer"] = _Tee(streamer, counter)

        def run() -> None:
            try:
                self._run(enc, kwargs, parameters.seed)
            except Exception as e:  # noqa: BLE001 - surfaced to the reader through the streamer
                streamer.error = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name="hf-generate")
        thread.start()
        streamer.counter = counter
        return streamer, thread, int(enc["input_ids"].shape[1])

    async def stream(self, messages: Chat, parameters: Any, overrides: dict[str, Any],
                     tools: list[dict] | None = None) -> AsyncIterator[str | Generated]:
        """Text pieces as they are generated, then one `Generated` with the token counts (its text is empty)."""
        stop = threading.Event()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        streamer: Any = _AsyncQueueStreamer(self.handle.tokenizer, asyncio.get_running_loop(), queue)
        _, thread, n_in = await asyncio.to_thread(self.stream_text, messages, parameters, stop, streamer, tools,
                                                  **overrides)
        try:
            while (piece := await queue.get()) is not None:
                if piece:
                    yield piece
            error = getattr(streamer, "error", None)
            if error is not None:
                raise error
            yield Generated("", n_in, streamer.counter.count)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)

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


def create_engine(name: str, handle: ModelHandle) -> TransformersEngine:
    if name not in ENGINES:
        from hfmodel.common import ModelLoadError

        raise ModelLoadError(f"Unknown engine '{name}'. Available: {', '.join(ENGINES)}.")
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


# =============================================================================================
# Streaming helpers


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


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
    def __init__(self) -> None:
        self.count = 0
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the first call carries the prompt
            self.first = False
            return
        self.count += int(value.numel())

    def end(self) -> None:
        pass


class _Tee:
    """Feed generated ids to the text streamer and the token counter."""

    def __init__(self, *streamers: Any) -> None:
        self.streamers = streamers

    def put(self, value: torch.Tensor) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()
