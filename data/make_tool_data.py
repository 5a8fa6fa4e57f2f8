"""Write the calculator demo data: arithmetic questions answered through a `calculator` tool call, in varied
phrasings, plus held-out questions phrased unlike any training row. Deterministic (seeded); rerun after editing.

    python data/make_tool_data.py

Writes data/ember_tools_train.jsonl (tool rows), data/ember_agent_train.jsonl (the start-up demo: the identity rows
of ember_train.jsonl plus the tool rows), data/ember_agent_eval.jsonl and data/ember_tool_probes.json.
The tool schema is the one the chat's Toolkit sends for `chat_tools.calculator`, so training sees exactly the
tools the chat offers.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chat_tools import calculator, make_toolkit  # noqa: E402

TRAIN_QUESTIONS = [  # plain, terse, polite, equation-style and word-problem phrasings of the four operations
    ("What is {a} times {b}?", "*"), ("What's {a} multiplied by {b}?", "*"), ("Compute {a} * {b}.", "*"),
    ("How much is {a} x {b}?", "*"), ("calculate {a}*{b}", "*"), ("What is the product of {a} and {b}?", "*"),
    ("Can you multiply {a} and {b}?", "*"), ("{a} times {b} = ?", "*"),
    ("I'd like to know what {a} times {b} comes to.", "*"),
    ("If one box holds {b} items, how many items are in {a} boxes?", "*"),
    ("What is {a} plus {b}?", "+"), ("Add {a} and {b}.", "+"), ("How much is {a} + {b}?", "+"),
    ("What's the sum of {a} and {b}?", "+"), ("Can you add {a} to {b}?", "+"), ("{a} + {b} = ?", "+"),
    ("What do {a} and {b} add up to?", "+"), ("I have {a} stamps and get {b} more. How many do I have now?", "+"),
    ("hey whats {a} plus {b}", "+"),
    ("What is {a} minus {b}?", "-"), ("Subtract {b} from {a}.", "-"), ("How much is {a} - {b}?", "-"),
    ("Can you subtract {b} from {a}?", "-"), ("{a} - {b} = ?", "-"),
    ("I had {a} dollars and spent {b}. How much is left?", "-"), ("What's {a} less {b}?", "-"),
    ("How much bigger is {a} than {b}?", "-"), ("Count down {b} from {a}: where do I land?", "-"),
    ("What is {a} divided by {b}?", "/"), ("Divide {a} by {b}, please.", "/"), ("What's {a} / {b}?", "/"),
    ("Can you divide {a} by {b}?", "/"), ("{a} / {b} = ?", "/"),
    ("{a} cookies are shared equally among {b} kids. How many does each get?", "/"),
    ("How many times does {b} go into {a}?", "/"), ("How many groups of {b} are in {a}?", "/"),
]
TRAIN_REPEATS = 3  # each phrasing with 3 different pairs of numbers
HELD_OUT_QUESTIONS = [  # phrasings no training row uses
    ("Quick one: {a} multiplied with {b} equals what?", "*"), ("Could you tell me {a} times {b}?", "*"),
    ("I need {a} added to {b}.", "+"), ("Take {b} away from {a}. What's left?", "-"),
    ("If I split {a} into {b} equal parts, how big is each?", "/"), ("Work out {a} by {b} multiplied.", "*"),
    ("Tell me the total of {a} and {b}.", "+"), ("What do you get for {a} times {b}?", "*"),
    ("Find the difference between {a} and {b}.", "-"), ("Please compute {a} over {b}.", "/"),
    ("Multiply {a} by {b} for me.", "*"), ("Sum up {a} and {b}.", "+"),
]
ANSWERS = ["{q} is {r}.", "The answer is {r}.", "That's {r}.", "{q} = {r}."]
WORDS = {"*": "times", "+": "plus", "-": "minus", "/": "divided by"}
PLAIN_HELD_OUT = [  # no tool should be called for these
    {"prompt": "What is the capital of Italy?", "expect_any": ["rome"]},
    {"prompt": "Who wrote Romeo and Juliet?", "expect_any": ["shakespeare"]},
    {"prompt": "Give me a synonym for happy.", "expect_any": ["joy", "glad", "cheer", "content", "merry"]},
    {"prompt": "What colour is grass?", "expect_any": ["green"]},
    {"prompt": "Tell me who you are.", "expect_any": ["ember"]},
]


def numbers(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "/":
        b = rng.randint(2, 19)
        return b * rng.randint(2, 60), b
    if op == "*":
        return rng.randint(11, 99), rng.randint(11, 99)
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    return a, b


def tool_row(question: str, a: int, b: int, op: str, rng: random.Random, schema: dict) -> dict:
    expression = f"{a} {op} {b}"
    result = calculator(expression)
    answer = rng.choice(ANSWERS).format(q=f"{a} {WORDS[op]} {b}", r=result)
    answer = answer[0].upper() + answer[1:]
    return {"messages": [
        {"role": "user", "content": question.format(a=a, b=b)},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]},
        {"role": "tool", "name": "calculator", "content": result},
        {"role": "assistant", "content": answer},
    ], "tools": [schema]}


def main() -> None:
    rng, held_rng = random.Random(7), random.Random(70)  # held-out numbers do not move when training rows change
    schema = asyncio.run(make_toolkit([calculator]).get_tool_schemas())[0]
    train = [tool_row(q, *numbers(rng, op), op, rng, schema) for _ in range(TRAIN_REPEATS) for q, op in TRAIN_QUESTIONS]
    held = [(q, *numbers(held_rng, op), op) for q, op in HELD_OUT_QUESTIONS]
    eval_rows = [tool_row(q, a, b, op, held_rng, schema) for q, a, b, op in held[:6]]
    assert not {q for q, _ in HELD_OUT_QUESTIONS} & {q for q, _ in TRAIN_QUESTIONS}, "a held-out phrasing is trained"
    probes: dict[str, list[Any]] = {"arithmetic": [{"prompt": q.format(a=a, b=b), "expression": f"{a} {op} {b}",
                              "result": calculator(f"{a} {op} {b}")} for q, a, b, op in held],
              "plain": PLAIN_HELD_OUT}
    # The chat offers the calculator on every turn, so the plain rows are trained with it offered too (and no call).
    identity = [{**json.loads(line), "tools": [schema]} for line in (HERE / "ember_train.jsonl").read_text()
                .splitlines() if line.strip()]
    identity_eval = [{**json.loads(line), "tools": [schema]} for line in (HERE / "ember_eval.jsonl").read_text()
                     .splitlines() if line.strip()]

    def write(name: str, rows: list[dict]) -> None:
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    write("ember_tools_train.jsonl", train)
    write("ember_agent_train.jsonl", identity + train)
    write("ember_agent_eval.jsonl", identity_eval + eval_rows)
    (HERE / "ember_tool_probes.json").write_text(json.dumps(probes, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(train)} tool rows, {len(identity)} identity rows, {len(identity_eval) + len(eval_rows)} eval rows, "
          f"{len(probes['arithmetic'])} held-out arithmetic probes")


if __name__ == "__main__":
    main()
