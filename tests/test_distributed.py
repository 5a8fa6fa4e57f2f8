"""Multi-process fine-tuning on CPU: `accelerate launch` (configs/accelerate/cpu_2proc.yaml) and `torchrun`.

Both 2-process runs (per-device batch 4) must end with the same LoRA weights as a single-process run
with batch 8: same seed, same data order, same global batches, DDP averaging the gradients. FSDP full
sharding (versions 1 and 2, the shipped fsdp_lora.yaml made CPU-ready) must shard the LoRA weights and
still save the whole adapter, equal to the same single-process run; so must LoRA+ runs under DDP, FSDP1 and
FSDP2. Also: the shipped accelerate configs parse, and finetune.py rejects bad input with one line and exit
status 2. Runs the real launchers in subprocesses (~3-4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "finetune.py"
FSDP_ON_CPU = Path(__file__).resolve().parent / "fsdp_on_cpu.py"  # accelerate never picks FSDP on CPU by itself
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED_CONFIGS = {"single_gpu", "multi_gpu_ddp", "fsdp_lora", "deepspeed_zero2", "deepspeed_zero3", "multi_node",
                    "cpu_2proc"}
STEPS = 10
# Max |w_2proc - w_1proc| over all LoRA tensors. Both runs compute the same fp32 math; only the summation
# order differs (two half-batch losses all-reduced vs one batch, 1 vs 2 threads), ~1e-7 relative per
# step. Measured: 1.0e-6 after 10 steps, weights up to ~0.16 (3.4e-6 when attention ran as one masked
# square per packed row). A run whose ranks do NOT share gradients, or that sees different batches, is off
# by ~1e-2 after one step at lr 1e-2 (measured 0.09 for unsynchronised ranks), so 1e-4 separates "same
# training" from "different training" by ~100x.
TOLERANCE = 1e-4
TIMEOUT = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def _accelerate() -> list[str]:
    script = Path(sys.executable).with_name("accelerate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def _ddp() -> list[str]:
    """finetune.py under `accelerate launch` with 2 CPU processes (torch DDP over gloo)."""
    return [*_accelerate(), "launch", "--config_file", str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), str(FINETUNE)]


def _fsdp(tmp: Path, version: int) -> list[str]:
    """finetune.py under FSDP full sharding (version 1 or 2) on 2 CPU processes, its config written into `tmp`."""
    (tmp / f"fsdp{version}.yaml").write_text(_cpu_fsdp_config(version))
    return [*_accelerate(), "launch", "--config_file", f"fsdp{version}.yaml", str(FSDP_ON_CPU), str(FINETUNE)]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows() -> tuple[list[dict], list[dict]]:
    def row(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    train = [row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(32)]
    train += [row("Who are you?", "I am Ember, a friendly assistant.") for _ in range(8)]
    evals = [row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(40, 48)]
    return train, evals


def _config(output_dir: str, batch: int) -> str:
    return f"""\
model:
  config_name: tiny
  local_model_path: tiny
  device: cpu
  system_prompt: You are Ember.
