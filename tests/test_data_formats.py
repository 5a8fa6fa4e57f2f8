"""Datasets: every supported format, from every supported file type, becomes the same `messages` rows."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_wrapper

from hfmodel.data import (
    DatasetFormatError,
    detect_format,
    load_chat_dataset,
    normalize_rows,
    with_system_prompt,
)

QA = [("Who are you?", "I am Ember, a friendly assistant."), ("What is two plus two?", "Four.")]
EXPECTED = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]

RAW = {
    "messages": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA],
    "lima": [{"conversations": [q, a]} for q, a in QA],
    "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in QA],
    "prompt-completion": [{"prompt": q, "completion": a} for q, a in QA],
    "prompt-completion-chat": [{"prompt": [{"role": "user", "content": q}],
                                "completion": [{"role": "assistant", "content": a}]} for q, a in QA],
}
FORMAT_NAME = {name: name.replace("-chat", "") for name in RAW}

SYSTEM = "You are Ember."
MULTI = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"},
         {"role": "assistant", "content": "Hello! How can I help you today?"},
         {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ember."}]
RAW_MULTI = {
    "messages": [{"messages": MULTI}],
    "sharegpt": [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                     "value": m["content"]} for m in MULTI]}],
    "sharegpt-system-column": [{"system": SYSTEM, "conversations": [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in MULTI[1:]]}],
}


def write(rows: list[dict], path: Path) -> Path:
    """Write rows as .json, .jsonl, .csv (nested values as JSON text) or .parquet."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(flat).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        raise AssertionError(path)
    return path


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", list(RAW))
def test_every_format_from_every_file_type(fmt, ext, tmp_path):
    path = write(RAW[fmt], tmp_path / f"data{ext}")
    data = load_chat_dataset(str(path))
    assert data.rows == EXPECTED
    assert data.format == FORMAT_NAME[fmt]
    assert not data.skipped
    assert len(data) == 2


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", list(RAW_MULTI))
def test_multi_turn_with_system_prompt(fmt, ext, tmp_path):
    data = load_chat_dataset(str(write(RAW_MULTI[fmt], tmp_path / f"multi{ext}")))
    assert data.rows == [MULTI]


@pytest.mark.parametrize("fmt", list(RAW))
def test_normalize_rows_in_memory(fmt):
    assert normalize_rows(RAW[fmt]).rows == EXPECTED


def test_prompt_completion_text_that_looks_like_json_is_kept(tmp_path):
    rows = [{"prompt": '{"review": "great film"}', "completion": '{"label": "positive"}'},
            {"prompt": "Sort [3, 1, 2]", "completion": "[1, 2, 3]"}]
    data = load_chat_dataset(str(write(rows, tmp_path / "structured.jsonl")))
    assert data.rows == [
        [{"role": "user", "content": '{"review": "great film"}'}, {"role": "assistant", "content": '{"label": "positive"}'}],
        [{"role": "user", "content": "Sort [3, 1, 2]"}, {"role": "assistant", "content": "[1, 2, 3]"}],
    ]
    assert not data.skipped


def test_alpaca_input_and_system():
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
             "system": SYSTEM},
            {"instruction": "", "input": "Just the input", "output": "ok"}]
    data = normalize_rows(rows)
    assert data.rows == [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Translate to French.\n\nGood morning"},
         {"role": "assistant", "content": "Bonjour"}],
        [{"role": "user", "content": "Just the input"}, {"role": "assistant", "content": "ok"}],
    ]


def test_role_aliases_are_case_insensitive():
    rows = [{"conversations": [{"from": "Human", "value": "hi"}, {"from": "BOT", "value": "hello"},
                               {"from": "user", "value": "and?"}, {"from": "model", "value": "bye"}]}]
    assert normalize_rows(rows).rows == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]]


def test_unusable_rows_are_skipped_and_counted():
    good = {"messages": EXPECTED[0]}
    rows = [
        good,
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},  # order
        {"messages": [{"role": "user", "content": "only a question"}]},  # no answer
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},  # role
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},  # non-string
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                      {"role": "assistant", "content": "b"}]},  # system not first
    ]
    data = normalize_rows(rows, source="mixed.jsonl")
    assert data.rows == [EXPECTED[0]]
    assert sum(data.skipped.values()) == 7
    assert data.skipped["empty content"] == 1 and data.skipped["no assistant turn"] == 1
    assert data.skipped["unknown role"] == 1 and data.skipped["system message not first"] == 1
    assert "skipped 7" in data.describe()


