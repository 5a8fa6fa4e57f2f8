"""Several agents on one shared base model (team.py, team_chat.py), on the tiny model.

The agents share the loaded weights (same tensors, no copy); each has its own adapters; training one agent leaves
every other agent's replies and logits bit-identical; the chat routes `@Name` / `@all` and runs commands per agent.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import (
    FAST_ARGS,
    SYSTEM_PROMPT,
    TAUGHT_QUESTION,
    chat,
    identity_rows,
    make_wrapper,
    scripted_generate,
    write_jsonl,
)
from rich.console import Console

from chat.team import AgentAdapterSet, SharedBaseModel, TeamError, build_team, serve
from chat.team_chat import TeamChatSession
from finetune_dialogagent import UserAgent

CRITIC_PROMPT = "You are Critic. Review the last answer in one short sentence."
CRITIC_ANSWER = "Too vague; name the source."
ENTRIES = [{"name": "Ember", "sys_prompt": SYSTEM_PROMPT}, {"name": "Critic", "sys_prompt": CRITIC_PROMPT},
           {"name": "Plain", "sys_prompt": "You are Plain."}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def config(tmp_path: Path) -> dict:
    return {"training_args": {"output_dir": str(tmp_path / "runs"), **FAST_ARGS}}


def agent_logits(model, question: str = TAUGHT_QUESTION) -> torch.Tensor:
    """The logits `model`'s agent would generate from (its own adapter switched in, under the lock)."""
    enc = model.tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, return_dict=True,
                                              return_tensors="pt")
    with model.handle.lock, torch.inference_mode():
        serve(model.adapter_set)
        return model.hf_model(input_ids=enc["input_ids"]).logits.clone()


def snapshot(model) -> dict:
    return {"greedy": model.generate(chat(), do_sample=False),
            "sampled": model.generate(chat("What is two plus two?"), do_sample=True, temperature=1.0, top_p=1.0),
            "logits": agent_logits(model)}


def assert_identical(a: dict, b: dict) -> None:
    assert a["greedy"] == b["greedy"]
    assert a["sampled"] == b["sampled"]
    assert torch.equal(a["logits"], b["logits"])


def test_agents_share_one_base_model(tiny_model_dir):
    wrapper = make_wrapper(tiny_model_dir)
    team = build_team(wrapper, ENTRIES)
    models = [a.model for a in team.agents.values()]
    assert models[0] is wrapper and all(isinstance(m, SharedBaseModel) for m in models[1:])
    assert all(m.handle is wrapper.handle and m.hf_model is wrapper.hf_model for m in models)
    pointers = {p.data_ptr() for p in wrapper.hf_model.parameters()}
    assert all({p.data_ptr() for p in m.hf_model.parameters()} == pointers for m in models)
    assert all(isinstance(m.adapter_set, AgentAdapterSet) for m in models[1:])
    assert len({id(m.adapter_set) for m in models}) == 3 and len({id(m.engine) for m in models}) == 3


def test_training_one_agent_leaves_the_others_bit_identical(tiny_model_dir, tmp_path):
    wrapper = make_wrapper(tiny_model_dir)
    team = build_team(wrapper, ENTRIES)
    ember, critic, plain = (team.agent(n).model for n in ("Ember", "Critic", "Plain"))
    ember.fine_tune(str(write_jsonl(tmp_path / "ember.jsonl", identity_rows())), config(tmp_path))
    assert ember.active_adapter == "ft1" and critic.active_adapter is None
    before = {"ember": snapshot(ember), "plain": snapshot(plain), "critic": snapshot(critic)}
    base_weights = {n: p.clone() for n, p in wrapper.hf_model.named_parameters() if "lora_" not in n}
    ember_lora = {n: p.clone() for n, p in wrapper.hf_model.named_parameters() if ".ft1." in n}

    rows = identity_rows(answer=CRITIC_ANSWER)
    result = critic.fine_tune(str(write_jsonl(tmp_path / "critic.jsonl", rows)), config(tmp_path))

    assert result.adapter_name == critic.active_adapter == "Critic-ft1"
    assert list(critic.adapters) == ["Critic-ft1"] and list(ember.adapters) == ["ft1"]
    assert ember.active_adapter == "ft1" and plain.active_adapter is None
    assert_identical(before["ember"], snapshot(ember))  # replies (greedy and seeded sampling) and logits
    assert_identical(before["plain"], snapshot(plain))  # the base model, served between two adapters
    assert not torch.equal(before["critic"]["logits"], snapshot(critic)["logits"])
    params = dict(wrapper.hf_model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base_weights.items())
    assert all(torch.equal(params[n], p) for n, p in ember_lora.items())


