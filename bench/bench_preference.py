"""Preference training on SmolLM2: demo accuracy before/after, and a DPO step against an SFT step of the same batch.

    python bench/bench_preference.py                  # DPO + both SFT baselines, SmolLM2 (about 10 min on 2 cores)
    python bench/bench_preference.py --runs dpo       # one run: dpo, orpo, kto, sft_pairs or sft_chosen
    python bench/bench_preference.py --max-steps 2    # a quick smoke run

Each run is its own process (so its peak RSS is its own) on the demo set `data/style_pairs_*.jsonl`:
- dpo / orpo / kto: the method's defaults; held-out accuracy and margin before and after (hfmodel/preference.py).
- sft_pairs: SFT on the same sequences DPO sees, both answers of every pair as rows, 8 rows per step = the
  4 pairs of a DPO step (same tokens per step).
- sft_chosen: SFT on the chosen answers only, 4 rows per step (the same prompts per step).
Step time = median wall time between optimiser steps (the first step left out). Results go to
`bench/preference_results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRAIN, EVAL = ROOT / "data" / "style_pairs_train.jsonl", ROOT / "data" / "style_pairs_eval.jsonl"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RUNS = ("dpo", "sft_pairs", "sft_chosen")
OUT = ROOT / "bench" / "preference_results.json"


def sft_rows(which: str) -> list[dict[str, str]]:
    pairs = [json.loads(line) for line in TRAIN.read_text().splitlines() if line.strip()]
    answers = ("chosen", "rejected") if which == "sft_pairs" else ("chosen",)
    return [{"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in answers]


def child(run: str, max_steps: int | None, out_dir: str) -> dict[str, Any]:
    """One run in this process (called in a fresh interpreter by `main`)."""
    sys.path.insert(0, str(ROOT))
    from huggingface_model import HuggingFaceWrapper

    model = HuggingFaceWrapper(config_name="bench", model_id=MODEL_ID)
    stamps: list[float] = []

    def progress(event: dict[str, Any]) -> None:
        if set(event) == {"step", "max_steps"}:  # one optimiser step ended
            stamps.append(time.perf_counter())

    args: dict[str, Any] = {"output_dir": out_dir, "save_strategy": "no"}
    if max_steps:
        args["max_steps"] = max_steps
    if run.startswith("sft"):
        data = Path(out_dir) / f"{run}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(run)))
        args.update(per_device_train_batch_size=8 if run == "sft_pairs" else 4, eval_strategy="no")
        config: dict[str, Any] = {"eval_fraction": 0.0, "training_args": args}
    else:
        data = TRAIN
        config = {"method": run, "eval_data_path": str(EVAL), "training_args": args}
    result = model.fine_tune(str(data), config, progress=progress)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    out: dict[str, Any] = {
        "run": run, "steps": result.steps, "train_seconds": round(result.seconds, 1),
        "step_seconds_median": round(statistics.median(steps), 3) if steps else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    before, after = getattr(result, "before", None), getattr(result, "after", None)
    if before is not None and after is not None:
        out.update(accuracy_before=before.accuracy, accuracy_after=after.accuracy,
                   margin_before=round(before.margin, 2), margin_after=round(after.margin, 2), pairs=after.count)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of dpo, orpo, kto, sft_pairs, sft_chosen "
                        f"(default {','.join(RUNS)})")
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps (default: 3 epochs)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.max_steps, args.child_dir)))
        return 0
    results = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for run in args.runs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, "--child", run, "--child-dir", tmp]
            if args.max_steps:
                command += ["--max-steps", str(args.max_steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        if done.returncode != 0:
            print(f"{run} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by_run = {r["run"]: r for r in results}
    if "dpo" in by_run:
        for baseline in ("sft_pairs", "sft_chosen"):
            if baseline in by_run and by_run[baseline]["step_seconds_median"]:
                dpo, base = by_run["dpo"], by_run[baseline]
                print(f"dpo vs {baseline}: step {dpo['step_seconds_median'] / base['step_seconds_median']:.2f}x, "
                      f"peak RSS {dpo['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
    args.out.write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