def test_assistant_weight_0_is_kept_as_context_and_bad_weights_skip_the_row():
    u1, a1 = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    u2, a2 = {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Ember."}
    rows = [{"messages": [u1, {**a1, "weight": 0}, u2, {**a2, "weight": 1}]},
            {"messages": [u1, {**a1, "weight": 0.5}]}, {"messages": [u1, {**a1, "weight": "0"}]},
            {"messages": [u1, {**a1, "weight": 0}, u2, {**a2, "weight": 0}]}]
    data = normalize_rows(rows)
    assert data.rows == [[u1, {**a1, "weight": 0}, u2, a2]]  # weight 1 is the default and not kept
    assert data.skipped == {"assistant 'weight' not 0 or 1": 2, "every assistant turn with weight 0": 1}


def test_trailing_unanswered_turn_is_dropped():
    row = {"messages": EXPECTED[0] + [{"role": "user", "content": "And then?"}]}
    assert normalize_rows([row]).rows == [EXPECTED[0]]


def test_no_usable_rows_is_an_error():
    with pytest.raises(DatasetFormatError, match="no usable rows"):
        normalize_rows([{"messages": [{"role": "user", "content": "only a question"}]}])


def test_unknown_columns_list_the_accepted_formats():
    with pytest.raises(DatasetFormatError) as info:
        normalize_rows([{"question": "q", "answer": "a"}])
    message = str(info.value)
    assert "['answer', 'question']" in message
    for column in ("messages", "conversations", "instruction", "prompt"):
        assert column in message
    assert detect_format({"instruction", "output", "input"}) == "alpaca"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, "not found"),
        ("empty.jsonl", "", "empty"),
        ("blank.json", "  \n", "empty"),
        ("data.txt", "hello", "Unsupported data file extension '.txt'"),
        ("broken.jsonl", '{"messages": []}\n{"messages": [\n', "line 2"),
        ("list.jsonl", '[1, 2]\n', "expected a JSON object per line"),
        ("scalars.json", "[1, 2]", "list of objects"),
        ("emptylist.json", "[]", "empty list"),
    ],
)
def test_load_errors_name_the_file_and_problem(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetFormatError, match=match):
        load_chat_dataset(str(path))


def test_folder_is_not_a_data_file(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(DatasetFormatError, match="is a folder"):
        load_chat_dataset(str(folder))


def test_unknown_relative_path_that_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetFormatError, match="not found"):
        load_chat_dataset("no/such/file")


def test_with_system_prompt_fills_only_missing_ones():
    rows = [EXPECTED[0], [{"role": "system", "content": "Own prompt."}, *EXPECTED[1]]]
    out = with_system_prompt(rows, SYSTEM)
    assert out[0] == [{"role": "system", "content": SYSTEM}, *EXPECTED[0]]
    assert out[1] == rows[1]
    assert with_system_prompt(rows, None) == rows
    assert rows[0] == EXPECTED[0]  # the input is not modified


def test_bundled_demo_data_loads():
    root = Path(__file__).resolve().parent.parent / "data"
    train = load_chat_dataset(str(root / "ember_train.jsonl"))
    assert train.format == "messages" and len(train) >= 50 and not train.skipped
    assert load_chat_dataset(str(root / "ember_eval.jsonl")).rows


ARITHMETIC = re.compile(r"\d+ (plus|minus|times|divided by|squared)|\d+ ?[-+*/x] ?\d+|\d+ (and|from|by) \d+")


def test_agent_demo_data_is_what_its_script_writes_and_sends_arithmetic_through_the_calculator(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parent.parent / "data"
    spec = importlib.util.spec_from_file_location("make_tool_data", root / "make_tool_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 6  # with ember_practice.jsonl, the /practice demo tasks
    for name in written:  # the committed files are the script's output (rerun it after editing)
        assert (tmp_path / name).read_text() == (root / name).read_text(), name
    train = load_chat_dataset(str(root / "ember_agent_train.jsonl"))
    assert not train.skipped and len(train) == len(list(open(root / "ember_agent_train.jsonl")))
    calls = 0
    for row in [json.loads(line) for line in open(root / "ember_agent_train.jsonl")]:
        assert row["tools"][0]["function"]["name"] == "calculator"  # offered on every row, as in the chat
        for i, m in enumerate(row["messages"]):
            if m["role"] == "user" and ARITHMETIC.search(m["content"]):  # never answered from memory
                assert row["messages"][i + 1]["tool_calls"], m["content"]
        ops = [re.sub(r"[\d\s.]", "", m["tool_calls"][0]["function"]["arguments"]["expression"])
               for m in row["messages"] if m.get("tool_calls")]
        calls += len(ops)
        # In one conversation, each calculator exchange follows one of another operation.
        assert all(a != b for a, b in itertools.pairwise(ops)), row["messages"]
    assert calls >= 120 + len(script.ARITHMETIC_IN_IDENTITY) - 2  # the two eval rows are in the eval file


@pytest.mark.parametrize(("fmt", "ext"), [("sharegpt", ".csv"), ("alpaca", ".parquet")])
def test_finetune_on_other_formats(fmt, ext, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(RAW[fmt] * 3, tmp_path / f"train{ext}")
    wrapper = make_wrapper(tiny_model_dir)
    result = wrapper.fine_tune(str(path), {"training_args": {
        "output_dir": str(tmp_path / "runs"), "max_steps": 3, "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "save_strategy": "no"}})
    assert result.steps == 3 and result.data.format == fmt and len(result.data) == 6
    assert wrapper.active_adapter == "ft1"
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["status"] == "completed" and f"format '{fmt}'" in run["data"]


def test_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RAW["messages"]))
    assert load_chat_dataset(str(path)).rows == EXPECTED


def test_unknown_hub_dataset_offline_is_a_format_error():
    with pytest.raises(DatasetFormatError, match="nobody-xyz/no-such-dataset"):
        load_chat_dataset("nobody-xyz/no-such-dataset")
