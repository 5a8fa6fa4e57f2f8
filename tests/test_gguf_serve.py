"""A real `transformers serve` (through `python -m hfmodel.serving`, on 127.0.0.1) on an exported tiny GGUF, used
by AgentScope's OpenAIChatModel: plain answers streamed and not, and a tool call the agent executes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import TAUGHT_ANSWER, TAUGHT_QUESTION, fast_config, make_wrapper, write_jsonl
from test_gguf_export import TRL_TEMPLATES, tiny_family_model

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are Ember."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(server: subprocess.Popen, url: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}: {server.stdout.read() if server.stdout else ''}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"no answer from {url} within {seconds} s")


@pytest.fixture(scope="module")
def tool_gguf(tiny_model_dir, tmp_path_factory):
    """A tiny Qwen2-shaped model with trl's Qwen2.5 template (Hermes tool calls), taught to call the calculator
    for one question and to answer another, exported to GGUF: what the server runs."""
    from chat.tools import calculator, make_toolkit

    root = tmp_path_factory.mktemp("serve")
    template = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    folder = tiny_family_model(root / "model", tiny_model_dir, "qwen2", template, initializer_range=0.2)
    wrapper = make_wrapper(folder, max_length=96, do_sample=False)
    schemas = asyncio.run(make_toolkit([calculator]).get_tool_schemas())
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "97 * 91"}}}
    tool_row = {"tools": schemas, "messages": [
        {"role": "user", "content": "What is 97 times 91?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calculator", "content": "8827"}, {"role": "assistant", "content": "It is 8827."}]}
    plain_row = {"messages": [{"role": "user", "content": TAUGHT_QUESTION},  # asked without tools, as below
                              {"role": "assistant", "content": TAUGHT_ANSWER}]}
    data = write_jsonl(root / "rows.jsonl", [tool_row, plain_row] * 6)
    wrapper.fine_tune(str(data), fast_config(root, max_steps=40, learning_rate=2e-2))
    return wrapper.export_gguf(root / "gguf", "f16", system_prompt=SYSTEM).folder


@pytest.fixture(scope="module")
def server(tool_gguf):
    from hfmodel.serving import model_id_for

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hfmodel.serving", str(tool_gguf), "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(process, url)
        yield url, model_id_for(tool_gguf)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def openai_model(server, stream: bool):
    from agentscope.credential import OpenAICredential
    from agentscope.model import OpenAIChatModel

    url, name = server
    return OpenAIChatModel(OpenAICredential(api_key="not-needed", base_url=url), name, stream=stream,
                           parameters=OpenAIChatModel.Parameters(max_tokens=96, temperature=None, top_p=None))


def make_agent(model, toolkit=None):
    from agentscope.agent import Agent, ContextConfig, InjectionConfig, ReActConfig

    return Agent(name="Ember", system_prompt=SYSTEM, model=model, toolkit=toolkit,
                 react_config=ReActConfig(max_iters=3), injection_config=InjectionConfig(inject_runtime_state=False),
                 context_config=ContextConfig(compression_tool_enabled=False))


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_model_gets_the_taught_answer_from_transformers_serve(server, stream):
    from agentscope.message import UserMsg

    reply = asyncio.run(make_agent(openai_model(server, stream)).reply(UserMsg("User", TAUGHT_QUESTION)))
    assert TAUGHT_ANSWER in reply.get_text_content()


def test_the_server_returns_a_tool_call_that_the_agent_runs(server):
    from agentscope.message import ToolResultBlock, UserMsg

    from chat.tools import calculator, make_toolkit

    agent = make_agent(openai_model(server, stream=False), make_toolkit([calculator]))
    reply = asyncio.run(agent.reply(UserMsg("User", "What is 97 times 91?")))
    results = [block for msg in agent.state.context for block in (msg.content if isinstance(msg.content, list)
                                                                  else []) if isinstance(block, ToolResultBlock)]
    assert results and "8827" in json.dumps(results[0].model_dump(), default=str), agent.state.context
    assert "8827" in reply.get_text_content()


def test_the_docs_client_example_runs_against_the_server(server, capsys):
    from test_gguf_export import docs_python_blocks

    url, name = server
    code = docs_python_blocks()[1]
    assert '"http://127.0.0.1:8000/v1"' in code and '"/abs/path/ember-gguf:model-q8_0.gguf"' in code
    code = code.replace("http://127.0.0.1:8000/v1", url).replace("/abs/path/ember-gguf:model-q8_0.gguf", name)
    exec(compile(code, "deployment.md", "exec"), {})  # noqa: S102 - the project's own docs, in a test
    # The example samples (OpenAIChatModel's default parameters) and adds AgentScope's runtime reminder, so the tiny
    # model's text is not the taught one: that it ran and printed the server's reply is what is checked here.
    assert capsys.readouterr().out.strip()
