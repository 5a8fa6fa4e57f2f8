"""Property test: `normalize_rows` turns ANY JSON-like rows into valid conversations or a DatasetFormatError.

Hypothesis feeds rows built from the column names of every supported format (plus role/content/from/value
and junk), with random nested lists, dicts, strings, numbers, booleans and None as values, some of them
JSON text (CSV files hold nested columns that way). Whatever comes in, the result must be either
a `ChatDataset` whose every row is: an optional leading system message, then user/assistant turns
alternating, starting with user and ending with assistant, every content a non-empty string; or a
`DatasetFormatError`. Nothing else may escape (no KeyError, TypeError, AttributeError, ...).
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from hfmodel.data import ChatDataset, DatasetFormatError, normalize_rows

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # large reprs


# Hypothesis caches (unicode tables, constants; no example database) go to a temporary folder, not into
# the project as ./.hypothesis. Set at import: Hypothesis writes its constants cache when it collects tests.
_STORAGE = tempfile.mkdtemp(prefix="hypothesis-")
set_hypothesis_home_dir(_STORAGE)
atexit.register(shutil.rmtree, _STORAGE, ignore_errors=True)  # also when the module is only collected


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_storage_cleanup():
    yield
    set_hypothesis_home_dir(None)
    shutil.rmtree(_STORAGE, ignore_errors=True)


KEY_POOL = ["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "role",
            "content", "from", "value", "system", "text", "id"]
ROLE_POOL = ["system", "user", "assistant", "human", "gpt", "bot", "model", "chatgpt", "USER", "Assistant",
             "tool", "function", "", "wizard"]
TEXT_POOL = ["", " ", "\n", "hi", "Hello there!", "[", "{", "[1, 2]", '{"a": 1}', '["a", "b"]',
             '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]', "null", "0"]

texts = st.one_of(st.sampled_from(TEXT_POOL), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=16), texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEY_POOL), children, max_size=4)),
    max_leaves=12,
)

# Plausible turns, so that valid rows (and every converter) are actually reached, not only junk.
turn_dicts = st.fixed_dictionaries(
    {},
    optional={"role": st.one_of(st.sampled_from(ROLE_POOL), json_values),
              "content": st.one_of(texts, json_values),
              "from": st.one_of(st.sampled_from(ROLE_POOL), json_values),
              "value": st.one_of(texts, json_values)},
)
turn_lists = st.lists(st.one_of(turn_dicts, turn_dicts, texts, json_values), max_size=6)
as_json_text = st.builds(json.dumps, turn_lists)  # nested columns stored as JSON text (CSV)

column_values = {
    "messages": st.one_of(turn_lists, as_json_text, json_values),
    "conversations": st.one_of(turn_lists, st.lists(texts, max_size=6), as_json_text, json_values),
    "prompt": st.one_of(texts, turn_lists, as_json_text, json_values),
    "completion": st.one_of(texts, turn_lists, as_json_text, json_values),
}
rows = st.dictionaries(
    st.sampled_from(KEY_POOL),
    st.one_of(texts, json_values),
    max_size=5,
).flatmap(lambda base: st.fixed_dictionaries(
    {k: st.just(v) for k, v in base.items()},
    optional={k: strategy for k, strategy in column_values.items() if k not in base},
))
# Rows that are nearly right (the interesting cases): right columns, mostly valid roles and contents.
good_roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "User", "ASSISTANT"])
good_texts = st.one_of(st.sampled_from(["hi", "Hello there!", "Four.", " x ", "[not json", "{{ x }}"]),
                       st.text(min_size=1, max_size=8))
any_texts = st.one_of(good_texts, good_texts, texts)
exchanges = st.lists(st.tuples(good_texts, good_texts), min_size=1, max_size=3)


def _as_turns(pairs, role_key="role", content_key="content", user="user", assistant="assistant"):
    return [t for q, a in pairs for t in ({role_key: user, content_key: q}, {role_key: assistant, content_key: a})]


alternating = st.builds(_as_turns, exchanges)
alternating_sharegpt = st.builds(lambda p: _as_turns(p, "from", "value", "human", "gpt"), exchanges)
with_system = st.builds(lambda s, turns: [{"role": "system", "content": s}, *turns], good_texts, alternating)
# A valid conversation with one random change: a turn replaced by junk, dropped, or junk inserted.
mutated = st.builds(
    lambda turns, i, junk, how: (turns[:i % len(turns)] + ([junk] if how != "drop" else [])
                                 + turns[i % len(turns) + (0 if how == "insert" else 1):]),
    st.one_of(alternating, with_system), st.integers(0, 7),
    st.one_of(turn_dicts, st.fixed_dictionaries({"role": good_roles, "content": any_texts}), json_values),
    st.sampled_from(["replace", "drop", "insert"]),
)
near_messages = st.one_of(alternating, with_system, mutated, mutated,
                          st.lists(st.fixed_dictionaries({"role": good_roles, "content": any_texts}), max_size=5))
near_sharegpt = st.one_of(alternating_sharegpt, near_messages,
                          st.lists(st.fixed_dictionaries({"from": good_roles, "value": any_texts}), max_size=5))
near_rows = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(near_messages, near_messages.map(json.dumps))},
                          optional={"system": good_texts, "id": scalars}),
    st.fixed_dictionaries({"conversations": st.one_of(near_sharegpt, st.lists(good_texts, min_size=1, max_size=6),
                                                      near_sharegpt.map(json.dumps))},
                          optional={"system": st.one_of(good_texts, json_values)}),
    st.fixed_dictionaries({"instruction": good_texts, "output": st.one_of(good_texts, scalars)},
                          optional={"input": st.one_of(good_texts, scalars), "system": good_texts}),
    st.fixed_dictionaries({"prompt": st.one_of(good_texts, near_messages, near_messages.map(json.dumps)),
                           "completion": st.one_of(good_texts, near_messages, near_messages.map(json.dumps))}),
)
# Mostly lists of dict rows; sometimes junk rows (not dicts) and empty lists.
row_lists = st.one_of(st.lists(near_rows, min_size=1, max_size=6), st.lists(st.one_of(near_rows, rows), max_size=6),
                      st.lists(rows, min_size=1, max_size=6), st.lists(st.one_of(rows, json_values), max_size=4))


def assert_valid_conversation(conversation) -> None:
    assert isinstance(conversation, list) and conversation, conversation
    for message in conversation:
        assert isinstance(message, dict) and set(message) == {"role", "content"}, message
        assert isinstance(message["content"], str) and message["content"].strip(), message
    body = conversation[1:] if conversation[0]["role"] == "system" else conversation
    assert body, conversation
    for i, message in enumerate(body):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant"), conversation
    assert body[-1]["role"] == "assistant", conversation


# database=None: no .hypothesis/ folder is written into the project.
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_rows=row_lists)
def test_normalize_rows_gives_valid_rows_or_a_dataset_format_error(raw_rows):
    before = copy.deepcopy(raw_rows)
    try:
        data = normalize_rows(raw_rows, source="random.jsonl")
    except DatasetFormatError as e:
        assert str(e)  # a message, naming the problem
        return
    finally:
        assert raw_rows == before  # the caller's rows are never modified
    assert isinstance(data, ChatDataset)
    assert data.rows, "a dataset with no usable rows must be a DatasetFormatError"
    for conversation in data.rows:
        assert_valid_conversation(conversation)
    # Every input row is either used or skipped and counted (nothing silently disappears).
    assert len(data.rows) + sum(data.skipped.values()) == len(raw_rows)
    assert all(isinstance(reason, str) and reason for reason in data.skipped)
    assert data.format in ("messages", "sharegpt", "lima", "alpaca", "prompt-completion")
    assert str(len(data.rows)) in data.describe()


@pytest.mark.parametrize("raw_rows", [
    [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    [{"conversations": ["q", "a", "q2", "a2"]}],
    [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"}],
    [{"instruction": "q", "input": "ctx", "output": "a"}],
    [{"prompt": "q", "completion": "a"}],
    [{"prompt": '[{"role": "user", "content": "q"}]', "completion": '[{"role": "assistant", "content": "a"}]'}],
], ids=["messages", "lima", "sharegpt", "alpaca", "prompt-completion", "prompt-completion-json-text"])
def test_the_generators_reach_every_format(raw_rows):
    """Sanity check of the property's oracle on one known-good row per format."""
    data = normalize_rows(raw_rows)
    assert len(data.rows) == 1 and not data.skipped
    assert_valid_conversation(data.rows[0])
