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


# ------------------------------------------------------------------------------------------ the practice section
# The section itself drives SmolLM2 for ~10 minutes (`make bench`); here its parsing and rendering run on fabricated
# inputs: a report.md written by the real writer, the chat's real /adapters table, probe_tools' output lines.


def _module(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _module("bench_under_test", BENCH)


def _practice_result(run_dir: Path):
    from hfmodel import practice

    held_out = [practice.Task(messages=[{"role": "user", "content": f"story {i}"}], answer=i) for i in range(4)]
    held_out.append(practice.Task(messages=[{"role": "user", "content": "hello"}], plain=True))
    before = practice.Scores(pass1_chat=0.5, pass1_greedy=0.25, pass_k=0.75, mean_reward=0.4, valid_calls=0.9,
                             spurious=(1, 1), greedy_replies=["a"] * 5, seconds=20.5)
    after = practice.Scores(pass1_chat=1.0, pass1_greedy=0.75, pass_k=1.0, mean_reward=0.8, valid_calls=1.0,
                            spurious=(0, 1), greedy_replies=["b"] * 5, seconds=19.0)
    round_ = practice.RoundLog(round=1, attempts=144, accepted=51, solved=31, tasks=36, rows=51, replayed=51,
                               mean_reward=0.35, sampling_seconds=250.25, training_seconds=78.5, tokens=9000,
                               adapter="ft-2")
    return practice.PracticeResult(run_dir=run_dir, method="rft", settings=practice.PracticeSettings(),
                                   tasks=practice.TaskSet(held_out, "data/ember_practice.jsonl"), held_out=held_out,
                                   before_adapter="ft-1", adapter="ft-2", rounds=[round_], before=before, after=after)


def test_practice_report_figures_are_read_from_the_real_report(bench, tmp_path):
    from hfmodel import practice

    report = practice.write_report(_practice_result(tmp_path)).read_text()
    parsed = bench.parse_practice_report(report)
    assert parsed["before_adapter"] == "ft-1" and parsed["after_adapter"] == "ft-2"
    assert parsed["pass1_chat"] == {"before": 0.5, "after": 1.0, "tasks": 4}
    assert parsed["pass1_greedy"] == {"before": 0.25, "after": 0.75}
    assert parsed["pass_k"] == {"before": 0.75, "after": 1.0, "k": 4, "temperature": 0.8}
    assert parsed["spurious"] == {"before": [1, 1], "after": [0, 1]}
    assert parsed["rounds"] == [{"round": 1, "accepted": [51, 144], "solved": [31, 36]}]
    assert (parsed["sampling_s"], parsed["training_s"], parsed["evaluation_s"]) == (250.2, 78.5, 39.5)


def test_practice_adapter_folders_are_read_from_the_chats_adapters_table(bench):
    """The real /adapters command's table, printed as the piped chat prints it (wide, no colour)."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from chat.commands import ChatSession

    buffer = io.StringIO()
    console = Console(file=buffer, width=400, color_system=None)
    demo = SimpleNamespace(name="ft-1", parent=None, path=Path("/tmp/w/runs/20261207-1-SmolLM2/adapter"),
                           note="trained 20261207-1-SmolLM2")
    practised = SimpleNamespace(name="ft-2", parent="ft-1", path=Path("/tmp/w/runs/20261207-2-SmolLM2/adapter"),
                                note="trained 20261207-2-SmolLM2")
    model = SimpleNamespace(active_adapter="ft-2", source=SimpleNamespace(path="/models/smollm2"),
                            adapters={"ft-1": demo, "ft-2": practised})
    ChatSession.cmd_adapters(SimpleNamespace(model=model, print=console.print), [])
    table = bench.parse_adapters_table(buffer.getvalue())
    assert table["ft-1"] == {"path": str(demo.path), "from": "base", "active": False}
    assert table["ft-2"] == {"path": str(practised.path), "from": "ft-1", "active": True}
    assert table["base"]["path"] == "/models/smollm2"


def test_probe_counts_are_the_last_json_line(bench):
    stdout = ('  arithmetic | 3 boxes of 4? | -> calculator({"expression": "3*4"}) = 12 | {"a": 1}\n'
              '{"right_answer": 30, "arithmetic": 40}\n  trailing text\n')
    assert bench.last_json_line(stdout) == {"right_answer": 30, "arithmetic": 40}
    assert bench.last_json_line("no counts\n{broken") is None


def _practice_fragment(practice_s: float, after_right: int) -> dict:
    def counts(right, no_call, identity):
        return {"right_answer": right, "arithmetic": 40, "plain_no_call": no_call, "plain": 10,
                "identity": identity, "identity_total": 10}

    return {"command": "/practice data/ember_practice.jsonl force_retrain=true", "practice_s": practice_s,
            "load_average_start": [1.2, 1.0, 0.9], "load_average": [2.1, 1.5, 1.0], "rc": 0,
            "run_dir": "runs/20261207-2-SmolLM2-practice",
            "report": {"before_adapter": "ft-1", "after_adapter": "ft-2",
                       "pass1_chat": {"before": 0.5, "after": 0.75, "tasks": 4},
                       "pass1_greedy": {"before": 0.25, "after": 0.75},
                       "pass_k": {"before": 0.75, "after": 1.0, "k": 4, "temperature": 0.8},
                       "spurious": {"before": [0, 1], "after": [0, 1]},
                       "rounds": [{"round": 1, "accepted": [51, 144], "solved": [31, 36]}],
                       "sampling_s": 250.2, "training_s": 78.5, "evaluation_s": 39.5},
            "served": {"before": {"name": "ft-1", "path": "runs/a/adapter"},
                       "after": {"name": "ft-2", "path": "runs/b/adapter"}},
            "probes": {"blind": {"before": counts(24, 10, 10), "after": counts(after_right, 8, 9)},
                       "dev": {"before": counts(30, 15, 10) | {"arithmetic": 64, "plain": 15, "identity_total": 10},
                               "after": counts(41, 15, 10) | {"arithmetic": 64, "plain": 15, "identity_total": 10}}}}


def test_practice_targets_carry_the_values_before(bench):
    targets = {t["name"].split(",")[0]: t for t in bench.build_targets("smollm2", {"practice": _practice_fragment(
        412.0, 33)})}
    time_ = targets["practice: /practice data/ember_practice.jsonl (RFT defaults)"]
    assert time_["value"] == 412.0 and time_["met"] is True
    right = targets["practice: blind held-out arithmetic right through the calculator"]
    assert (right["value"], right["before"], right["met"]) == (33, 24, True)
    spurious = targets["practice: blind plain prompts with a spurious call"]
    assert (spurious["value"], spurious["before"], spurious["met"]) == (2, 0, False)  # 8 of 10 without a call
    identity = targets["practice: identity answers naming Ember"]
    assert (identity["value"], identity["before"], identity["met"]) == (9, 10, True)
    slow = {t["name"].split(",")[0]: t for t in bench.build_targets("smollm2", {"practice": _practice_fragment(
        500.0, 31)})}
    assert not slow["practice: /practice data/ember_practice.jsonl (RFT defaults)"]["met"]
    assert not slow["practice: blind held-out arithmetic right through the calculator"]["met"]
    unfinished = bench.build_targets("smollm2", {"practice": {"practice_s": None, "rc": 1}})
    assert unfinished and not any(t["met"] for t in unfinished)  # a run that died meets nothing


def test_the_performance_page_shows_practice_before_and_after(bench):
    page_module = _module("performance_page_under_test", ROOT / "bench" / "performance_page.py")
    fragment = _practice_fragment(412.0, 33)
    results = {"meta": {"args": {"sections": ["practice"]}}, "sections": {"smollm2": {"practice": fragment}},
               "targets": bench.build_targets("smollm2", {"practice": fragment})}
    page = page_module.render_page(results)
    practice = page.split("### Practice")[1].split("Not measured")[0]
    assert "| 24/40 | 33/40 |" in practice  # blind, right through the tool
    assert "| 30/64 | 41/64 |" in practice  # dev
    assert "| 10/10 | 9/10 |" in practice  # identity
    assert "| 50 % | 75 % |" in practice and "| 0/1 | 0/1 |" in practice
    assert "`ft-1` (`runs/a/adapter`) | `ft-2` (`runs/b/adapter`)" in practice
    assert "412 s (sampling 250 s, training 78.5 s" in practice and "51/144 attempts accepted" in practice
    assert "[1.2, 1.0, 0.9]" in practice
    assert "33 (before 24)" in page.split("## Goals")[1]
    not_measured = page.split("Not measured in this run: ")[1].split("\n")[0]
    assert not_measured.startswith("chat generation") and "practice" not in not_measured
    partial = page_module.render_page({"meta": {}, "sections": {"smollm2": {"demo": {"start_up": {}}}}})
    not_measured = partial.split("Not measured in this run: ")[1].split("\n")[0]
    assert "practice" in not_measured and "fine-tuning" in not_measured
    died = page_module.render_page({"meta": {}, "sections": {"smollm2": {"practice": {"practice_s": None, "rc": 1}}}})
    assert "It did not finish (exit code 1)" in died


@pytest.mark.slow  # ~1 minute: the chat script, its start-up fine-tune, /practice and four probe runs, on the tiny model
def test_the_practice_section_drives_the_real_chat_on_the_tiny_model(bench, tiny_model_dir, tmp_path, monkeypatch):
    """What `make bench` runs on SmolLM2, on the tiny model: the script's prompt, `/practice` to its report, the
    /adapters table, the report's figures and the probes on both adapters all reach the results and the page."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = bench.bench_practice(1, str(tmp_path), timeout=600, script_args=("--local-model-path", str(tiny_model_dir)))
    assert out["rc"] == 0 and out["practice_s"] > 0, out.get("output_tail")
    assert out["run_dir"].startswith("runs/") and out["run_dir"].endswith("-practice")
    before, after = out["served"]["before"], out["served"]["after"]
    assert before["name"] and after["name"] and before["name"] != after["name"]
    assert out["adapters"][after["name"]]["from"] == before["name"] and out["adapters"][after["name"]]["active"]
    for side in (before, after):
        assert side["path"].startswith("runs/") and (tmp_path / "practice-cwd" / side["path"] / "adapter_config.json"
                                                     ).exists()
    report = out["report"]
    assert report["pass_k"]["k"] == 4 and report["rounds"][0]["accepted"][1] > 0
    assert all(report[key] is not None for key in ("sampling_s", "training_s", "evaluation_s"))
    for side in ("before", "after"):
        blind, dev = out["probes"]["blind"][side], out["probes"]["dev"][side]
        assert (blind["arithmetic"], blind["plain"], blind["identity_total"]) == (40, 10, 10), blind
        assert (dev["arithmetic"], dev["plain"]) == (64, 15), dev
    targets = bench.build_targets("smollm2", {"practice": out})
    assert len(targets) == 4 and all(t["value"] is not None for t in targets)
    page_module = _module("performance_page_under_test", ROOT / "bench" / "performance_page.py")
    practice = page_module.render_page({"sections": {"smollm2": {"practice": out}}}).split("### Practice")[1]
    assert "n/a" not in practice.split("Not measured")[0], practice


def test_the_first_reply_section_waits_for_the_scripts_own_agent(bench):
    """The first-reply section sees the reply by the speaker's name; with another name it waited its whole timeout."""
    import ast

    tree = ast.parse((ROOT / "load_finetune_huggingface_model.py").read_text())
    (agents,) = [node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", None) == "agents"]
    first = agents.elts[0]
    name = next(v for k, v in zip(first.keys, first.values, strict=True) if ast.literal_eval(k) == "name")
    assert ast.literal_eval(name) == bench.CHAT_AGENT
