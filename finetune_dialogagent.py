"""`Finetune_DialogAgent` (an AgentScope `Agent` whose model can be fine-tuned); `build_model`; the terminal
`UserAgent` (defined in chat/terminal.py, importable from here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from agentscope.agent import Agent, ContextConfig, InjectionConfig, ModelConfig, ReActConfig
from agentscope.event import (
    ConfirmResult,
    ModelCallEndEvent,
    RequireUserConfirmEvent,
    TextBlockDeltaEvent,
    ToolCallDeltaEvent,
    ToolCallStartEvent,
    ToolResultEndEvent,
    ToolResultTextDeltaEvent,
    UserConfirmResultEvent,
)
from agentscope.message import Msg, ToolCallBlock

from chat.terminal import UserAgent  # noqa: F401 - the terminal user, importable from here as before
from hfmodel.practice import PracticeResult, PracticeSettings
from hfmodel.replies import result_text
from huggingface_model import FineTuneError, FineTuneResult, HuggingFaceWrapper, ModelLoadError

_REGISTRY: dict[str, dict[str, Any]] = {}


def register_model_configs(model_configs: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Make `model_configs` entries available by `config_name` (what `agentscope.init` did in 0.x)."""
    for entry in [model_configs] if isinstance(model_configs, dict) else model_configs:
        if "config_name" not in entry:
            raise ModelLoadError(f"Every model_configs entry needs a 'config_name'; this one has: {sorted(entry)}.")
        _REGISTRY[entry["config_name"]] = entry


def build_model(config_name: str, model_configs: list[dict[str, Any]] | None = None, **overrides: Any
                ) -> HuggingFaceWrapper:
    """Build the wrapper for one `model_configs` entry, found by its `config_name`."""
    if model_configs is not None:
        register_model_configs(model_configs)
    if config_name not in _REGISTRY:
        known = ", ".join(_REGISTRY) or "none registered"
        raise ModelLoadError(f"No model_configs entry has config_name '{config_name}' (known: {known}).")
    return HuggingFaceWrapper.from_config(_REGISTRY[config_name], **overrides)


