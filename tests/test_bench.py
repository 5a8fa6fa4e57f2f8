"""The benchmark runs end to end on the tiny model and writes a well-formed results file.

Runs `bench/bench.py --quick --model tiny --out TMP` in a subprocess (offline). Checks structure and sanity only:
no timing target is asserted here (targets are what the benchmark reports, not what the tests enforce).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench.py"


def _numbers(node, path="$"):
    """Every (path, number) in a JSON tree (bools are not numbers here)."""
    if isinstance(node, bool) or node is None:
        return
    if isinstance(node, (int, float)):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}[{i}]")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", "tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench failed:\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    assert out.exists(), "bench did not write the --out file"
    assert "| model | target | value | goal | met |" in proc.stdout, "the markdown targets table was not printed"
    return json.loads(out.read_text())


def test_top_level_shape(results):
    assert set(results) >= {"meta", "sections", "targets"}
    meta = results["meta"]
    for key in ("machine", "versions", "date", "args"):
        assert key in meta, key
    assert meta["args"]["quick"] is True and meta["args"]["model"] == "tiny"
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert list(results["sections"]) == ["tiny"]


def test_all_sections_present(results):
    sections = results["sections"]["tiny"]
    assert set(sections) >= {"chat", "startup", "finetune", "memory"}


def test_no_negative_or_nan_numbers(results):
    bad = [(p, v) for p, v in _numbers(results) if not math.isfinite(v) or v < 0]
    assert not bad, bad[:10]


def test_chat_numbers(results):
    chat = results["sections"]["tiny"]["chat"]
    for path in ("raw", "wrapper_generate", "agent_stream_reply"):
        assert _positive(chat[path]["decode_tok_s"]["median"]), path
        assert chat[path]["decode_tok_s"]["n"] >= 1
    assert _positive(chat["raw"]["ttft_s"]["median"])
    assert _positive(chat["wrapper_generate"]["ttft_s"]["median"])
    assert _positive(chat["agent_stream_reply"]["ttft_first_text_s"]["median"])
    assert _positive(chat["wrapper_generate"]["decode_ratio_vs_raw"]["median"])
    assert _positive(chat["agent_stream_reply"]["decode_ratio_vs_raw"]["median"])
    assert _positive(chat["bandwidth_limit"]["limit_tok_s"])
    assert _positive(chat["bandwidth_limit"]["raw_fraction"])
    assert _positive(chat["peak_rss_mb"])
    # the comparison is only meaningful when all paths decode the same prompt to the same length
    assert chat["checks"]["wrapper_encode_same_ids_as_raw"] is True
    assert chat["checks"]["agent_same_prompt_length"] is True
    assert set(chat["checks"]["generated_tokens"].values()) == {chat["new_tokens"]}


def test_startup_numbers(results):
    startup = results["sections"]["tiny"]["startup"]
    assert _positive(startup["bare_load"]["ready_s"]["median"])
    assert _positive(startup["bare_load"]["peak_rss_mb"]["median"])
    if startup["script"]["errors"]:  # a broken chat script is reported, not hidden
        assert all(isinstance(e, str) and e for e in startup["script"]["errors"])
    else:
        assert _positive(startup["script"]["prompt_s"]["median"])
        assert _positive(startup["ratio_prompt_vs_bare"]["median"])
    assert isinstance(startup["heavy_modules_imported_at_startup"], list)


def test_finetune_numbers(results):
    ft = results["sections"]["tiny"]["finetune"]
    for variant in "abc":
        v = ft[variant]
        assert _positive(v["tokens_per_s"]["median"]), variant
        assert _positive(v["num_tokens"]), variant
        assert _positive(v["train_runtime_s"]["median"]), variant
        assert _positive(v["eval_loss"]["median"]), variant
        assert _positive(v["peak_rss_mb"]), variant
        assert v["global_steps"] == v["steps"], variant
        assert v["eval_template_mismatch_rows"] == 0, variant
    # same data, same steps: batch-8 variants train on the same rows
    assert ft["b"]["num_tokens"] == ft["c"]["num_tokens"]
    assert ft["a"]["num_tokens"] < ft["b"]["num_tokens"]


def test_targets_well_formed(results):
    targets = results["targets"]
    assert targets, "no targets reported"
    names = set()
    for t in targets:
        assert {"name", "value", "target", "met"} <= set(t), t
        assert isinstance(t["name"], str) and t["name"]
        assert isinstance(t["target"], str) and t["target"][:2] in (">=", "<=", "==")
        assert isinstance(t["met"], bool)
        assert t["value"] is None or isinstance(t["value"], (int, float))
        names.add(t["name"])
    for prefix in ("chat:", "startup:", "finetune:"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_the_performance_page_renders_every_section_of_a_run(results):
    """bench/performance_page.py turns a fresh run into docs/performance.md: every section measured gets its table,
    the header names the commit the bench recorded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("performance_page", ROOT / "bench" / "performance_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = module.render_page(results)
    assert results["meta"]["git"]["commit"] and f"`{results['meta']['git']['commit']}" in page
    for title in ("Chat generation", "Start-up", "Several agents on one base model", "Fine-tuning"):
        assert f"### {title}" in page, title
    assert "n/a" not in page.split("## Goals")[0], "a figure of the run did not reach the page"
