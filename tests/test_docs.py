"""The docs stay true: README.md and docs/*.md against the code they describe.

- every ```python block runs (on the tiny model: the bundled model's id is replaced by the tiny model's folder);
- the commands tables of docs/commands.md equal what `/help` prints (one agent, and several), and every command of
  the README's cheat-sheet exists;
- the defaults tables equal hfmodel/settings.py; the flags tables equal the two scripts' `--help`;
- every backticked repository path and every relative link exists; the README stays a short guide;
- the README's `fine_tune_config` is the shipped one, and configs/finetune/demo.yaml trains the same run as the
  script's `model_configs[0]`;
- docs/performance.md is what bench/performance_page.py makes of bench/results.json;
- the layering of docs/architecture.md holds (read from the imports with `ast`);
- the project is installed: the wrapper imports from another folder; pyproject's dependencies are requirements.txt.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from huggingface_model import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12 * 1024

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------ markdown helpers


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced blocks opened with ```language (`""`: the bare fences of transcripts), in order."""
    blocks, current, lang = [], None, ""
    for line in text.splitlines(keepends=True):
        fence = line.strip().startswith("```")
        if current is None and fence:
            current, lang = [], line.strip()[3:].strip()
        elif current is not None and fence:
            if lang == language:
                blocks.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def section(text: str, heading: str) -> str:
    """The text below `heading` (a markdown heading line) up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.M)
    assert match, f"no heading {heading!r}"
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`: its rows (header and separator left out) as lists of cells."""
    found: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if current is None:
            current = []
            found.append(current)
            continue  # the header
        if not all(re.fullmatch(r":?-+:?", c) for c in cells):
            current.append(cells)
    return found


def unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


# ------------------------------------------------------------------------------------------ python blocks


