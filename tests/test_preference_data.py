"""Preference data: every format from every file type, bad rows skipped and counted, an all-bad file is one error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfmodel.data import DatasetFormatError
from hfmodel.preference_data import (
    Marked,
    Pair,
    load_preference_dataset,
    normalize_preference_rows,
    pairs_of,
    preference_mix,
    unpair,
)

USER = [{"role": "user", "content": "Who are you?"}]
CHOSEN, REJECTED = "I am Ember, a friendly assistant.", "The quick brown fox."


def msgs(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


# One row per format, and the Pair / Marked each must become.
FORMATS = {
    "pairs (text)": ({"prompt": "Who are you?", "chosen": CHOSEN, "rejected": REJECTED},
                     "pairs", Pair(USER, CHOSEN, REJECTED)),
    "pairs (messages)": ({"prompt": [{"role": "system", "content": "Be kind."}, *USER],
                          "chosen": msgs("assistant", CHOSEN), "rejected": msgs("assistant", REJECTED)},
                         "pairs", Pair([{"role": "system", "content": "Be kind."}, *USER], CHOSEN, REJECTED)),
    "conversations": ({"chosen": [*USER, *msgs("assistant", CHOSEN)], "rejected": [*USER, *msgs("assistant", REJECTED)]},
                      "conversations", Pair(USER, CHOSEN, REJECTED)),
    "marked": ({"prompt": "Who are you?", "completion": CHOSEN, "label": True}, "marked", Marked(USER, CHOSEN, True)),
}


def write(path: Path, rows: list[dict]) -> Path:
    """The same rows as .jsonl, .json, .csv (nested columns as JSON text) or .parquet."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows])
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_from_every_file_type(tmp_path, name, suffix):
    row, fmt, expected = FORMATS[name]
    data = load_preference_dataset(str(write(tmp_path / f"data{suffix}", [row, row])))
    assert data.format == fmt
    assert data.rows == [expected, expected]
    assert not data.skipped
    assert f"format '{fmt}', 2 usable" in data.describe()


def test_hub_dataset_ids_load_through_the_shared_loader(monkeypatch):
    from hfmodel import data as chat_data

    asked = []
    monkeypatch.setattr(chat_data, "_load_hub", lambda dataset_id, split: asked.append((dataset_id, split)) or
                        [FORMATS["pairs (text)"][0]])
    data = load_preference_dataset("someone/style-pairs")
    assert asked == [("someone/style-pairs", "train")]
    assert data.rows == [FORMATS["pairs (text)"][2]]


def test_bad_rows_are_skipped_and_counted():
    good = {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "What."}
    rows = [
        good,
        {"prompt": "Hi", "chosen": "Same answer.", "rejected": "Same answer. "},  # identical sides
        {"prompt": "Hi", "chosen": None, "rejected": "What."},  # missing side
        {"prompt": "Hi", "chosen": "Hello!", "rejected": ""},  # missing side
        {"prompt": "", "chosen": "Hello!", "rejected": "What."},  # missing prompt
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}], "chosen": "a",
         "rejected": "b"},  # the prompt does not end on a user turn
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "rejected": "b"},  # an answer that is not one assistant message
    ]
    data = normalize_preference_rows(rows, "mixed.jsonl")
    assert data.rows == [Pair([{"role": "user", "content": "Hi"}], good["chosen"], good["rejected"])]
    assert data.skipped == {"identical chosen and rejected": 1, "missing chosen": 1, "missing rejected": 1,
                            "missing prompt": 1, "prompt not ending on a user turn": 1,
                            "'chosen' not one assistant message": 1}
    assert "skipped 6" in data.describe()


def test_binarized_conversations_must_share_the_prompt():
    rows = [{"chosen": [*USER, *msgs("assistant", CHOSEN)],
             "rejected": [*msgs("user", "Something else?"), *msgs("assistant", REJECTED)]},
            {"chosen": [*USER, *msgs("assistant", CHOSEN)], "rejected": [*USER, *msgs("assistant", REJECTED)]}]
    data = normalize_preference_rows(rows)
    assert data.rows == [Pair(USER, CHOSEN, REJECTED)]
    assert data.skipped == {"chosen and rejected answering different prompts": 1}


def test_marked_labels_accept_common_spellings():
    rows = [{"prompt": "Q", "completion": "A", "label": label} for label in (True, 0, "yes", "False", "bad", "maybe")]
    data = normalize_preference_rows(rows)
    assert [m.label for m in data.rows] == [True, False, True, False, False]
    assert data.skipped == {"label not true/false": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_all_bad_file_is_one_clear_error(tmp_path, suffix):
    rows = [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, {"prompt": "Hi", "chosen": "", "rejected": "x"}]
    path = write(tmp_path / f"bad{suffix}", rows)
    with pytest.raises(DatasetFormatError) as error:
        load_preference_dataset(str(path))
    message = str(error.value)
    assert str(path) in message and "no usable rows" in message
    assert "1 identical chosen and rejected" in message and "1 missing chosen" in message
    assert "two different, non-empty answers" in message


def test_unknown_columns_list_the_accepted_formats_and_spot_sft_data():
    with pytest.raises(DatasetFormatError, match="method=sft") as error:
        normalize_preference_rows([{"messages": [*USER, *msgs("assistant", CHOSEN)]}])
    assert "`prompt`, `chosen`, `rejected`" in str(error.value) and "`label`" in str(error.value)
    with pytest.raises(DatasetFormatError, match="no `prompt`"):
        normalize_preference_rows([{"chosen": "a", "rejected": "b"}])


def test_pairs_and_marked_answers_convert_both_ways():
    pairs = [Pair(USER, CHOSEN, REJECTED)]
    marked = unpair(pairs)
    assert marked == [Marked(USER, CHOSEN, True), Marked(USER, REJECTED, False)]
    assert pairs_of(marked) == pairs
    assert pairs_of([Marked(USER, CHOSEN, True)]) == []


def test_the_taught_mix_repeats_taught_rows_and_replays_the_configured_pairs():
    taught = [Pair(USER, CHOSEN, REJECTED).to_row()]
    replay = normalize_preference_rows([{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(20)])
    mix = preference_mix(taught, replay, min_repeats=8, paired=True)
    assert mix.count(taught[0]) == 20 and len(mix) == 40  # taught rows are at least half of the mix
    kto = preference_mix(taught, replay, min_repeats=8, paired=False)
    assert sum(1 for r in kto if "label" in r) == 40  # replayed pairs become one good and one bad answer each
    assert preference_mix(taught, None, min_repeats=8, paired=True) == taught * 8
