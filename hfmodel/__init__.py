"""The engine room behind `HuggingFaceWrapper` (huggingface_model.py): one job per module.

| module      | holds                                                                              |
|-------------|------------------------------------------------------------------------------------|
| common      | error types and logs, token/.env, safe terminal text, devices, ranks, atomic writes |
| settings    | typed fine-tune settings, defaults, validation, the one `key=value` parser         |
| loading     | where weights come from (hub, folder, adapter, bundled GGUF), loading them          |
| chat_format | the model's own chat template in chat and training: system role, end of turn, masks |
| replies     | AgentScope messages <-> template messages (tool calls), tool_choice, reading replies     |
| generation  | generation engines (encode, settings, blocking and streamed generation)             |
| adapters    | the adapter set: use/undo/serve one adapter per call, save/load, merge/export       |
| training    | the fine-tune recipe as explicit steps, run directories and their lookup            |
| preference  | the DPO / ORPO / KTO recipe on trl's trainers: reference, scoring before and after  |
| guards      | a run whose loss or weights stop being finite stops, and is recorded as failed      |
| distributed | what multi-process training needs (shared run dir, gathering shards, checksums)    |
| speedups    | every patch of trl/transformers internals, with the version and measurement        |
| memory      | GPU memory estimates for LoRA / QLoRA                                              |

Nothing here imports trl, peft or datasets at module level: the chat starts without them.
"""