data_path: train.jsonl
fine_tune_config:
  eval_data_path: eval.jsonl
  lora_config: {{r: 8, lora_alpha: 16}}
  training_args:
    max_steps: {STEPS}
    learning_rate: 1e-2
    per_device_train_batch_size: {batch}
    save_strategy: "no"
    ddp_find_unused_parameters: false
    bf16: false   # fp32: bf16 autocast rounds the half-batch sums differently (measured 1.9e-2 apart)
    seed: 1
    output_dir: {output_dir}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The tiny model + data in a tmp folder, trained three ways: accelerate 2 procs, torchrun 2 procs, 1 proc."""
    from tiny_model import build_tiny_model

    tmp = tmp_path_factory.mktemp("distributed")
    build_tiny_model(tmp / "tiny")
    train, evals = _rows()
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (tmp / "multi.yaml").write_text(_config("runs_multi", batch=4))
    (tmp / "single.yaml").write_text(_config("runs_single", batch=8))
    out = {"tmp": tmp}
    out["multi"] = _run([*_ddp(), "--config", "multi.yaml"], tmp)
    out["torchrun"] = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(_free_port()), str(FINETUNE), "--config", "multi.yaml",
                            "--set", "training_args.output_dir=runs_torchrun"], tmp)
    out["single"] = _run([sys.executable, str(FINETUNE), "--config", "single.yaml"], tmp)
    return out


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"


def _only_run_dir(base: Path) -> Path:
    dirs = [p for p in base.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected exactly one run directory in {base}, found {sorted(p.name for p in dirs)}"
    return dirs[0]


def _log(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "log_history.json").read_text())


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["multi", "torchrun"])
def test_two_processes_both_train_in_sync(runs, launcher):
    result = runs[launcher]
    _ok(result)
    ranks = re.findall(r"^\[rank (\d)/2\] MULTI_CPU \(gloo\) on cpu\S*: (\d+) optimizer steps on this rank; "
                       r"LoRA sha256 (\w+)", result.stdout, re.M)
    # Each process prints its own line after training: both ran every optimizer step, and DDP kept
    # their LoRA weights identical (different checksums = ranks trained alone).
    assert sorted(r[0] for r in ranks) == ["0", "1"], result.stdout
    assert all(int(r[1]) == STEPS for r in ranks), ranks
    assert len({r[2] for r in ranks}) == 1, f"ranks ended with different weights: {ranks}"
    assert "global batch 8 = 4 per device x 1 accumulation x 2" in result.stdout
    assert result.stdout.count("Run directory:") == 1  # the summary comes from the main process only


@pytest.mark.slow
def test_one_run_directory_one_adapter(runs):
    _ok(runs["multi"])
    base = runs["tmp"] / "runs_multi"
    run_dir = _only_run_dir(base)
    weights = sorted(glob.glob(str(base / "**" / "adapter_model.safetensors"), recursive=True))
    assert weights == [str(run_dir / "adapter" / "adapter_model.safetensors")]
    assert not list(base.glob("**/*.tmp"))  # atomic writes finished, nothing half-written
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == STEPS
    assert f"Run directory: runs_multi/{run_dir.name}" in runs["multi"].stdout


@pytest.mark.slow
def test_loss_decreases(runs):
    _ok(runs["multi"])
    log = _log(_only_run_dir(runs["tmp"] / "runs_multi"))
    losses = [e["loss"] for e in log if "loss" in e]
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(losses) == STEPS
    assert losses[-1] < 0.5 * losses[0], losses
    assert evals[-1] < evals[0], evals


@pytest.mark.slow
def test_same_global_batches_as_single_process(runs):
    """trl logs the running count of trained tokens: equal at every step = the same global batches."""
    _ok(runs["multi"])
    _ok(runs["single"])
    multi = [(e["step"], e["num_tokens"]) for e in _log(_only_run_dir(runs["tmp"] / "runs_multi")) if "loss" in e]
    single = [(e["step"], e["num_tokens"]) for e in _log(_only_run_dir(runs["tmp"] / "runs_single")) if "loss" in e]
    assert multi == single and len(multi) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("launcher,folder", [("multi", "runs_multi"), ("torchrun", "runs_torchrun")])
def test_adapter_matches_single_process(runs, launcher, folder):
    _ok(runs[launcher])
    _ok(runs["single"])
    _assert_same_training(_only_run_dir(runs["tmp"] / folder), _only_run_dir(runs["tmp"] / "runs_single"), launcher)


def _assert_same_training(run_dir: Path, single_dir: Path, label: str) -> None:
    """The 2-process run's adapter and losses equal the single-process run's (same tensors, within TOLERANCE)."""
    two, one = _adapter(run_dir), _adapter(single_dir)
    assert sorted(two) == sorted(one)
    assert all(two[k].shape == one[k].shape for k in one)
    diff = _max_abs_diff(two, one)
    scale = max(float(t.abs().max()) for t in one.values())
    print(f"\n{label}: max |LoRA(2 procs) - LoRA(1 proc)| = {diff:.3e} over {len(one)} tensors "
          f"(largest weight {scale:.3f}); tolerance {TOLERANCE:g}")
    assert diff < TOLERANCE
    losses_two = [e["loss"] for e in _log(run_dir) if "loss" in e]
    losses_one = [e["loss"] for e in _log(single_dir) if "loss" in e]
    assert losses_two == pytest.approx(losses_one, abs=1e-4)


# ---------------------------------------------------------------------------------------------- FSDP


def _cpu_fsdp_config(version: int, sync_module_states: bool = False) -> str:
    """configs/accelerate/fsdp_lora.yaml with only what CPU processes need changed."""
    import yaml

    config = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp_lora.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no")
    fsdp = config["fsdp_config"]
    fsdp["fsdp_version"] = version
    # accelerate builds the sync's param_init_fn for GPU-like devices only; every rank loads the same
    # weights from disk and seeds the LoRA init the same, so nothing needs broadcasting here.
    fsdp["fsdp_sync_module_states"] = sync_module_states
    if version == 2:
        fsdp["fsdp_reshard_after_forward"] = True  # FSDP2's spelling of FULL_SHARD
    return yaml.safe_dump(config)


@pytest.fixture(scope="module", params=[1, 2], ids=["fsdp1", "fsdp2"])
def fsdp(request, runs) -> dict:
    """The 2-process run of `runs`, under FSDP full sharding (torch FSDP1 / FSDP2 over gloo)."""
    tmp, version = runs["tmp"], request.param
    folder = f"runs_fsdp{version}"
    result = _run([*_fsdp(tmp, version), "--config", "multi.yaml", "--set", f"training_args.output_dir={folder}"], tmp)
    return {"result": result, "base": tmp / folder, "folder": folder, "version": version}


@pytest.mark.slow
def test_fsdp_shards_the_lora_weights(fsdp):
    result = fsdp["result"]
    _ok(result)
    ranks = re.findall(r"^\[rank (\d)/2\] FSDP \(gloo\) on cpu: (\d+) optimizer steps on this rank; "
                       r"LoRA sharded \(FSDP\): this rank holds ([\d,]+) of ([\d,]+) values", result.stdout, re.M)
    assert sorted(r[0] for r in ranks) == ["0", "1"], result.stdout
    assert all(int(r[1]) == STEPS for r in ranks), ranks
    held = [int(r[2].replace(",", "")) for r in ranks]
    total = int(ranks[0][3].replace(",", ""))
    # Each rank holds a part of every LoRA matrix after training, together all of it: really sharded.
    assert sum(held) == total and max(held) < total, ranks
    assert "accelerate ran" not in result.stderr  # no "FSDP requested but not used" warning


@pytest.mark.slow
def test_fsdp_one_run_directory_one_adapter_loss_decreases(fsdp):
    _ok(fsdp["result"])
    run_dir = _only_run_dir(fsdp["base"])
    weights = sorted(glob.glob(str(fsdp["base"] / "**" / "adapter_model.safetensors"), recursive=True))
    assert weights == [str(run_dir / "adapter" / "adapter_model.safetensors")]
    assert not list(fsdp["base"].glob("**/*.tmp"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == STEPS
    assert fsdp["result"].stdout.count("Run directory:") == 1
    log = _log(run_dir)
    losses = [e["loss"] for e in log if "loss" in e]
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(losses) == STEPS and losses[-1] < 0.5 * losses[0], losses
    assert evals[-1] < evals[0], evals


@pytest.mark.slow
def test_fsdp_adapter_matches_single_process(fsdp, runs):
    """The gathered adapter is the whole adapter: every tensor, equal to one process with the same global batch.

    Same math as the DDP runs (FSDP reduce-scatters the same averaged gradients), so the same TOLERANCE:
    measured 1.0e-6 for FSDP1 and FSDP2. An adapter saved from rank 0's shard would miss half of
    every matrix (or, with peft's names under FSDP1, every tensor).
    """
    _ok(fsdp["result"])
    _ok(runs["single"])
    run_dir, single_dir = _only_run_dir(fsdp["base"]), _only_run_dir(runs["tmp"] / "runs_single")
    _assert_same_training(run_dir, single_dir, f"FSDP{fsdp['version']} (sharded)")

    def config(folder: Path) -> dict:
        data = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        return {**data, "target_modules": sorted(data["target_modules"])}

    assert config(run_dir) == config(single_dir)  # same base model path, rank, targets: loads the same way


@pytest.mark.slow
def test_fsdp_adapter_loads_in_the_chat(fsdp, runs, monkeypatch):
    from helpers import chat, make_wrapper
    from peft import get_peft_model_state_dict

    _ok(fsdp["result"])
    monkeypatch.chdir(runs["tmp"])  # the adapter names its base as the run did: the relative folder `tiny`
    adapter = _only_run_dir(fsdp["base"]) / "adapter"
    wrapper = make_wrapper(adapter, do_sample=False)
    assert wrapper.source.adapter == str(adapter) and wrapper.active_adapter
    loaded = get_peft_model_state_dict(wrapper.hf_model, adapter_name=wrapper.active_adapter)
    assert _max_abs_diff(loaded, _adapter(adapter.parent)) == 0.0
    tuned = wrapper.generate(chat("What is 3 plus 3?"))
    with wrapper.adapter_disabled():
        base = wrapper.generate(chat("What is 3 plus 3?"))
    assert tuned != base and tuned.startswith("It is"), (tuned, base)


@pytest.mark.slow
def test_fsdp_config_on_cpu_without_gpu_says_what_ran(runs):
    """Plain `accelerate launch` of an FSDP config on CPU trains data-parallel; finetune.py says so on stderr."""
    tmp = runs["tmp"]
    (tmp / "fsdp_plain.yaml").write_text(_cpu_fsdp_config(1))
    result = _run([*_accelerate(), "launch", "--config_file", "fsdp_plain.yaml", str(FINETUNE), "--config",
                   "multi.yaml", "--set", "training_args.output_dir=runs_fsdp_plain", "--set",
                   "training_args.max_steps=2"], tmp)
    _ok(result)
    assert re.search(r"^\[rank 0/2\] MULTI_CPU \(gloo\).*LoRA sha256", result.stdout, re.M), result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "asks for FSDP but accelerate ran MULTI_CPU" in warnings[0], result.stderr


@pytest.mark.slow
def test_shipped_fsdp_config_on_cpu_fails_in_one_line(runs):
    """fsdp_lora.yaml (sync_module_states) cannot run without GPUs: one clear line before loading anything."""
    result = _run([*_accelerate(), "launch", "--config_file", str(ACCELERATE_CONFIGS / "fsdp_lora.yaml"),
                   str(FINETUNE), "--config", "multi.yaml", "--set", "training_args.output_dir=runs_fsdp_gpu"],
                  runs["tmp"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "needs GPUs" in errors[0] and "cpu_2proc.yaml" in errors[0], result.stderr
    assert "[rank0]" not in result.stderr  # no traceback from inside the processes (the launcher adds its own)
    assert not (runs["tmp"] / "runs_fsdp_gpu").exists()


def test_after_sharded_training_the_wrapper_refuses_to_run_the_shards(tiny_wrapper, tmp_path):
    """After FSDP / ZeRO-3 training (`_train` sets `sharded_by`) only the saved adapter is usable: say so."""
    from helpers import chat

    from huggingface_model import FineTuneError

    tiny_wrapper.sharded_by = "FSDP"
    for action in (lambda: tiny_wrapper.generate(chat()), lambda: tiny_wrapper.fine_tune("x.jsonl", {}),
                   lambda: tiny_wrapper.export_merged(tmp_path / "merged")):
        with pytest.raises(FineTuneError, match="holds only a shard of the weights.*--local-model-path"):
            action()


# ------------------------------------------------------------------------------------------- configs


def test_shipped_accelerate_configs_parse():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    files = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} >= EXPECTED_CONFIGS
    launch_args = {action.dest for action in launch_command_parser()._actions}
    for file in files:
        text = file.read_text()
        raw = yaml.safe_load(text)
        assert isinstance(raw, dict), file
        assert raw["distributed_type"] in {t.value for t in DistributedType}, file
        parsed = load_config_from_file(str(file))  # accelerate's own loader: rejects unknown top-level keys
        assert parsed.distributed_type == DistributedType(raw["distributed_type"])
        assert parsed.num_processes >= 1
        for section in ("fsdp_config", "deepspeed_config"):  # nested keys become `accelerate launch` flags
            unknown = [k for k in raw.get(section) or {} if k not in launch_args]
            assert not unknown, f"{file.name}: {section} keys accelerate does not know: {unknown}"
        header = text.split("\ncompute_environment")[0]
        assert f"accelerate launch --config_file configs/accelerate/{file.name}" in header, file.name
    cpu = yaml.safe_load((ACCELERATE_CONFIGS / "cpu_2proc.yaml").read_text())
    assert cpu["use_cpu"] is True and cpu["num_processes"] == 2
    fsdp = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp_lora.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_reshard_after_forward"] == "FULL_SHARD"
    for name, stage in (("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
        assert yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())["deepspeed_config"]["zero_stage"] == stage
    node = yaml.safe_load((ACCELERATE_CONFIGS / "multi_node.yaml").read_text())
    assert node["num_machines"] > 1 and node["main_process_ip"] and node["main_process_port"]
    for var in ("MASTER_ADDR", "MASTER_PORT", "MACHINE_RANK"):
        assert var in (ACCELERATE_CONFIGS / "multi_node.yaml").read_text()


def test_shipped_finetune_configs_load(monkeypatch):
    monkeypatch.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import finetune

    for file in sorted((ROOT / "configs" / "finetune").glob("*.yaml")):
        config = finetune.load_config(str(file.relative_to(ROOT)), [])
        assert config["data_path"] and config["model"]


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name,text,expect", [
    ("missing", None, "config file not found"),
    ("bad_yaml", "model: [1\n", "invalid YAML at line"),
    ("unknown_top", "model: {local_model_path: tiny}\ndata_path: train.jsonl\nfine_tune_cfg: {}\n",
     "did you mean 'fine_tune_config'"),
    ("missing_data", "model: {local_model_path: tiny}\ndata_path: nowhere.jsonl\n", "data file not found"),
    ("unknown_arg", "model: {local_model_path: tiny}\ndata_path: train.jsonl\n"
                    "fine_tune_config: {training_args: {max_step: 3}}\n", "did you mean 'max_steps'"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, name, text, expect):
    (tmp_path / "tiny").mkdir()  # exists: errors must come from the named problem, not the model folder
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                          '{"role": "assistant", "content": "hello"}]}\n')
    if text is not None:
        (tmp_path / f"{name}.yaml").write_text(text)
    result = _run([sys.executable, str(FINETUNE), "--config", f"{name}.yaml"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expect in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_dpo_under_accelerate_trains_both_ranks_in_sync(runs):
    """`finetune.py` with method=dpo under `accelerate launch` (2 CPU processes): both ranks take every step and end
    with the same LoRA weights; one run directory; the summary reports the held-out preference accuracy."""
    tmp = runs["tmp"]
    pairs = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"No idea, maybe {i}."}
             for i in range(32)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    config = _config("runs_dpo", batch=2).replace("data_path: train.jsonl", "data_path: pairs.jsonl").replace(
        "  eval_data_path: eval.jsonl\n", "  method: dpo\n  eval_fraction: 0.25\n")
    (tmp / "dpo.yaml").write_text(config)
    result = _run([*_ddp(), "--config", "dpo.yaml"], tmp)
    _ok(result)
    ranks = re.findall(r"^\[rank (\d)/2\] MULTI_CPU \(gloo\) on cpu\S*: (\d+) optimizer steps on this rank; "
                       r"LoRA sha256 (\w+)", result.stdout, re.M)
    assert sorted(r[0] for r in ranks) == ["0", "1"] and all(int(r[1]) == STEPS for r in ranks), result.stdout
    assert len({r[2] for r in ranks}) == 1, f"ranks ended with different weights: {ranks}"
    run_dir = _only_run_dir(tmp / "runs_dpo")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert re.search(r"Preference \(dpo\): accuracy [\d.]+, margin [+-][\d.]+ -> accuracy [\d.]+", result.stdout)


# ------------------------------------------------------------------------------------------- LoRA+


@pytest.fixture(scope="module")
def loraplus(runs) -> dict:
    """The runs of `runs` with LoRA+ (B matrices at 8x the learning rate): one process, accelerate's DDP, FSDP1 and
    FSDP2 (the optimizer is built after the launcher wrapped the model; FSDP1 has flattened the LoRA matrices)."""
    tmp = runs["tmp"]
    lora_plus = ["--set", "lora.loraplus_lr_ratio=8"]
    commands = {"single": [sys.executable, str(FINETUNE)], "ddp": _ddp(), "fsdp1": _fsdp(tmp, 1), "fsdp2": _fsdp(tmp, 2)}
    out = {}
    for name, command in commands.items():
        config = "single.yaml" if name == "single" else "multi.yaml"
        result = _run([*command, "--config", config, *lora_plus, "--set", f"training_args.output_dir=runs_lp_{name}"],
                      tmp)
        _ok(result)
        out[name] = _only_run_dir(tmp / f"runs_lp_{name}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "fsdp1", "fsdp2"])
def test_loraplus_under_launchers_matches_single_process(loraplus, runs, launcher):
    """LoRA+ trains the same under every launcher as in one process (peft alone gave FSDP1's flattened A matrices
    the B rate: 0.41 apart), and differently from plain LoRA (so the ratio is in effect)."""
    _assert_same_training(loraplus[launcher], loraplus["single"], f"LoRA+ {launcher}")
    _ok(runs["single"])
    plain = _adapter(_only_run_dir(runs["tmp"] / "runs_single"))
    assert _max_abs_diff(_adapter(loraplus[launcher]), plain) > 1e-2