@pytest.fixture(scope="module")
def docs_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a window that holds tool schemas (the team example's leader is offered TeamAssign)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("docs") / "tiny-llama", context=4096)


def on_tiny_model(code: str, model_dir: Path) -> str:
    """The block with the bundled model's id replaced by the tiny model's folder."""
    return (code.replace(f'model_id="{DEFAULT_MODEL_ID}"', f'local_model_path="{model_dir}"')
            .replace(f'"model_id": "{DEFAULT_MODEL_ID}"', f'"local_model_path": "{model_dir}"'))


# Pages whose blocks need more than a model (an export to read, a server to talk to) are run by their own tests.
RUN_ELSEWHERE = {"docs/deployment.md": "tests/test_gguf_export.py and tests/test_gguf_serve.py (a real export, a real server)"}
PYTHON_PAGES = [p for p in PAGES if code_blocks(p.read_text(), "python") and rel(p) not in RUN_ELSEWHERE]


def test_the_docs_have_python_examples():
    assert {"README.md", "docs/python-api.md", "docs/preference.md"} <= {rel(p) for p in PYTHON_PAGES}


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=rel)
def test_every_python_block_runs_on_the_tiny_model(page, docs_model_dir, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace, from a folder where `data/` is the project's data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(code_blocks(page.read_text(), "python")):
        code = on_tiny_model(block, docs_model_dir)
        assert DEFAULT_MODEL_ID not in code, f"{rel(page)} block {i}: name the model as model_id=\"...\""
        exec(compile(code, f"{rel(page)} block {i}", "exec"), namespace)  # noqa: S102 - our own docs, in a test


def test_every_json_example_row_is_a_conversation_the_loader_reads():
    from hfmodel.data import normalize_rows

    rows = [json.loads(line) for page in PAGES for block in code_blocks(page.read_text(), "json")
            for line in block.splitlines() if line.strip()]
    assert rows
    assert len(normalize_rows(rows).rows) == len(rows)


def test_the_readme_fine_tune_config_is_the_shipped_one():
    import load_finetune_huggingface_model as script

    namespace: dict = {}
    blocks = [b for b in code_blocks(README.read_text(), "python") if b.startswith("fine_tune_config = ")]
    assert len(blocks) == 1
    exec(blocks[0], namespace)  # noqa: S102 - our own README, in a test

    def relative(value):
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
            return rel(Path(value))
        return value

    assert namespace["fine_tune_config"] == relative(script.model_configs[0]["fine_tune_config"])


# ------------------------------------------------------------------------------------------ commands and /help


def help_rows(output: str) -> list[list[str]]:
    """The rows of the `/help` tables as printed: a command, two or more spaces, what it does."""
    rows = []
    for line in output.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2 and (parts[0][:1] in "/@" or parts[0] == "exit"):
            rows.append(parts)
    return rows


def printed_help(monkeypatch, capsys, model_dir: Path, agents: list[dict] | None) -> list[list[str]]:
    """`/help` typed into the chat script, as a user runs it (several agents when `agents` is given)."""
    import load_finetune_huggingface_model as script

    monkeypatch.setenv("COLUMNS", "300")  # one line per row
    if agents:
        monkeypatch.setattr(script, "agents", agents)
    lines = ["/help", "exit"]
    monkeypatch.setattr("builtins.input", lambda prompt="": lines.pop(0))
    assert script.main(["--no-finetune", "--no-session-log", "--no-tools", "--local-model-path", str(model_dir)]) == 0
    return help_rows(capsys.readouterr().out)


def documented_commands() -> tuple[list[list[str]], list[list[str]]]:
    page = (ROOT / "docs" / "commands.md").read_text()
    one, several = tables(section(page, "The commands"))[:2]
    return [[unquote(c), what] for c, what in one], [[unquote(c), what] for c, what in several]


def test_the_commands_tables_are_what_help_prints(tiny_model_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    one, several = documented_commands()
    assert printed_help(monkeypatch, capsys, tiny_model_dir, None) == one + several  # `/agent add` works in any chat
    team = [{"name": "Ember", "sys_prompt": "You are Ember."}, {"name": "Critic", "sys_prompt": "You review."}]
    assert printed_help(monkeypatch, capsys, tiny_model_dir, team) == one + several


def test_every_command_of_the_readme_cheat_sheet_exists():
    one, several = documented_commands()
    known = {usage for usage, _ in one + several}
    cheat_sheet = tables(section(README.read_text(), "Command cheat-sheet"))[0]
    assert len(cheat_sheet) >= 10
    assert [unquote(c) for c, _ in cheat_sheet if unquote(c) not in known] == []


def test_every_command_typed_in_a_transcript_exists():
    """`User: /name ...` and `User: @Agent /name ...` lines of the docs' example chats use real commands."""
    one, several = documented_commands()
    known = {usage.split()[0] for usage, _ in one + several}
    typed = {match for page in PAGES for block in code_blocks(page.read_text(), "")
             for match in re.findall(r"^User: (?:@\w+ )?(/[a-z]+)", block, re.M)}
    assert {"/teach", "/train", "/undo", "/dryrun", "/finetune"} <= typed
    assert typed - known == set()


# ------------------------------------------------------------------------------------------ settings and flags


def documented_values(table: list[list[str]]) -> dict[str, object]:
    return {unquote(key): ast.literal_eval(unquote(default)) for key, default, *_ in table}


def test_the_defaults_table_is_the_settings_module():
    from hfmodel.settings import DEFAULT_LORA_CONFIG, DEFAULT_TRAINING_ARGS

    page = (ROOT / "docs" / "configuration.md").read_text()
    expected = {**{f"lora_config.{k}": v for k, v in DEFAULT_LORA_CONFIG.items()},
                **{f"training_args.{k}": v for k, v in DEFAULT_TRAINING_ARGS.items()}}
    documented = documented_values(tables(section(page, "Fine-tune defaults"))[0])
    assert documented == expected
    assert list(documented) == list(expected)  # same order as the module, so a new default has an obvious place


def test_the_fine_tune_config_keys_table_is_the_config_class():
    import dataclasses

    from hfmodel.settings import TOP_LEVEL_KEYS, FineTuneConfig

    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = tables(section(page, "`fine_tune_config`"))[0]
    assert [unquote(key) for key, *_ in rows] == list(TOP_LEVEL_KEYS)
    defaults = {f.name: f.default for f in dataclasses.fields(FineTuneConfig)}
    scalars = [row for row in rows if row[1].startswith("`")]
    assert documented_values(scalars) == {unquote(k): defaults[unquote(k)] for k, *_ in scalars}
    assert len(scalars) == len(TOP_LEVEL_KEYS) - 2  # all but the two dicts


class _Parser(Exception):
    pass


def parser_of(parse_args, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's `parse_args` builds (caught at its parse_args call)."""
    def grab(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parser) as caught:
        parse_args([])
    monkeypatch.undo()
    return caught.value.args[0]


def flags(parser: argparse.ArgumentParser) -> list[list[str]]:
    """[flag as --help shows it, help text] for every option but -h and hidden ones."""
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        metavar = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
        rows.append([", ".join(action.option_strings) + metavar, action.help])
    return rows


def test_the_flags_tables_are_the_scripts_help(monkeypatch):
    import finetune
    import load_finetune_huggingface_model as script

    for parse_args, page, heading in ((script.parse_args, "configuration.md", "Command-line flags"),
                                      (finetune.parse_args, "scaling.md", "Flags")):
        documented = tables(section((ROOT / "docs" / page).read_text(), heading))[0]
        assert [[unquote(f), what] for f, what in documented] == flags(parser_of(parse_args, monkeypatch)), page


def test_the_memory_table_is_what_estimate_memory_prints():
    from hfmodel.memory import memory_table

    page = (ROOT / "docs" / "scaling.md").read_text()
    documented = [line for line in section(page, "How much GPU memory").splitlines() if line.startswith("|")]
    printed = [line for line in memory_table(2048, 1, 16, False).splitlines() if line.startswith("|")]
    assert documented == printed and len(printed) > 2


def test_the_readme_main_settings_are_the_shipped_values():
    import load_finetune_huggingface_model as script

    rows = tables(section(README.read_text(), "The six main settings"))[0]
    assert len(rows) == 6
    shipped = {"sys_prompt": script.sys_prompt, **script.model_configs[0]}
    for key, value, _ in rows:
        key = unquote(key)
        assert key in shipped, key
        if key == "data_path":
            assert Path(shipped[key]) == ROOT / unquote(value)
        elif value.startswith("`"):
            assert ast.literal_eval(unquote(value)) == shipped[key], key


# ------------------------------------------------------------------------------------------ paths and links

# Backticked names of the user's own files and of what a run creates, not repository files.
NOT_IN_REPOSITORY = ("runs/", "my_data.jsonl", "my-adapter", "my-ember", "critic.jsonl", "my.yaml", "report.md",
                     "run.json", "log_history.json")
PATH_LIKE = re.compile(r"[\w.-]+(/[\w.-]+)*/?")
SUFFIXES = (".py", ".md", ".yaml", ".toml", ".txt", ".jsonl", ".json", ".example")
SKIPPED_FOLDERS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def repository_names() -> tuple[set[str], set[str]]:
    """(top-level entries, every file name) of the working tree."""
    names = set()
    for _folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_FOLDERS and not d.endswith(".egg-info")]
        names |= set(files)
    return {p.name for p in ROOT.iterdir()}, names


def backticked_paths(text: str) -> list[str]:
    """Spans that name a repository path: `folder/...` under a top-level folder, or a file name with a suffix.
    Hub ids (`Qwen/Qwen2.5-0.5B-Instruct`) start with no top-level folder; `.json` alone is a suffix."""
    top, _ = repository_names()
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    return sorted({s for s in spans if PATH_LIKE.fullmatch(s) and not s.startswith(NOT_IN_REPOSITORY)
                   and not re.fullmatch(r"\.\w+", s)
                   and (s.split("/")[0] in top if "/" in s else s.endswith(SUFFIXES))})


@pytest.mark.parametrize("page", [*PAGES, ROOT / "CONTRIBUTING.md"], ids=rel)
def test_every_backticked_path_exists(page):
    """A path must exist; a bare file name must exist somewhere in the project (`cpu_2proc.yaml`)."""
    _, names = repository_names()
    missing = [p for p in backticked_paths(page.read_text())
               if not ((ROOT / p).exists() if "/" in p else p in names)]
    assert missing == [], f"{rel(page)} names paths that do not exist"


@pytest.mark.parametrize("page", [*PAGES, ROOT / "CONTRIBUTING.md"], ids=rel)
def test_every_relative_link_exists(page):
    """A link's file exists, and so does its #anchor (a heading of that file, as GitHub spells anchors)."""
    links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text())
    missing = []
    for target, anchor in links:
        if "://" in target:
            continue
        path = page.parent / target if target else page
        if not path.exists():
            missing.append(target)
        elif anchor and anchor not in anchors(path.read_text()):
            missing.append(f"{target}#{anchor}")
    assert missing == []


def anchors(text: str) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_readme_is_a_short_guide():
    text = README.read_text()
    assert len(text.encode()) <= README_MAX_BYTES
    for heading in ("Requirements", "Two commands", "Your first 10 minutes", "Command cheat-sheet",
                    "The six main settings", "Features", "Troubleshooting", "Layout", "License"):
        assert re.search(rf"^## {heading}$", text, re.M), heading
    assert len(re.findall(r"^- \*\*", section(text, "Troubleshooting"), re.M)) == 5
    assert "Assistant:" not in text  # the shipped agent is Ember


def test_the_docs_quote_no_timings_outside_the_performance_page_and_the_log():
    """Numbers a user may quote come from the generated page: guides link to it instead of giving seconds."""
    for page in PAGES:
        if page.name in ("performance.md", "LOG.md"):
            continue
        assert not re.findall(r"\b\d+(\.\d+)? ?(s|ms|tok/s|tokens/s)\b(?![\w/])", page.read_text()), rel(page)


# ------------------------------------------------------------------------------------------ the demo run


def run_fingerprint(wrapper, data_path: str, fine_tune_config: dict, system_prompt: str) -> str:
    """The fingerprint `fine_tune` would give this run (what decides that a later run reuses its adapter)."""
    from hfmodel import training
    from hfmodel.settings import FineTuneConfig

    cfg = FineTuneConfig.from_dict(fine_tune_config, wrapper.device)
    rows = training.prepare_rows(data_path, cfg, system_prompt)
    return training.fingerprint(wrapper.handle, wrapper.adapter_set, rows, cfg)


def test_demo_yaml_trains_the_same_run_as_the_script(tiny_wrapper, monkeypatch):
    """Same weights, data, eval data, LoRA and training settings, system prompt: the same fingerprint. Both are
    measured on the tiny model (the model entries are compared key by key), so no SmolLM2 is loaded."""
    import finetune
    import load_finetune_huggingface_model as script

    monkeypatch.chdir(ROOT)  # the YAML's relative paths start from the project folder
    yaml_config = finetune.load_config("configs/finetune/demo.yaml", [])
    entry = script.apply_overrides(script.model_configs[0], script.parse_args([]))
    for key in ("model_id", "local_model_path", "local_tokenizer_path", "dtype", "quantization", "device"):
        assert yaml_config["model"].get(key) == entry.get(key), key
    assert yaml_config["model"]["system_prompt"] == script.sys_prompt
    ours = run_fingerprint(tiny_wrapper, yaml_config["data_path"], yaml_config["fine_tune_config"],
                           yaml_config["model"]["system_prompt"])
    assert ours == run_fingerprint(tiny_wrapper, entry["data_path"], entry["fine_tune_config"], script.sys_prompt)
    other = copy.deepcopy(entry["fine_tune_config"])
    other["training_args"]["max_steps"] += 1
    assert ours != run_fingerprint(tiny_wrapper, entry["data_path"], other, script.sys_prompt)


# ------------------------------------------------------------------------------------------ generated performance page


def performance_page():
    spec = importlib.util.spec_from_file_location("performance_page", ROOT / "bench" / "performance_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_performance_page_is_generated_from_the_committed_results():
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    assert page == performance_page().render_page(results), "run: python bench/performance_page.py"


def test_the_performance_page_takes_a_partial_or_older_run():
    partial = {"meta": {"date": "2026-12-01"}, "sections": {"smollm2": {"startup": {"script": {}}}}}
    page = performance_page().render_page(partial)
    assert "2026-12-01" in page and "unknown" in page
    assert "Not measured in this run: chat generation, several agents" in page
    assert "## Goals" not in page  # no targets in the results: no goals table
    busy = {"meta": {"machine": {"cpu_count": 2}, "load_average_start": [3.5, 1, 1]}, "sections": {}}
    assert "shared its 2 cores" in performance_page().render_page(busy)
    busy["meta"]["load_average_start"] = [0.4, 1, 1]
    assert "shared its" not in performance_page().render_page(busy)


# ------------------------------------------------------------------------------------------ layering

# Layers from the bottom: a module may import its own layer and those below, never one above.
# chat/tools.py is plain functions that import nothing of the project, so the agent may offer them; chat/terminal.py
# (the terminal's UserAgent) imports nothing of the project either, so the prompt can show before AgentScope loads.
LAYERS = {"hfmodel": 0, "chat.tools": 0, "chat.terminal": 0, "huggingface_model": 1, "finetune_dialogagent": 2,
          "chat": 3,
          "load_finetune_huggingface_model": 4, "finetune": 4, "bench": 5, "data": 5, "tests": 5}
PROJECT = {"hfmodel", "chat", "huggingface_model", "finetune_dialogagent", "load_finetune_huggingface_model",
           "finetune", "bench", "tests", "helpers", "tiny_model"}


def layer(module: str) -> int:
    if module.startswith(("chat.tools", "chat.terminal")):
        return 0
    if module.split(".")[0] in ("helpers", "tiny_model"):
        return LAYERS["tests"]
    return LAYERS[module.split(".")[0]]


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        found |= {n for n in names if n.split(".")[0] in PROJECT}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_nothing_imports_upward():
    upward = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("hfmodel/*.py"), *ROOT.glob("chat/*.py"), *ROOT.glob("bench/*.py"),
                 *ROOT.glob("data/*.py")]:
        own = layer(module_name(path))
        upward += [f"{rel(path)} imports {m}" for m in sorted(project_imports(path)) if layer(m) > own]
    assert upward == []


def test_the_engine_and_the_tools_import_no_chat_and_no_root_module():
    for path in [*ROOT.glob("hfmodel/*.py"), ROOT / "chat" / "tools.py", ROOT / "chat" / "terminal.py"]:
        assert {m.split(".")[0] for m in project_imports(path)} <= {"hfmodel"}, rel(path)


def test_the_architecture_table_names_every_folder():
    rows = tables((ROOT / "docs" / "architecture.md").read_text())[0]
    folders = {unquote(row[0]) for row in rows}
    assert {"hfmodel/", "chat/", "bench/", "configs/", "data/", "tests/", "docs/"} <= folders
    assert any("root" in f for f in folders)


# ------------------------------------------------------------------------------------------ the installed project


def test_the_wrapper_imports_from_another_folder(tmp_path):
    """`make install` runs `pip install -e .`: an AgentScope app anywhere can import the model class."""
    code = "import huggingface_model; from huggingface_model import HuggingFaceWrapper; print(huggingface_model.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("huggingface_model.py")


def test_pyproject_dependencies_are_the_requirements_pins():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))]
    assert pyproject["project"]["dependencies"] == pins
    dev = [line.strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
           if line.strip() and not line.startswith(("#", "-"))]
    assert pyproject["project"]["optional-dependencies"]["dev"] == dev