def test_agent_adapter_commands_are_scoped(tiny_model_dir, tmp_path, taught_adapter):
    wrapper = make_wrapper(tiny_model_dir)
    team = build_team(wrapper, [ENTRIES[0], {**ENTRIES[1], "adapter": str(taught_adapter)}])
    critic = team.agent("Critic").model
    assert critic.active_adapter == "Critic-ft1" and wrapper.active_adapter is None
    critic.use_adapter("base")
    assert critic.active_adapter is None
    assert critic.undo() == "Critic-ft1"
    with pytest.raises(Exception, match="No adapter named 'Critic-ft1'"):
        wrapper.use_adapter("Critic-ft1")  # another agent's adapter is not this agent's to use
    with pytest.raises(TeamError, match="share one base model"):
        critic.load_model("other/model")


@pytest.mark.parametrize("entries, message", [
    ([], "empty"),
    ([{"name": "Ember", "sys_prompt": "a"}, {"name": "ember", "sys_prompt": "b"}], "used twice"),
    ([{"name": "all", "sys_prompt": "a"}], "not 'all'"),
    ([{"name": "Ember", "sys_prompt": "a", "adapters": "x"}], "unknown key"),
    ([{"name": "Ember", "sys_prompt": "a", "adapter": "/nowhere"}], "not an adapter folder"),
])
def test_bad_agents_entries_are_refused_with_the_fix(tiny_model_dir, entries, message):
    with pytest.raises(TeamError, match=message):
        build_team(make_wrapper(tiny_model_dir), entries)


# ------------------------------------------------------------------------------------------ the chat


