"""Run finetune.py under real torch FSDP on CPU processes (gloo), which accelerate itself never does.

    accelerate launch --config_file <FSDP config with use_cpu: true, fsdp_sync_module_states: false> \
        tests/fsdp_on_cpu.py finetune.py --config ...

accelerate 1.15 turns `distributed_type: FSDP` into FSDP only for GPU-like devices: on CPU its state
stays MULTI_CPU and the Trainer wraps the model in DDP (finetune.py then warns that nothing was
sharded). This launcher changes only that decision, when the Trainer creates its Accelerator: the state
becomes FSDP with the plugin accelerate built from the config, and the device becomes plain `cpu`
(FSDP1 rejects accelerate's `cpu:0` as device_id for parameters on `cpu`). Everything after that is the
unmodified path a GPU run takes: accelerate wraps the model with torch FSDP1/FSDP2, the weights are
sharded over the processes, and HuggingFaceWrapper gathers the adapter to save it. Tests only.
"""

from __future__ import annotations

import os
import runpy
import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _fsdp_on_cpu(self: AcceleratorState, *args: object, fsdp_plugin: object = None, **kwargs: object) -> None:
    first = not AcceleratorState._shared_state
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if first and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        self.device = PartialState._shared_state["device"] = torch.device("cpu")


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = sys.argv[1:]  # the script to run and its arguments
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        # The script has finished (and destroyed its process group). Once in a full test run, a finished rank then
        # aborted in the interpreter's teardown ("terminate called without an active exception", exit -6; the FSDP
        # teardown abort of pytorch#90549): leave without it, with the script's own exit status.
        code = 0 if done.code is None else done.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
