"""`/practice`: the agent improves from verified outcomes (RFT or GRPO, see hfmodel/practice.py), with a progress bar
for sampling and training and the before/after report.

`PracticeCommands` is a part of `ChatSession` (chat/commands.py), like `TeachingCommands`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from rich.table import Table

from chat.teaching import CommandError, Taught, cell, plain
from hfmodel import practice
from hfmodel.common import check_writable_folder
from hfmodel.preference_data import Marked

if TYPE_CHECKING:
    from rich.console import Console

    from finetune_dialogagent import Finetune_DialogAgent

USAGE = ("Usage: /practice <tasks file> [k=4 rounds=1 method=rft|grpo keep=2 key=value ...], or /practice session "
         "(this session's taught answers and replies marked /good).")


class PracticeCommands:
    """`/practice` (mixed into `ChatSession`, which provides what is declared here)."""

    assistant: Finetune_DialogAgent
    base_config: dict[str, Any]
    taught: list[Taught]
    marks: list[Marked]
    console: Console

    if TYPE_CHECKING:
        def print(self, *renderables: Any) -> None: ...

    def cmd_practice(self, args: list[str]) -> None:
        if not args or "=" in args[0]:
            raise CommandError(USAGE)
        source, pairs = args[0], args[1:]
        settings, config = practice.parse_practice_args(pairs, self.base_config.get("fine_tune_config"))
        runs = (config.get("training_args") or {}).get("output_dir") or "runs"
        if isinstance(runs, str):
            check_writable_folder(runs, "training_args.output_dir")
        tasks: str | list[practice.Task] = self._session_tasks() if source.lower() == "session" else source
        result = self._practice_with_progress(tasks, settings, config)
        self._practice_report(result)

    def _session_tasks(self) -> list[practice.Task]:
        taught = [(t.prompt, t.steps[-1]["content"] if t.steps else t.answer) for t in self.taught if t.call is None]
        good = [(m.prompt, m.completion) for m in self.marks if m.label]
        tasks = practice.session_tasks(taught, good)
        if not tasks:
            raise CommandError("Nothing to practise from this session yet: /teach an answer or mark a reply /good "
                               "first (each becomes a question with a known right answer).")
        self.print(f"Practising {len(tasks)} question(s) of this session (taught answers and /good replies).")
        return tasks

    def _practice_with_progress(self, tasks: str | list[practice.Task], settings: practice.PracticeSettings,
                                config: dict[str, Any]) -> practice.PracticeResult:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        stop = threading.Event()
        with Progress(TextColumn("{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self.console,
                      transient=True) as bar:
            task = bar.add_task("practice", total=None, stage="starting", detail="")

            def report(info: dict[str, Any]) -> None:
                stage = str(info.get("stage", ""))
                if "tasks" in info:  # sampling: tasks done (all k attempts), attempts accepted so far
                    bar.update(task, completed=info["tasks_done"], total=info["tasks"], stage=stage,
                               detail=f"accepted {info['accepted']}/{info['attempts']}")
                else:
                    fields: dict[str, Any] = {"detail": f"loss {info['loss']:.3f}"} if "loss" in info else {}
                    bar.update(task, completed=info.get("step", 0), total=info.get("max_steps") or None,
                               stage=stage, **fields)

            return self.assistant.practice(tasks, settings, config, progress=report, stop=stop)

    def _practice_report(self, result: practice.PracticeResult) -> None:
        before, after = result.before_adapter or "base", result.adapter or "base"
        self.print(f"Tasks: {plain(result.tasks.describe())}; {len(result.held_out)} held out for the report.")
        table = Table(title=cell(f"Practice report ({result.run_dir})"))
        table.add_column("metric")
        table.add_column(cell(f"before ({before})"), justify="right")
        table.add_column(cell(f"after ({after})"), justify="right")
        for row in practice.summary_rows(result):
            table.add_row(*(cell(x) for x in row))
        self.print(table)
        side = practice.probes(result)
        if side:
            probes = Table(title="Probes (greedy)", show_lines=True)
            for name in ("prompt", before, after):
                probes.add_column(cell(name))
            for prompt, b, a in side:
                probes.add_row(cell(prompt), cell(b), cell(a))
            self.print(probes)
        self.print(f"Report: {plain(str(result.run_dir / 'report.md'))} (+ loss.png, rollouts.jsonl)")
        if result.adapter != result.before_adapter:
            self.print(f"Now serving adapter [bold]{plain(str(result.adapter))}[/]. The conversation is kept.")
        else:
            self.print("No attempt was accepted, so nothing was trained; the adapter is unchanged.")