def run_chat(session: TeamChatSession, lines: list[str]) -> tuple[str, str]:
    """Type `lines` into the loop; (console text, streamed replies)."""
    queue = list(lines)

    def scripted(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    session.user.input_fn = scripted
    assert session.run() == 0
    return session.console.file.getvalue(), session.out.getvalue()


def test_chat_routes_messages_and_commands_per_agent(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    team = build_team(wrapper, ENTRIES[:2])
    ember, critic = team.agent("Ember"), team.agent("Critic")
    session = TeamChatSession(team, UserAgent(), base_config={"data_path": None, "fine_tune_config": config(tmp_path)},
                              console=Console(file=io.StringIO(), width=200), out=io.StringIO())
    ember_before = snapshot(ember.model)
    console, out = run_chat(session, [
        "Who are you?", "@Critic review that", "@all Hello", "/agents", '/agent add Bob "You are Bob."',
        "/agent use Critic", f'/teach "{CRITIC_ANSWER}"', "/train", "@Ember /adapters", "/agents", "@all /system", "@Nobody hi",
    ])
    assert "error: No agent named 'Nobody'" in console
    speakers = [line.split(":")[0] for line in out.splitlines() if line.startswith(("Ember:", "Critic:"))]
    assert speakers == ["Ember", "Critic", "Ember", "Critic"]
    # Critic saw Ember's answer before its own turn, as a named line; Ember then saw Critic's review.
    first_review = critic.state.context[0].get_text_content()
    assert first_review.startswith("User: Who are you?\nEmber: ") and first_review.endswith("User: review that")
    caught_up = ember.state.context[2].get_text_content()
    assert caught_up.startswith("User: review that\nCritic: ") and caught_up.endswith("\nUser: Hello")
    assert critic.state.context[2].get_text_content().startswith("User: Hello\nEmber: ")
    # /teach and /train went to Critic only: a new Critic adapter; Ember is unchanged.
    assert critic.model.active_adapter == "Critic-ft1" and ember.model.active_adapter is None
    assert_identical(ember_before, snapshot(ember.model))
    assert session.assistant is critic and len(session.taught) == 1 and session.state_of("Ember")["taught"] == []
    assert "Bob" in team.agents and team.current == "Critic"
    assert console.count("Critic-ft1") >= 2  # the report and the second /agents
    # @all /system ran once per agent, in order, each under its name; the current agent stayed Critic.
    every = console[console.rindex("Ember:"):]
    shown = [every.index(f"{name}:\nSystem prompt: {prompt}") for name, prompt in
             (("Ember", SYSTEM_PROMPT), ("Critic", CRITIC_PROMPT), ("Bob", "You are Bob."))]
    assert shown == sorted(shown)


def test_all_reset_starts_every_agent_afresh(tiny_model_dir, tmp_path, monkeypatch):
    """`@all /reset` clears each conversation, and no agent is then shown what was said before the reset: the same
    first question gets the same reply as at the start."""
    monkeypatch.chdir(tmp_path)
    team = build_team(make_wrapper(tiny_model_dir, do_sample=False), ENTRIES[:2])
    session = TeamChatSession(team, UserAgent(), base_config={"data_path": None, "fine_tune_config": config(tmp_path)},
                              console=Console(file=io.StringIO(), width=200), out=io.StringIO())
    console, out = run_chat(session, ["Who are you?", "@Critic review that", "@all /reset", "Who are you?"])
    assert console.count("Conversation cleared.") == 2
    first, second = (line for line in out.splitlines() if line.startswith("Ember:"))
    assert first == second
    ember, critic = team.agent("Ember"), team.agent("Critic")
    assert [m.get_text_content() for m in ember.state.context][0] == "Who are you?"
    assert len(ember.state.context) == 2 and critic.state.context == []


def test_the_session_log_gives_each_agent_its_own_earlier_exchanges_as_context(tiny_model_dir, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, do_sample=False)
    scripted_generate(wrapper, ["I am Ember.", "Looks fine.", "Still Ember."], [])
    team = build_team(wrapper, ENTRIES[:2])
    session = TeamChatSession(team, UserAgent(), base_config={"data_path": None, "fine_tune_config": config(tmp_path)},
                              console=Console(file=io.StringIO(), width=200), out=io.StringIO(), session_log=True)
    run_chat(session, ["Who are you?", "@Critic review that", "And now?"])
    rows = [json.loads(line) for line in session.session_log.path.read_text().splitlines()]
    systems = [r["messages"][0]["content"] for r in rows]
    assert systems == [SYSTEM_PROMPT, CRITIC_PROMPT, SYSTEM_PROMPT]
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant"]  # Critic: no Ember context
    third = rows[2]["messages"]  # Ember's second exchange after its first, which is not trained again
    assert third[1]["content"] == "Who are you?" and third[2]["weight"] == 0 and "weight" not in third[-1]


def test_the_script_agents_knob_starts_a_team_chat(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import load_finetune_huggingface_model as script

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(script, "agents", [{"name": "Ember", "sys_prompt": SYSTEM_PROMPT},
                                           {"name": "Critic", "sys_prompt": CRITIC_PROMPT}])
    lines = ["Who are you?", "@Critic review that", "/agents", "EXIT"]
    monkeypatch.setattr("builtins.input", lambda prompt="": lines.pop(0))
    rc = script.main(["--no-finetune", "--no-session-log", "--no-tools", "--local-model-path", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and not lines
    assert "Agents: Ember, Critic" in out and "\nEmber: " in out and "\nCritic: " in out
    assert "Agents (one base model" in out and "Bye." in out


def test_the_script_refuses_a_bad_agents_entry(tiny_model_dir, monkeypatch, capsys):
    import load_finetune_huggingface_model as script

    monkeypatch.setattr(script, "agents", [{"name": "Ember", "sys_prompt": SYSTEM_PROMPT}, {"name": "Critic"}])
    rc = script.main(["--no-finetune", "--no-session-log", "--local-model-path", str(tiny_model_dir)])
    assert rc == 2
    assert 'error: Invalid `agents`: agents[1] (Critic) needs a "sys_prompt" string.' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ AgentScope TeamPipeline


def test_a_team_pipeline_leader_assigns_work_to_members_on_the_shared_base(tmp_path):
    """The leader's TeamAssign call is scripted (the real tool parser reads it); the members' replies are real
    generations, each with its own adapter: the tuned Critic gives its taught answer, the untuned Plain does not."""
    import asyncio

    from agentscope.message import UserMsg
    from peft.tuners.tuners_utils import BaseTunerLayer
    from test_tools import scripted_generate
    from tiny_model import build_tiny_model

    from chat.team import team_pipeline

    model_dir = build_tiny_model(tmp_path / "tiny-tools", context=4096)  # a window that holds the tool schemas
    wrapper = make_wrapper(model_dir, max_length=40, do_sample=False)
    team = build_team(wrapper, ENTRIES, toolkit=[])
    critic = team.agent("Critic").model
    critic.fine_tune(str(write_jsonl(tmp_path / "critic.jsonl", identity_rows(8, answer=CRITIC_ANSWER))),
                     config(tmp_path))
    real_generate, prompts, served = wrapper.hf_model.generate, [], []
    assign = ('<tool_call>\n{"name": "TeamAssign", "arguments": {"member": "%s", "prompt": "%s"}}\n</tool_call>')
    leader_replies = [assign % ("Critic", TAUGHT_QUESTION) + "\n" + assign % ("Plain", TAUGHT_QUESTION),
                      "Critic and Plain answered."]
    scripted_generate(wrapper, leader_replies, prompts)
    scripted = wrapper.hf_model.generate

    def generate(input_ids=None, **kwargs):  # the leader's turns are scripted; the members generate for real
        lora = next(m for m in wrapper.hf_model.modules() if isinstance(m, BaseTunerLayer))
        served.append(kwargs.get("adapter_names") or (None if lora.disable_adapters else wrapper.hf_model.active_adapter))
        if "TeamAssign" in wrapper.tokenizer.decode(input_ids[0]):
            return scripted(input_ids=input_ids, **kwargs)
        return real_generate(input_ids=input_ids, **kwargs)

    wrapper.hf_model.generate = generate
    pipeline = team_pipeline(team, "Ember", {"Critic": "reviews answers", "Plain": "answers plainly"})

    async def run() -> list:
        return [e async for e in pipeline.reply_stream(UserMsg(name="User", content="Ask the team who they are."))]

    asyncio.run(run())
    assert len(prompts) == 2  # the leader: its call, then its answer with both results
    result = prompts[1].split("<tool_response>")
    assert len(result) == 3
    taught = CRITIC_ANSWER[:9]  # "Too vague": the taught answer (its tail may be cut at max_length)
    assert taught in result[1] and taught not in result[2]
    # The leader twice on the base; the two members in one generate(), each row with its own adapter.
    rows = [tuple(sorted(x)) if isinstance(x, list) else x for x in served]
    assert sorted(rows, key=str) == sorted([None, None, ("Critic-ft1", "__base__")], key=str)


def test_the_fast_adapter_switch_serves_exactly_what_peft_set_adapter_serves(tiny_model_dir):
    """speedups.switch_adapter (one flag per LoRA layer) against peft's own calls, on every switch order; a new
    adapter re-finds the layers; a merged model falls back to peft."""
    from peft import LoraConfig, get_peft_model

    from hfmodel.adapters import serve_with_peft
    from hfmodel.speedups import switch_adapter

    wrapper = make_wrapper(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(wrapper.hf_model, config, adapter_name="one")
    model.add_adapter("two", config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 9, 13, 17]])

    def logits(switch, name):
        switch(model, name)
        with torch.inference_mode():
            return model(input_ids=ids).logits.clone()

    expected = {name: logits(serve_with_peft, name) for name in ("one", "two", None)}
    assert not torch.equal(expected["one"], expected["two"]) and not torch.equal(expected["one"], expected[None])
    for order in (("one", "two", None, "one"), (None, "two", "one", None, "two")):
        for name in order:
            assert torch.equal(logits(switch_adapter, name), expected[name]), (order, name)
            assert model.active_adapter == (name or model.active_adapter)
    model.add_adapter("three", config)  # new adapter: peft_config changed, so the layers are found again
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.three" in name:
                param.normal_(0, 0.5)
    assert torch.equal(logits(switch_adapter, "three"), logits(serve_with_peft, "three"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".one." in n and "lora_" in n)
