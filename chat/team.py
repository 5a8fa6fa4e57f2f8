"""Several agents on ONE loaded base model: each agent its own prompt, conversation and LoRA adapter history.

    from chat.team import build_team
    team = build_team(wrapper, [{"name": "Ember", "sys_prompt": "You are Ember."},
                                {"name": "Critic", "sys_prompt": "You review answers tersely."}], toolkit=[])
    team.agent("Critic").fine_tune("critic.jsonl", {...})   # trains a new adapter for Critic only

The first agent uses the wrapper itself (the start-up fine-tune is its own). Every other agent gets a
`SharedBaseModel`: a light view of the same wrapper that shares its weights, tokenizer, lock and engine code, and
keeps its own `AgentAdapterSet` (adapter names prefixed by the agent's name, so they are unique across agents in
the one peft model). Each generation switches the peft model to the agent's adapter (or the base) under the
generation lock, so a switch and the reply it serves are one step. Training adapter `Critic-ft1` leaves every
other adapter and the base untouched (only `Critic-ft1`'s parameters require gradients).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentscope.credential import CredentialBase
from agentscope.model import ChatModelBase

from chat.startup import AGENT_KEYS, NAME_PATTERN, TeamError, check_entries  # noqa: F401 - importable from here
from finetune_dialogagent import Finetune_DialogAgent
from hfmodel.adapters import AdapterSet
from hfmodel.common import is_peft_model
from hfmodel.generation import create_engine
from hfmodel.speedups import switch_adapter
from huggingface_model import HuggingFaceWrapper


def serve(adapter_set: AdapterSet) -> None:
    """Make the shared peft model serve `adapter_set`'s active adapter (None = the base). Call under the lock."""
    module = adapter_set.handle.module
    if is_peft_model(module):
        switch_adapter(module, adapter_set.active)


def serve_own_adapter(engine: Any, adapter_set: AdapterSet) -> None:
    """Each reply of `engine` is served with `adapter_set`'s active adapter (the switch happens under the lock, with
    the reply); replies of several agents share one batch, each row on its own agent's adapter (see
    hfmodel/generation.py)."""
    engine.agent_adapter = lambda: adapter_set.active


class AgentAdapterSet(AdapterSet):
    """One agent's adapters inside the shared peft model: its own records, active adapter and undo stack, and names
    that start with the agent's name (unique across the agents in the one peft model)."""

    def __init__(self, handle: Any, agent_name: str) -> None:
        super().__init__(handle, name_prefix=f"{agent_name}-")


class SharedBaseModel(HuggingFaceWrapper):
    """An agent's model: the host wrapper's weights, tokenizer and lock (never a copy), its own adapters.

    Loads nothing: generation settings are copied from the host (so `/set` changes this agent only), and its
    engine switches to this agent's adapter under the lock before every reply.
    """

    def __init__(self, host: HuggingFaceWrapper, agent_name: str, system_prompt: str | None = None,
                 data_path: str | None = None) -> None:
        ChatModelBase.__init__(self, credential=CredentialBase(), model=host.model,
                               parameters=host.parameters.model_copy(), stream=host.stream, max_retries=0)
        self.host = host
        self.formatter = host.formatter
        self.config_name = f"{host.config_name}/{agent_name}"
        self.model_id, self.local_model_path = host.model_id, host.local_model_path
        self.data_path = data_path
        self.system_prompt = system_prompt
        self.fine_tune_config = host.fine_tune_config
        self.handle = host.handle  # the one loaded model: shared, not copied
        self.adapter_set = AgentAdapterSet(host.handle, agent_name)
        self.engine = create_engine(_engine_name(host), host.handle)
        serve_own_adapter(self.engine, self.adapter_set)
        self._reply_state(host.pure_tools)

    def load_model(self, model_id: str | None, local_model_path: str | None = None) -> None:
        raise TeamError("All agents share one base model: load another model only in a one-agent chat "
                        "(an adapter folder loads for this agent: /load <adapter folder>).")

    def load_tokenizer(self, model_id: str | None, local_tokenizer_path: str | None = None) -> None:
        raise TeamError("All agents share one tokenizer: change it only in a one-agent chat.")

    def verify_export(self, folder: str | Path) -> float:
        with self.handle.lock:  # the comparison runs the shared module: with this agent's adapter
            serve(self.adapter_set)
            return self.adapter_set.verify_export(Path(folder))