class Finetune_DialogAgent(Agent):  # noqa: N801 - the name users of the original example know
    """A dialog agent whose Hugging Face model can be (re)loaded and fine-tuned mid-conversation.

    The conversation history (`agent.state.context`) survives `load_model`, `load_tokenizer` and `fine_tune`.
    """

    def __init__(self, name: str, sys_prompt: str, model: HuggingFaceWrapper | str,
                 model_configs: list[dict[str, Any]] | None = None, toolkit: Any = None,
                 max_tool_rounds: int = 5) -> None:
        """`toolkit`: an AgentScope `Toolkit`, or a list of functions (see chat_tools.make_toolkit)."""
        if isinstance(model, str):
            model = build_model(model, model_configs, system_prompt=sys_prompt)
        if isinstance(toolkit, list):
            from chat.tools import make_toolkit, pure_tool_names

            if isinstance(model, HuggingFaceWrapper):
                model.pure_tools |= pure_tool_names(toolkit)
            toolkit = make_toolkit(toolkit)
        super().__init__(
            name=name,
            system_prompt=sys_prompt,
            model=model,
            toolkit=toolkit,
            # A small model that keeps calling tools must not loop for the library's default 50 rounds.
            react_config=ReActConfig(max_iters=max_tool_rounds),
            # The runtime-state reminder would enter the history and the training rows made from it.
            injection_config=InjectionConfig(inject_runtime_state=False),
            context_config=ContextConfig(compression_tool_enabled=False),
            # A failed local generation will fail again: no retries.
            model_config=ModelConfig(max_retries=0),
        )
        self.sys_prompt = sys_prompt
        self.reply_cut = False  # the last stream_reply: a model turn stopped at max_length, not at its own end
        self.reply_unread = False  # the last stream_reply: a model turn's tool-call markup could not be read

    @property
    def sys_prompt(self) -> str:
        return self._system_prompt

    @sys_prompt.setter
    def sys_prompt(self, prompt: str) -> None:
        self._system_prompt = prompt
        if hasattr(self.model, "system_prompt"):
            self.model.system_prompt = prompt  # training rows get the prompt the chat uses

    def _wrapper(self, action: str) -> HuggingFaceWrapper:
        if not isinstance(self.model, HuggingFaceWrapper):
            raise FineTuneError(f"{self.name}'s model ({type(self.model).__name__}) cannot {action}; "
                                "use a HuggingFaceWrapper (model_type 'huggingface').")
        return self.model

    def load_model(self, model_id: str | None = None, local_model_path: str | None = None) -> None:
        self._wrapper("load models").load_model(model_id, local_model_path)

    def load_tokenizer(self, model_id: str | None = None, local_tokenizer_path: str | None = None) -> None:
        self._wrapper("load tokenizers").load_tokenizer(model_id, local_tokenizer_path)

    def fine_tune(self, data_path: str | None = None, fine_tune_config: dict[str, Any] | None = None,
                  **kwargs: Any) -> FineTuneResult:
        return self._wrapper("fine-tune").fine_tune(data_path, fine_tune_config, **kwargs)

    def practice(self, tasks: str | list[Any], settings: dict[str, Any] | PracticeSettings | None = None,
                 fine_tune_config: dict[str, Any] | None = None, **kwargs: Any) -> PracticeResult:
        """Practise `tasks` with this agent's tools and system prompt (see `HuggingFaceWrapper.practice`): each attempt
        runs in a fresh agent like this one (its own history; this conversation is untouched)."""
        def factory(view: HuggingFaceWrapper, toolkit: Any) -> Finetune_DialogAgent:
            return Finetune_DialogAgent(self.name, self.sys_prompt, view, toolkit=toolkit,
                                        max_tool_rounds=self.react_config.max_iters)

        return self._wrapper("practise").practice(tasks, settings, fine_tune_config, toolkit=self.toolkit,
                                                 agent_factory=factory, **kwargs)

    async def compress_context(self, *args: Any, **kwargs: Any) -> None:
        """No summarising: the wrapper leaves the oldest turns out of a prompt that would not fit."""

    def history(self) -> list[dict[str, str]]:
        """The conversation as role/content dicts (what the model sees, minus the system prompt); a tool call shows
        as `-> name(arguments)`, its result as `= result`."""
        out = []
        for m in self.state.context:
            parts = []
            for block in m.get_content_blocks():
                if block.type == "text":
                    parts.append(block.text)
                elif block.type == "tool_call":
                    parts.append(ToolLine.of({"name": block.name, "input": block.input, "output": ""}).rstrip(" ="))
                elif block.type == "tool_result":
                    parts.append(f"= {' '.join(result_text(block).split())[:200]}")
            out.append({"role": m.role, "content": "\n".join(p for p in parts if p)})
        return out

    async def stream_reply(self, msg: Msg, confirm: Callable[[ToolCallBlock], bool] | None = None
                           ) -> AsyncIterator[str]:
        """Reply to `msg`, yielding text pieces as they are generated, and a `ToolLine` for each tool call once its
        result is in. A tool that needs permission is run only if `confirm(call)` says yes (no `confirm`: refused).
        Afterwards `reply_cut` says whether a model turn was cut at the model's `max_length` new tokens, and
        `reply_unread` whether a model turn wrote a tool call that could not be read (it was shown as text, and is
        left out of the conversation).
        """
        inputs: Any = msg
        self.reply_cut = False
        unread = getattr(self.model, "unread_calls", 0)
        limit = getattr(getattr(self.model, "parameters", None), "max_length", None)
        calls: dict[str, dict[str, str]] = {}  # by call id: name, arguments, result (a confirmation may come between)
        while inputs is not None:
            current, inputs, pending = inputs, None, None
            async for event in self.reply_stream(current):
                if isinstance(event, TextBlockDeltaEvent):
                    yield event.delta
                elif isinstance(event, ToolCallStartEvent):
                    calls[event.tool_call_id] = {"name": event.tool_call_name, "input": "", "output": ""}
                elif isinstance(event, ToolCallDeltaEvent) and event.tool_call_id in calls:
                    calls[event.tool_call_id]["input"] += event.delta
                elif isinstance(event, ToolResultTextDeltaEvent) and event.tool_call_id in calls:
                    calls[event.tool_call_id]["output"] += event.delta
                elif isinstance(event, ToolResultEndEvent) and event.tool_call_id in calls:
                    yield ToolLine.of(calls.pop(event.tool_call_id))
                elif isinstance(event, RequireUserConfirmEvent):
                    pending = event
                elif isinstance(event, ModelCallEndEvent) and limit and event.output_tokens >= limit:
                    self.reply_cut = True
            if pending is not None:
                answers = [ConfirmResult(confirmed=bool(confirm and await asyncio.to_thread(confirm, call)),
                                         tool_call=call) for call in pending.tool_calls]
                inputs = UserConfirmResultEvent(reply_id=pending.reply_id, confirm_results=answers)
        self.reply_unread = getattr(self.model, "unread_calls", 0) > unread
        if self.reply_unread:
            self._forget_unread_reply()

    def _forget_unread_reply(self) -> None:
        """Leave a reply whose tool-call markup could not be read out of the conversation the model sees next (the
        user has seen it). Kept, the model copies the broken markup: in a 29-question SmolLM2 chat, one such reply
        was followed by broken calls on every later arithmetic question. An unread call ends the turn as text, so
        it is the text at the end of the turn's message; calls that worked before it in the turn stay."""
        context = self.state.context
        if not context or context[-1].role != "assistant":
            return
        blocks = context[-1].get_content_blocks()
        keep = len(blocks)
        while keep and blocks[keep - 1].type == "text":
            keep -= 1
        if keep == 0:
            context.pop()
        else:
            context[-1].content = blocks[:keep]


class ToolLine(str):
    """One finished tool call as the terminal shows it: `-> calculator(expression="97 * 91") = 8827`."""

    @classmethod
    def of(cls, call: dict[str, str]) -> ToolLine:
        try:
            arguments = json.loads(call["input"] or "{}")
            shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
        except (json.JSONDecodeError, AttributeError):
            shown = call["input"]
        result = " ".join(call["output"].split())
        return cls(f"-> {call['name']}({shown}) = {result[:200]}")
