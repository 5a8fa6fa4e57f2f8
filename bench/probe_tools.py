"""Does the agent demo fine-tune work? Held-out probes through a real AgentScope agent with the calculator.

    python bench/probe_tools.py runs/<run>/adapter [probes.json] [--fresh]   # greedy, the chat's prompt and toolkit

Asks the held-out arithmetic, plain and identity questions of data/ember_tool_probes.json (or the given file;
phrased unlike any training row; a file without identity questions gets those of data/ember_probes.json), and counts: a valid
calculator call, the exact expression, a call that computes the right number, that number in the final answer after
such a call ("right through the tool"), plain questions answered without a call (nor call-shaped text) and identity
answers naming Ember. Then asks the arithmetic and plain questions again in ONE conversation, each after the
earlier ones, as a chat goes (`conversation_*` counts; `--fresh` skips this pass, which takes most of the time).
Prints one JSON line with the counts last.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_NEW = 64
CALL_TEXT = re.compile(r'<tool_call>|"arguments"\s*:')  # a call attempt that was not parsed is still an attempt


def says(text: str, number: str) -> bool:
    """`number` appears in `text` as a whole number: not part of a longer one, not negated ("-16" is not "16");
    thousands separators are allowed ("1,246")."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return re.search(rf"(?<![\d.\-]){re.escape(number)}(?![\d]|\.\d)", text) is not None


async def ask(agent: Any, question: str, fresh: bool = True) -> tuple[list[str], str]:
    from agentscope.message import UserMsg

    from finetune_dialogagent import ToolLine

    if fresh:
        agent.state.context.clear()
    pieces = [p async for p in agent.stream_reply(UserMsg(name="User", content=question))]
    return [p for p in pieces if isinstance(p, ToolLine)], "".join(p for p in pieces if not isinstance(p, ToolLine))


async def ask_all(model: Any, questions: list[str]) -> list[tuple[list[str], str]]:
    """Each question to a fresh agent of its own, all at once: their model calls meet on the compute thread and run
    as batches (hfmodel/compute.py); each answer is the one a lone agent gives."""
    import load_finetune_huggingface_model as script
    from chat.tools import calculator
    from finetune_dialogagent import Finetune_DialogAgent

    agents = [Finetune_DialogAgent(name="Ember", sys_prompt=script.sys_prompt, model=model, toolkit=[calculator])
              for _ in questions]
    return list(await asyncio.gather(*(ask(a, q) for a, q in zip(agents, questions, strict=True))))


def judge(item: dict[str, str], lines: list[str], text: str) -> dict[str, bool]:
    """One arithmetic probe's answer: a calculator call, the exact expression, a call that computes the right number,
    and that number in the final answer after such a call ("right through the tool")."""
    right_call = any(line.endswith(f" = {item['result']}") for line in lines)
    return {"valid_call": any(line.startswith("-> calculator(") for line in lines),
            "exact_expression": any(f'"{item["expression"]}"' in line for line in lines),
            "right_call": right_call, "right_answer": right_call and says(text, item["result"])}


def no_call(lines: list[str], text: str) -> bool:
    """Answered without a tool call, and without call-shaped text (a call attempt that was not parsed)."""
    return not lines and not CALL_TEXT.search(text)


def score(local_model_path: str, probes_path: Path, conversation: bool = True) -> dict[str, int]:
    import load_finetune_huggingface_model as script
    from chat.tools import calculator
    from finetune_dialogagent import Finetune_DialogAgent
    from huggingface_model import HuggingFaceWrapper

    model = HuggingFaceWrapper(config_name="probe", local_model_path=local_model_path, max_length=MAX_NEW,
                               do_sample=False, system_prompt=script.sys_prompt)
    agent = Finetune_DialogAgent(name="Ember", sys_prompt=script.sys_prompt, model=model, toolkit=[calculator])
    tool_probes = json.loads(probes_path.read_text())
    identity_probes = tool_probes.get("identity") or json.loads((ROOT / "data" / "ember_probes.json").read_text())[
        "identity"]
    counts = {"valid_call": 0, "exact_expression": 0, "right_call": 0, "right_answer": 0, "arithmetic": 0,
              "plain_no_call": 0, "plain_right": 0, "plain": 0, "identity": 0, "identity_total": len(identity_probes)}
    questions = [item["prompt"] for item in tool_probes["arithmetic"] + tool_probes["plain"]] + identity_probes
    answers = iter(asyncio.run(ask_all(model, questions)))
    for item in tool_probes["arithmetic"]:
        lines, text = next(answers)
        counts["arithmetic"] += 1
        for key, ok in judge(item, lines, text).items():
            counts[key] += ok
        print(f"  arithmetic | {item['prompt']} | {' '.join(lines)} | {text}")
    for item in tool_probes["plain"]:
        lines, text = next(answers)
        counts["plain"] += 1
        counts["plain_no_call"] += no_call(lines, text)
        counts["plain_right"] += any(w in text.lower() for w in item["expect_any"])
        print(f"  plain      | {item['prompt']} | {' '.join(lines)} | {text}")
    for question in identity_probes:
        lines, text = next(answers)
        counts["identity"] += "ember" in text.lower()
        print(f"  identity   | {question} | {' '.join(lines)} | {text}")
    if not conversation:
        return counts
    # The same questions in ONE conversation, as a chat goes: each after all the earlier ones (a plain question
    # after every fourth arithmetic one).
    agent.state.context.clear()
    plain = iter(tool_probes["plain"])
    counts.update(conversation_right_answer=0, conversation_plain_no_call=0, conversation_plain=0)
    for i, item in enumerate(tool_probes["arithmetic"], 1):
        lines, text = asyncio.run(ask(agent, item["prompt"], fresh=False))
        counts["conversation_right_answer"] += judge(item, lines, text)["right_answer"]
        print(f"  in chat    | {item['prompt']} | {' '.join(lines)} | {text}")
        if i % 4 == 0 and (extra := next(plain, None)) is not None:
            lines, text = asyncio.run(ask(agent, extra["prompt"], fresh=False))
            counts["conversation_plain"] += 1
            counts["conversation_plain_no_call"] += no_call(lines, text)
            print(f"  in chat    | {extra['prompt']} | {' '.join(lines)} | {text}")
    return counts


def main() -> int:
    fresh = "--fresh" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--fresh"]
    if len(args) not in (1, 2):
        print(__doc__)
        return 2
    counts = score(args[0], Path(args[1]) if len(args) == 2 else ROOT / "data" / "ember_tool_probes.json",
                   conversation=not fresh)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