def _engine_name(host: HuggingFaceWrapper) -> str:
    from hfmodel.generation import ENGINES

    return next((name for name, cls in ENGINES.items() if type(host.engine) is cls), "transformers")


@dataclass
class Team:
    """The agents of one conversation, in order; the first is the default one."""

    agents: dict[str, Finetune_DialogAgent]
    current: str
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # each agent's `agents` entry

    def agent(self, name: str) -> Finetune_DialogAgent:
        found = self.find(name)
        if found is None:
            raise TeamError(f"No agent named {name!r}; agents: {', '.join(self.agents)} (/agents lists them).")
        return found

    def find(self, name: str) -> Finetune_DialogAgent | None:
        """The agent named `name` (any case), or None."""
        return next((a for n, a in self.agents.items() if n.lower() == name.lower()), None)

    def route(self, text: str) -> tuple[list[Finetune_DialogAgent], str]:
        """(the agents that answer, the message): `@Name msg` one agent, `@all msg` each in turn, else the current."""
        match = re.match(r"^@(\S+)\s*(.*)$", text, re.DOTALL)
        if match is None:
            return [self.agents[self.current]], text
        name, rest = match.groups()
        if name.lower() == "all":
            return list(self.agents.values()), rest.strip()
        if len(self.agents) == 1 and self.find(name) is None:  # no team yet: "@home is ..." is just a message
            return [self.agents[self.current]], text
        return [self.agent(name)], rest.strip()


def build_team(host: HuggingFaceWrapper, entries: list[dict[str, Any]], toolkit: Any = None) -> Team:
    """One agent per entry, all on `host`'s loaded model; the first agent uses `host` itself."""
    check_entries(entries)
    agents: dict[str, Finetune_DialogAgent] = {}
    for i, entry in enumerate(entries):
        name = entry["name"]
        model = host if i == 0 else SharedBaseModel(host, name, entry["sys_prompt"], entry.get("data_path"))
        agents[name] = Finetune_DialogAgent(name=name, sys_prompt=entry["sys_prompt"], model=model, toolkit=toolkit)
    if len(agents) > 1:  # the host's own replies must switch back to its adapter too
        serve_own_adapter(host.engine, host.adapter_set)
    for entry, agent in zip(entries, agents.values(), strict=True):
        if entry.get("adapter"):
            agent._wrapper("load an adapter").load_adapter(entry["adapter"], note=f"agents entry {entry['adapter']}")
    return Team(agents, current=entries[0]["name"], configs={e["name"]: dict(e) for e in entries})


def add_agent(team: Team, name: str, sys_prompt: str, toolkit: Any = None) -> Finetune_DialogAgent:
    """`/agent add NAME "prompt"`: one more agent on the same base (no adapter yet)."""
    check_entries([*({"name": n, "sys_prompt": a.sys_prompt} for n, a in team.agents.items()),
                   {"name": name, "sys_prompt": sys_prompt}])
    host = next(iter(team.agents.values()))._wrapper("share its model")
    if len(team.agents) == 1:
        serve_own_adapter(host.engine, host.adapter_set)
    agent = Finetune_DialogAgent(name=name, sys_prompt=sys_prompt, model=SharedBaseModel(host, name, sys_prompt),
                                 toolkit=toolkit)
    team.agents[name] = agent
    team.configs[name] = {"name": name, "sys_prompt": sys_prompt}
    return agent


def team_pipeline(team: Team, leader: str, members: dict[str, str]) -> Any:
    """An AgentScope `TeamPipeline` over agents of `team`: `leader` assigns work to `members` (name -> what the
    member is good at, which the leader reads) through its `TeamAssign` tool call. All of them run on the one base
    model, each reply with its own agent's adapter; members assigned in one round take turns at the generation lock.
    """
    from agentscope.pipeline import TeamMember, TeamPipeline

    head = team.agent(leader)
    if head.toolkit is None:
        raise TeamError(f"The leader {leader} needs a toolkit for its TeamAssign call: give it toolkit=[] or tools.")
    return TeamPipeline(head, [TeamMember(agent=team.agent(name), description=description)
                               for name, description in members.items()])
