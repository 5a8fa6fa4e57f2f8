"""The adapter set of one loaded model: LoRA adapters made or loaded in this session, which one serves,
undo, one adapter for one call, saving, loading, and merging into a standalone model (checked)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfmodel.common import (
    FineTuneConfigError,
    FineTuneError,
    ModelLoadError,
    atomic_folder,
    fsdp_requested,
    is_main_process,
    is_peft_model,
    logger,
)
from hfmodel.loading import ModelHandle


@dataclass
class AdapterRecord:
    """One adapter made or loaded in this session."""

    name: str
    path: Path
    parent: str | None
    note: str


class AdapterSet:
    """Adapters on top of the handle's base model (peft multi-adapter: switching is instant, nothing reloads)."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.records: dict[str, AdapterRecord] = {}
        self.active: str | None = None
        self.stack: list[str | None] = []  # previously active adapters, for undo

    def reset(self) -> None:
        """A new base model: none of the old adapters applies."""
        self.records, self.active, self.stack = {}, None, []

    def peft(self) -> Any:
        if not is_peft_model(self.handle.module):
            raise FineTuneError("No adapter is loaded yet.")
        return self.handle.module

    def next_name(self) -> str:
        taken = set(self.records) | set(getattr(self.handle.module, "peft_config", {}) or {})
        n = len(self.records) + 1
        while f"ft{n}" in taken:
            n += 1
        return f"ft{n}"

    # ------------------------------------------------------------------------------------ serving

    def activate(self, name: str | None, remember: bool = True) -> None:
        if remember and name != self.active:
            self.stack.append(self.active)
        self.active = name
        module = self.handle.module
        if not is_peft_model(module):
            return
        if name is None:
            module.base_model.disable_adapter_layers()
        else:
            module.base_model.enable_adapter_layers()
            module.set_adapter(name)
            for param in module.parameters():
                param.requires_grad = False

    def use(self, name: str | None) -> None:
        """Serve with adapter `name` (None or "base" = the base model); instant, nothing reloads."""
        if name in (None, "base"):
            self.activate(None)
            return
        self._check_known(name)
        self.activate(name)

    def _check_known(self, name: str) -> None:
        if name not in self.records:
            raise ModelLoadError(f"No adapter named '{name}'. Available: base, {', '.join(self.records) or '(none)'}.")

    def undo(self) -> str | None:
        """Go back to the adapter that was active before the last switch or fine-tune."""
        if not self.stack:
            raise FineTuneError("Nothing to undo: no fine-tune or adapter switch in this session.")
        previous = self.stack.pop()
        self.activate(previous, remember=False)
        return previous

    @contextmanager
    def serving(self, name: str | None) -> Iterator[None]:
        """Serve with `name` (None = base) inside the block only; the undo history is untouched."""
        if name is not None:
            self._check_known(name)
        active = self.active
        self.activate(name, remember=False)
        try:
            yield
        finally:
            self.activate(active, remember=False)

    def disabled(self) -> Any:
        """Temporarily serve the base model (for before/after comparisons)."""
        return self.serving(None)

    # ------------------------------------------------------------------------------------ training

    def for_training(self, lora_config: dict[str, Any]) -> tuple[str, Any]:
        """A fresh adapter; initialised from the active one when shapes match, so training continues."""
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        handle, name = self.handle, self.next_name()
        try:
            lora = LoraConfig(**lora_config)
        except (TypeError, ValueError) as e:
            raise FineTuneConfigError(f"Invalid lora_config: {e}") from e
        if not is_peft_model(handle.module):
            # QLoRA under FSDP: one dtype per FSDP unit, so keep norms and LoRA weights in the storage dtype
            # (no fp32 upcasts), as trl does for sharded QLoRA.
            sharded_qlora = handle.bnb_config is not None and fsdp_requested()
            if handle.bnb_config is not None and not sharded_qlora:
                from peft import prepare_model_for_kbit_training

                handle.module = prepare_model_for_kbit_training(handle.module, use_gradient_checkpointing=False)
            handle.module = get_peft_model(handle.module, lora, adapter_name=name,
                                           autocast_adapter_dtype=not sharded_qlora)
        else:
            handle.module.add_adapter(name, lora)
            if self.active is not None:
                parent = get_peft_model_state_dict(handle.module, adapter_name=self.active)
                if _same_lora_shape(handle.module.peft_config[self.active], lora):
                    set_peft_model_state_dict(handle.module, parent, adapter_name=name)
                    logger.info("Continuing from adapter '%s' (its weights are copied into '%s').", self.active, name)
                else:
                    logger.info("lora_config differs from adapter '%s'; training '%s' from scratch.", self.active, name)
        model = handle.module
        model.base_model.enable_adapter_layers()
        model.set_adapter(name)
        for param_name, param in model.named_parameters():
            param.requires_grad = f".{name}." in param_name
        return name, model

    def discard(self, name: str, previous: str | None) -> None:
        """Forget a half-trained adapter; serve what served before."""
        model = self.peft()
        if name in model.peft_config and len(model.peft_config) > 1:
            model.set_adapter(previous if previous is not None else next(a for a in model.peft_config if a != name))
            model.delete_adapter(name)
        elif name in model.peft_config:  # it was the only adapter: back to the plain base model
            self.handle.module = model.unload()
            self.handle.module.eval()
        self.activate(previous, remember=False)

    def add_trained(self, name: str, path: Path, parent: str | None, note: str) -> None:
        self.records[name] = AdapterRecord(name, path, parent, note)
        self.activate(name)

    # ------------------------------------------------------------------------------------ files

    def save(self, name: str, dest: Path, weights: dict[str, Any] | None = None, replace: bool = False) -> Path:
        """Adapter + tokenizer, written to a unique temporary folder and renamed: no half-written adapter loads.

        `weights`: the gathered state dict after sharded training (`distributed.gather_trained_weights`); by
        default the adapter is read from this process's module, which holds it whole (one process, DDP, ZeRO-2).
        """
        model = self.peft()
        if not is_main_process():
            return dest
        with atomic_folder(dest, replace=replace) as tmp:
            if weights is None:
                model.save_pretrained(tmp, selected_adapters=[name])
            else:  # gathered names are clean; FSDP1's module names are not, so peft saves from a clean copy
                self._unwrapped_skeleton(name).save_pretrained(str(tmp), selected_adapters=[name], state_dict=weights)
            nested = tmp / name
            if nested.is_dir():  # peft nests non-"default" adapters in a subfolder
                for item in nested.iterdir():
                    item.rename(tmp / item.name)
                nested.rmdir()
            self.handle.tokenizer.save_pretrained(tmp)
        return dest

    def _unwrapped_skeleton(self, name: str) -> Any:
        """The model with adapter `name` as a single process builds it, on the meta device (no memory, no weights).

        peft picks an adapter's tensors by the names of the model's modules. FSDP1 inserts
        `_fsdp_wrapped_module.` into the names of the layers it wraps and peft 0.21 removes only a leading
        one, so saving gathered (clean-named) weights from the wrapped model writes an empty adapter.
        """
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        base = self.handle.base_model()
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(base.config, trust_remote_code=self.handle.trust_remote_code)
        skeleton.name_or_path = base.name_or_path  # recorded as the adapter's base model
        return get_peft_model(skeleton, copy.deepcopy(self.peft().peft_config[name]), adapter_name=name)

    def load(self, path: str | Path, note: str = "loaded") -> AdapterRecord:
        """Load a LoRA adapter folder on top of the current base model and make it active."""
        from peft import PeftModel

        handle = self.handle
        path = Path(path).expanduser()
        if not (path / "adapter_config.json").exists():
            raise ModelLoadError(f"{path} is not an adapter folder (no adapter_config.json).")
        handle.require_whole_weights("load an adapter")
        name = self.next_name()
        try:
            if is_peft_model(handle.module):
                handle.module.load_adapter(str(path), adapter_name=name)
            else:
                handle.module = PeftModel.from_pretrained(handle.module, str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            base = handle.source.path if handle.source else "the loaded model"
            raise ModelLoadError(f"Adapter {path} does not fit the loaded base model ({base}): "
                                 f"{str(e).splitlines()[0][:200]}") from e
        handle.module.eval()
        record = AdapterRecord(name, path, self.active, note)
        self.records[name] = record
        self.activate(name)
        logger.info("Adapter '%s' active (%s).", name, path)
        return record

    def export_merged(self, dest: str | Path) -> Path:
        """Write base + active adapter merged into one model folder loadable by `from_pretrained`."""
        handle = self.handle
        handle.require_whole_weights("merge")
        if self.active is None:
            raise FineTuneError("No adapter is active: there is nothing to merge. Use /save for the base model.")
        if handle.bnb_config is not None:
            raise FineTuneError(
                "Refusing to merge into a 4/8-bit quantized base (the result loses precision). Save the adapter "
                "(/save), load the full-precision base without \"quantization\", load the adapter, then export."
            )
        dest = Path(dest).expanduser()
        if dest.exists():
            raise FineTuneError(f"{dest} already exists; choose a new folder.")
        with atomic_folder(dest) as tmp:
            model = copy.deepcopy(self.peft())
            model.set_adapter(self.active)
            merged = model.merge_and_unload(adapter_names=[self.active])
            merged.save_pretrained(tmp)
            handle.tokenizer.save_pretrained(tmp)
            del merged, model
        return dest

    def verify_export(self, folder: Path) -> float:
        """Load a merged folder back and compare its logits with base + active adapter on a short prompt."""
        from transformers import AutoModelForCausalLM

        handle = self.handle
        enc = handle.tokenizer.apply_chat_template([{"role": "user", "content": "Hello! Who are you?"}],
                                                   add_generation_prompt=True, return_dict=True, return_tensors="pt")
        enc = {k: v.to(handle.device) for k, v in enc.items()}
        reloaded: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=handle.dtype, local_files_only=True)
        reloaded.to(handle.device)
        with torch.inference_mode():
            expected = handle.module(**enc).logits.float()
            got = reloaded(**enc).logits.float()
        del reloaded
        return float((expected - got).abs().max())


def _same_lora_shape(a: Any, b: Any) -> bool:
    return bool(a.r == b.r and set(_as_list(a.target_modules)) == set(_as_list(b.target_modules)))


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else sorted(value or [])
