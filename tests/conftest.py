"""Shared fixtures: a tiny offline model (built once per session) and fresh wrappers around it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Offline before anything imports huggingface_hub / datasets (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402
from helpers import fast_config, identity_rows, make_wrapper, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs (modules that train the tiny model use it through
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a shared 2-core machine, two OpenMP threads
    competing with other jobs make a 12-step tiny fine-tune take 10-30 s instead of ~1 s. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    """Keep the whole session offline (a missing hub id must fail fast, not retry for ~50 s)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tokenizer + randomly initialised 2-layer Llama, written once per session."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny_wrapper(tiny_model_dir):
    """A fresh wrapper around the tiny model (random weights, nothing fine-tuned)."""
    return make_wrapper(tiny_model_dir)


@pytest.fixture(scope="session")
def taught_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An adapter folder that taught the tiny model to answer TAUGHT_QUESTION with TAUGHT_ANSWER."""
    tmp = tmp_path_factory.mktemp("taught")
    data = write_jsonl(tmp / "identity.jsonl", identity_rows())
    wrapper = make_wrapper(tiny_model_dir)
    result = wrapper.fine_tune(str(data), fast_config(tmp))
    return result.adapter_dir


@pytest.fixture
def taught_wrapper(taught_adapter):
    """A fresh wrapper loaded from the taught adapter folder (its base, the tiny model, loads too)."""
    return make_wrapper(taught_adapter, do_sample=False)


@pytest.fixture
def script():
    """The chat script's module; its `model_configs` restored after the test (tests edit it in place)."""
    import copy
    import importlib

    module = importlib.import_module("load_finetune_huggingface_model")
    saved = copy.deepcopy(module.model_configs)
    yield module
    module.model_configs[:] = saved
