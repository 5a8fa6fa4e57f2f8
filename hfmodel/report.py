"""The before/after report written after every fine-tune: eval loss and perplexity, probe answers, speed."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmodel.common import write_text_atomic
from hfmodel.training import FineTuneResult


@dataclass
class Probe:
    prompt: str
    before: str
    after: str


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


def pick_probes(result: FineTuneResult, configured: list[str] | None, n: int = 4) -> list[str]:
    """Configured probes, else the first user turns of the held-out rows."""
    if configured:
        return configured[: max(n, 5)]
    prompts = []
    for row in result.eval_rows:
        user = next((m["content"] for m in row if m["role"] == "user"), None)
        if user and user not in prompts:
            prompts.append(user)
    return prompts[:n]


def run_probes(prompts: list[str], answer: Callable[[list[str], list[str | None]], list[str]], before: str | None,
               after: str | None) -> list[Probe]:
    """Each prompt answered with adapter `before` and with `after` (None = the base): `answer(prompts, adapters)`
    answers prompt i with adapters[i], so both sides run as one batch."""
    if not prompts:
        return []
    answers = answer([*prompts, *prompts], [before] * len(prompts) + [after] * len(prompts))
    return [Probe(p, b, a) for p, b, a in zip(prompts, answers[:len(prompts)], answers[len(prompts):], strict=True)]


def loss_curves(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_losses(log_history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Train and eval loss against optimiser step, as a PNG."""
    train, evals = loss_curves(log_history)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = reward_curves(log_history)  # preference runs (DPO, ORPO, KTO): the implicit rewards too
    fig, axes = plt.subplots(2 if rewards else 1, 1, figsize=(7, 7 if rewards else 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#d9480f", linewidth=1.8)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss (held out)", color="#1971c2", marker="o", linewidth=1.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("preference loss" if rewards else "cross-entropy loss (assistant tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        plot_rewards(axes[1][0], rewards)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


REWARDS = {"rewards/chosen": ("chosen", "#2f9e44"), "rewards/rejected": ("rejected", "#e03131"),
           "rewards/margins": ("margin (chosen - rejected)", "#1971c2")}


def reward_curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """trl's logged implicit rewards per training step (eval entries are prefixed and left out)."""
    curves = {key: [(int(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e]
              for key in REWARDS}
    return {key: points for key, points in curves.items() if points}


def plot_rewards(ax: Any, curves: dict[str, list[tuple[int, float]]]) -> None:
    for key, points in curves.items():
        label, color = REWARDS[key]
        ax.plot(*zip(*points, strict=True), label=label, color=color, linewidth=1.6)
    ax.axhline(0.0, color="#868e96", linewidth=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("implicit reward (train batches)")
    ax.grid(alpha=0.3)
    ax.legend()


def preference_rows(result: Any) -> list[tuple[str, str, str]]:
    """The rows of a preference run (DPO, ORPO, KTO): how strongly the model prefers the chosen answers."""
    before, after = result.before, result.after
    scores = before or after
    rows = [("method", "", str(result.method).upper())]
    if scores is not None and scores.accuracy is not None:
        rows.append((f"preference accuracy ({scores.count} {result.scored_on})",
                     _fmt(before.accuracy if before else None, 2), _fmt(after.accuracy if after else None, 2)))
    if scores is not None:
        what = "chosen - rejected" if scores.accuracy is not None else "good - bad answers"
        rows.append((f"mean log-prob margin, {what} (nats)", _fmt(before.margin if before else None, 2, "+"),
                     _fmt(after.margin if after else None, 2, "+")))
    margins = [e["rewards/margins"] for e in result.log_history if "rewards/margins" in e]
    if margins:
        rows.append(("reward margin (last train step)", "", _fmt(margins[-1], 3, "+")))
    rows += [
        ("train loss (mean)", "", _fmt(result.train_loss)),
        ("steps", "", str(result.steps)),
        ("training time", "", f"{result.seconds:.1f} s"),
        ("tokens/s (trained)", "", f"{result.tokens_per_second:.0f}" if result.train_tokens else "-"),
        ("trainable params", "", f"{result.trainable_params:,}"),
    ]
    return rows


def _fmt(x: float | None, digits: int = 3, sign: str = "") -> str:
    return "-" if x is None else f"{x:{sign}.{digits}f}"


def summary_rows(result: FineTuneResult) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows for the terminal table and report.md."""
    if getattr(result, "method", "sft") != "sft":
        return preference_rows(result)

    def fmt(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    return [
        ("eval loss", fmt(result.eval_loss_before), fmt(result.eval_loss_after)),
        ("eval perplexity", fmt(perplexity(result.eval_loss_before), 2), fmt(perplexity(result.eval_loss_after), 2)),
        ("train loss (mean)", "", fmt(result.train_loss)),
        ("steps", "", str(result.steps)),
        ("training time", "", f"{result.seconds:.1f} s"),
        ("tokens/s (trained)", "", f"{result.tokens_per_second:.0f}"),
        ("trainable params", "", f"{result.trainable_params:,}"),
    ]


def write_report(result: FineTuneResult, probes: list[Probe], before_label: str, after_label: str) -> Path:
    """report.md + loss.png in the run directory (each written to a unique temporary name, then renamed)."""
    run_dir = result.run_dir
    plot = plot_losses(result.log_history, run_dir / "loss.png", f"{run_dir.name}: loss")
    lines = [
        f"# Fine-tune report: {run_dir.name}",
        "",
        f"Adapter `{result.adapter_name}` ({result.adapter_dir}); compared with `{before_label}`.",
        "",
        f"| metric | before ({before_label}) | after ({after_label}) |",
        "|---|---|---|",
        *[f"| {m} | {b} | {a} |" for m, b, a in summary_rows(result)],
        "",
    ]
    if probes:
        lines += ["## Probes (same prompt, same generation settings and seed)", ""]
        for p in probes:
            lines += [f"**{p.prompt}**", "", f"- before: {_one_line(p.before)}", f"- after: {_one_line(p.after)}", ""]
    if plot:
        lines += ["![loss](loss.png)", ""]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines))


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(empty)"
