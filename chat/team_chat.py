"""The chat loop with several agents on one base model: `@Name message`, `@all message`, `/agents`, `/agent ...`.

Every `/command` of the one-agent chat acts on the current agent (`/agent use NAME` changes it), on the
addressed one (`@Critic /train`), or on each agent in turn (`@all /reset`). Each agent keeps its own conversation,
taught examples and adapters; before it answers it is shown what was said since its last turn (the user's
messages and the other agents' replies, each line named), so `@Critic review that` reviews what Ember just said.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.table import Table

from chat.commands import ChatSession, CommandError, cell, plain
from chat.team import Team, TeamError, add_agent
from finetune_dialogagent import Finetune_DialogAgent, UserAgent

TEAM_HELP = [
    ("@Name message", "send the message to one agent (the others see it, and its reply, when they next answer)"),
    ("@all message", "every agent answers in turn, each seeing the replies before its own"),
    ("@Name /command", "run a command for that agent, e.g. @Critic /adapters"),
    ("@all /command", "run the command for every agent in turn, e.g. @all /reset"),
    ("/agents", "list the agents: name, active adapter, turns, system prompt"),
    ('/agent add NAME "prompt"', "a new agent on the same base model (no adapter yet)"),
    ("/agent use NAME", "make NAME the current agent: plain messages and commands go to it"),
]

# What each agent keeps apart in the session (the rest of ChatSession is shared by all agents).
PER_AGENT = ("taught", "taught_path", "marks", "base_config")
TEAM_COMMANDS = ("/agents", "/agent")  # about the team, not one agent: `@all /agent add ...` runs them once


def _per_agent(key: str) -> property:
    """A ChatSession attribute that belongs to the agent being acted on (each agent keeps its own)."""

    def get(self: TeamChatSession) -> Any:
        return self.state_of(self.assistant.name)[key]

    def put(self: TeamChatSession, value: Any) -> None:
        self.state_of(self.assistant.name)[key] = value

    return property(get, put)


class TeamChatSession(ChatSession):
    """`ChatSession` whose assistant is the current agent of a `Team`.

    `team.current` is the one notion of the current agent: plain messages and commands go to it, `/agents` stars it,
    `/agent use NAME` sets it. `@Name /command` acts on Name for that one command (`acting`), and leaves the current
    agent alone, unless the command is `/agent use`, which sets it.
    """

    taught = _per_agent("taught")
    taught_path = _per_agent("taught_path")
    marks = _per_agent("marks")
    base_config = _per_agent("base_config")

    def __init__(self, team: Team, user: UserAgent, base_config: dict[str, Any] | None = None,
                 toolkit: Any = None, **kwargs: Any) -> None:
        self.team = team
        self.acting: str | None = None  # the agent a `@Name /command` or an `@Name message` is for, while it runs
        self.primary_config: dict[str, Any] = base_config or {}
        self.states: dict[str, dict[str, Any]] = {}  # agent -> its PER_AGENT values
        super().__init__(team.agents[team.current], user, base_config, **kwargs)
        self.toolkit = toolkit  # for /agent add
        self.transcript: list[tuple[str, str]] = []  # (speaker, text): the whole conversation, in order
        self.seen: dict[str, int] = {}  # agent -> how many transcript entries it has been shown
        self.commands.update({"/agents": self.cmd_agents, "/agent": self.cmd_agent})

    @property  # type: ignore[override]
    def assistant(self) -> Finetune_DialogAgent:
        """The agent messages and commands act on: the addressed one while `@Name ...` runs, else the current."""
        return self.team.agents[self.acting or self.team.current]

    @assistant.setter
    def assistant(self, agent: Finetune_DialogAgent) -> None:
        self.team.current = agent.name

    def agent_names(self) -> list[str]:
        """The current agent first (plain messages go to it), then the others."""
        return [self.team.current, *(n for n in self.team.agents if n != self.team.current)]

    # ------------------------------------------------------------------------------------------- agents

    def state_of(self, name: str) -> dict[str, Any]:
        """`name`'s own taught examples, marks and config (made on first use)."""
        if name not in self.states:
            self.states[name] = self._fresh_slot(name)
        return self.states[name]

    @contextmanager
    def acting_as(self, name: str) -> Iterator[None]:
        """Act on `name` for the commands or the reply run inside; the current agent stays as it is."""
        saved, self.acting = self.acting, self.team.agent(name).name
        try:
            yield
        finally:
            self.acting = saved

    def _fresh_slot(self, name: str) -> dict[str, Any]:
        """A new agent's session state: the configured fine-tune settings, but not the first agent's data."""
        config = dict(self.primary_config)
        if name != next(iter(self.team.agents)):
            entry = self.team.configs.get(name, {})
            ftc = {k: v for k, v in (config.get("fine_tune_config") or {}).items()
                   if k not in ("eval_data_path", "probes")}  # they belong to the first agent's data
            config.update(data_path=entry.get("data_path"), fine_tune_config=ftc)
        return {"taught": [], "taught_path": None, "marks": [], "base_config": config}

    def handle(self, text: str) -> None:
        """`@Name /command` runs the command for that agent (`@all`: for each in turn; a team command once);
        everything else as in the one-agent chat."""
        head, _, rest = text.partition(" ")
        rest = rest.strip()
        if head.startswith("@") and rest.startswith("/"):
            command = rest.split(None, 1)[0].lower()
            if head[1:].lower() == "all":
                names = [self.team.current] if command in TEAM_COMMANDS else list(self.team.agents)
            else:
                agent = self.team.find(head[1:])
                if agent is None:
                    self.error(f"No agent named {head[1:]!r}; agents: {', '.join(self.team.agents)}.")
                    return
                names = [agent.name]
            for name in names:
                if len(names) > 1:
                    self.print(f"[bold]{plain(name)}[/]:")
                with self.acting_as(name):
                    super().handle(rest)
            return
        super().handle(text)

    def say(self, text: str) -> str:
        """Route the message (`@Name`, `@all`, or the current agent); each agent answers with its own adapter."""
        agents, message = self.team.route(text)
        if not message:
            raise TeamError("Nothing to send: @Name <message> or @all <message>.")
        self.transcript.append((self.user.name, message))
        replies = []
        for agent in agents:
            with self.acting_as(agent.name):
                reply = super().say(self._news_for(agent.name))
            self.transcript.append((agent.name, reply))
            self.seen[agent.name] = len(self.transcript)
            replies.append(reply)
        return "\n".join(replies)

    def _news_for(self, name: str) -> str:
        """What `name` has not seen yet: the user's message alone, or every line since its last turn, named."""
        news = [(who, said) for who, said in self.transcript[self.seen.get(name, 0):] if who != name and said]
        if len(news) == 1:
            return news[0][1]
        return "\n".join(f"{who}: {said}" for who, said in news)

    # ------------------------------------------------------------------------------------------- commands

    def cmd_help(self, args: list[str]) -> None:
        super().cmd_help(args)
        table = Table(show_header=False, box=None, title="Several agents")
        for usage, what in TEAM_HELP:
            table.add_row(f"[bold]{plain(usage)}[/]", plain(what))
        self.print(table)

    def cmd_agents(self, args: list[str]) -> None:
        if args:
            raise CommandError("/agents takes no arguments; see /help.")
        table = Table(title="Agents (one base model; @Name to address, /agent use NAME to switch)")
        for column in ("", "name", "adapter", "turns", "system prompt"):
            table.add_column(column)
        for name, agent in self.team.agents.items():
            model = agent._wrapper("list adapters")
            turns = sum(1 for m in agent.state.context if m.role == "assistant")
            table.add_row("*" if agent is self.assistant else "", cell(name), cell(model.active_adapter or "base"),
                          str(turns), cell(agent.sys_prompt))
        self.print(table)

    def cmd_agent(self, args: list[str]) -> None:
        usage = 'Usage: /agent add NAME "system prompt", or /agent use NAME (/agents lists them).'
        if len(args) == 2 and args[0] == "use":
            self.team.current = self.team.agent(args[1]).name
            self.acting = None  # `@Name /agent use Other` takes full effect: Other answers from now on
            self.print(f"Now talking to [bold]{plain(self.assistant.name)}[/] "
                       f"(adapter: {plain(self.model.active_adapter or 'base')}).")
            return
        if len(args) == 3 and args[0] == "add":
            agent = add_agent(self.team, args[1], args[2], self.toolkit)
            self.print(f"Added [bold]{plain(agent.name)}[/] on the shared base model (no adapter yet); "
                       f"address it with @{plain(agent.name)}.")
            return
        raise CommandError(usage)

    def cmd_reset(self, args: list[str]) -> None:
        """Clear this agent's conversation; it starts fresh, not shown what was said before (`@all /reset`: all)."""
        super().cmd_reset(args)
        self.seen[self.assistant.name] = len(self.transcript)

    def cmd_load(self, args: list[str]) -> None:
        folder = self._folder(args, "/load <adapter folder>")
        if len(self.team.agents) > 1 and not (folder and (folder / "adapter_config.json").exists()):
            raise TeamError("All agents share one base model: with several agents /load takes an adapter folder "
                            "(it loads for the current agent).")
        super().cmd_load(args)
