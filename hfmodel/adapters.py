"""The adapter set of one loaded model: LoRA adapters made or loaded in this session, which one serves,
undo, one adapter for one call, saving, loading, and merging into a standalone model (checked)."""

from __future__ import annotations

import copy
import json
import re
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
    write_text_atomic,
)
from hfmodel.loading import DEFAULT_MODEL_ID, ModelHandle
from hfmodel.settings import LORA_EXTRA_KEYS


@dataclass
class AdapterRecord:
    """One adapter made or loaded in this session."""

    name: str
    path: Path
    parent: str | None
    note: str


def serve_with_peft(module: Any, name: str | None) -> None:
    """Serve adapter `name` (None = the base) through peft's own calls; every adapter weight left frozen."""
    if name is None:
        module.base_model.disable_adapter_layers()
        return
    module.base_model.enable_adapter_layers()
    module.set_adapter(name)
    for param in module.parameters():
        param.requires_grad = False


class AdapterSet:
    """Adapters on top of the handle's base model (peft multi-adapter: switching is instant, nothing reloads)."""

    def __init__(self, handle: ModelHandle, name_prefix: str = "") -> None:
        """`name_prefix` starts every new adapter's name (agents sharing one model: "Critic-" -> "Critic-ft1")."""
        self.handle = handle
        self.name_prefix = name_prefix
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
        while f"{self.name_prefix}ft{n}" in taken:
            n += 1
        return f"{self.name_prefix}ft{n}"

    # ------------------------------------------------------------------------------------ serving

    def activate(self, name: str | None, remember: bool = True) -> None:
        if remember and name != self.active:
            self.stack.append(self.active)
        self.active = name
        if is_peft_model(self.handle.module):
            serve_with_peft(self.handle.module, name)

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
            lora = LoraConfig(**_with_layer_names(peft_fields(lora_config), handle.module))
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
            self._record_base(tmp / "adapter_config.json")
            self.handle.tokenizer.save_pretrained(tmp)
        return dest

    def base_reference(self) -> str | None:
        """How an adapter names its base so that it loads from any folder: a hub id, or an absolute path."""
        source = self.handle.source
        if source is None:
            return None
        if source.kind == "bundled":
            return DEFAULT_MODEL_ID  # the converted copy of this hub model (found offline too)
        if source.kind == "local":
            return str(Path(source.path).expanduser().resolve())
        return source.path

    def _record_base(self, config_file: Path) -> None:
        """peft writes the base as it was given (often a relative path, useless from another folder)."""
        base = self.base_reference()
        if base is None or not config_file.exists():
            return
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base
        write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True))

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
        """Load a LoRA adapter folder on top of the current base model and make it active.

        An adapter made for another base loads with a warning if its shapes fit, and is refused in one line
        naming the first layer that differs if not; a failed load leaves the model as it was.
        """
        from peft import PeftModel

        handle = self.handle
        path = Path(path).expanduser()
        if not (path / "adapter_config.json").exists():
            raise ModelLoadError(f"{path} is not an adapter folder (no adapter_config.json).")
        handle.require_whole_weights("load an adapter")
        made_for = self._made_for(path)
        loaded = handle.source.path if handle.source else "the loaded model"
        differ = shape_mismatches(path, handle.base_model())
        if differ:
            more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
            raise ModelLoadError(f"Adapter {path} does not fit the loaded base model ({loaded}): {differ[0]}{more}; "
                                 f"it was made for {made_for or 'another base'}: load that model first.")
        name = self.next_name()
        was_peft = is_peft_model(handle.module)
        try:
            if was_peft:
                handle.module.load_adapter(str(path), adapter_name=name)
            else:
                handle.module = PeftModel.from_pretrained(handle.module, str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            self._undo_partial_load(name, was_peft)
            raise ModelLoadError(f"Adapter {path} does not fit the loaded base model ({loaded}): "
                                 f"{_one_line(e)}") from e
        handle.module.eval()
        if made_for and not self._is_loaded_base(made_for):
            logger.warning("Adapter %s was made for %s, but the loaded base model is %s: its answers may be "
                           "poor. Load its own base first (/load %s).", path, made_for, loaded, made_for)
            note += f" (made for {made_for})"
        record = AdapterRecord(name, path, self.active, note)
        self.records[name] = record
        self.activate(name)
        logger.info("Adapter '%s' active (%s).", name, path)
        return record

    @staticmethod
    def _made_for(path: Path) -> str | None:
        try:
            base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path / 'adapter_config.json'} cannot be read: {e}") from None
        return base if isinstance(base, str) and base else None

    def _is_loaded_base(self, made_for: str) -> bool:
        """True when `made_for` (an adapter's base: hub id or path) names the model that is loaded."""
        source = self.handle.source
        names = {getattr(self.handle.base_model().config, "_name_or_path", None)}
        if source is not None:
            names |= {source.path, str(Path(source.path).expanduser().resolve())}
            if source.kind == "bundled":
                names.add(DEFAULT_MODEL_ID)
        return made_for in names or str(Path(made_for).expanduser().resolve()) in names

    def _undo_partial_load(self, name: str, was_peft: bool) -> None:
        """peft injects the adapter's layers before it loads its weights: take them out again after a failure."""
        module = self.handle.module
        if was_peft:
            if name in module.peft_config:
                module.delete_adapter(name)
            self.activate(self.active, remember=False)
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer_name, layer in list(module.named_modules()):
            if isinstance(layer, BaseTunerLayer) and layer_name:
                parent_name, _, child = layer_name.rpartition(".")
                setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
        if "peft_config" in vars(module):
            del module.peft_config

    def export_merged(self, dest: str | Path) -> Path:
        """Write base + active adapter merged into one model folder loadable by `from_pretrained`."""
        handle = self.handle
        dest = Path(dest).expanduser()
        self.check_mergeable()
        if dest.exists():
            raise FineTuneError(f"{dest} already exists; choose a new folder.")
        with self.merged() as merged:
            with atomic_folder(dest) as tmp:
                merged.save_pretrained(tmp)
                handle.tokenizer.save_pretrained(tmp)
        return dest

    @contextmanager
    def merged(self, allow_base: bool = False) -> Iterator[Any]:
        """A plain transformers model of base + active adapter merged: a copy, the session's model is untouched.
        `allow_base`: with no adapter active, the base itself (unwrapped from peft) instead of an error."""
        handle = self.handle
        self.check_mergeable(allow_base)
        if self.active is None and not is_peft_model(handle.module):
            yield handle.module
            return
        model = copy.deepcopy(self.peft())
        if self.active is None:
            merged = model.unload()
        else:
            model.set_adapter(self.active)
            merged = model.merge_and_unload(adapter_names=[self.active])
        try:
            yield merged
        finally:
            del merged, model

    def check_mergeable(self, allow_base: bool = False) -> None:
        """One-line refusals, before anything is copied: sharded weights, no adapter, a 4/8-bit base."""
        handle = self.handle
        handle.require_whole_weights("merge")
        if self.active is None and not allow_base:
            raise FineTuneError("No adapter is active: there is nothing to merge. Use /save for the base model.")
        if handle.bnb_config is not None:
            raise FineTuneError(
                "Refusing to merge into a 4/8-bit quantized base (the result loses precision). Save the adapter "
                "(/save), load the full-precision base without \"quantization\", load the adapter, then export."
            )
        if handle.int8 is not None:
            raise FineTuneError(
                "Refusing to merge into int8 serving weights (the result would lose precision). Save the adapter "
                "(/save), load the base without \"quantization\": \"int8\", load the adapter, then export.")

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


def shape_mismatches(path: Path, base: Any) -> list[str]:
    """The layers whose LoRA matrices in the adapter's safetensors file do not fit `base` (read from the file's
    header: no weights are loaded), each as 'layer X is IN -> OUT in the model, the adapter's lora_A is [r, n]'."""
    file = path / "adapter_model.safetensors"
    if not file.exists():
        return []
    from safetensors import safe_open

    problems = []
    with safe_open(str(file), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
            head, dot, tail = key.rpartition(".lora_")
            if not dot or tail not in ("A.weight", "B.weight"):
                continue  # embeddings (lora_embedding_*), biases, modules_to_save: peft checks those
            layer = head.removeprefix("base_model.model.")
            try:
                module = base.get_submodule(layer)
            except AttributeError:
                problems.append(f"layer {layer} does not exist in the model")
                continue
            size_in = getattr(module, "in_features", getattr(module, "nx", None))
            size_out = getattr(module, "out_features", getattr(module, "nf", None))
            if size_in is None or size_out is None:
                continue
            shape = list(tensors.get_slice(key).get_shape())
            if (tail == "A.weight" and shape[-1] != size_in) or (tail == "B.weight" and shape[0] != size_out):
                problems.append(f"layer {layer} is {size_in} -> {size_out} in the model but the adapter's "
                                f"lora_{tail[0]} is {shape}")
    return problems


def _one_line(error: BaseException) -> str:
    """A library error as one complete line: peft's state-dict errors span many lines, one per tensor."""
    text = " ".join(str(error).split())
    mismatches = re.findall(r"size mismatch for (\S+): (.*?)(?= size mismatch for |$)", text)
    if mismatches:
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        return f"layer {mismatches[0][0].removeprefix('base_model.model.')}: {mismatches[0][1]}{more}"
    return text


def peft_fields(lora_config: dict[str, Any]) -> dict[str, Any]:
    """`lora_config` without this project's own keys: what peft's LoraConfig takes."""
    return {k: v for k, v in lora_config.items() if k not in LORA_EXTRA_KEYS}


def use_loraplus(trainer: Any, lora_config: dict[str, Any]) -> None:
    """Give `trainer` peft's LoRA+ optimizer (https://arxiv.org/abs/2402.12354) when `lora_config` sets
    `loraplus_lr_ratio`: every LoRA B matrix learns at that many times the learning rate, the A matrices at it, with
    the optimizer class and settings (betas, eps, weight decay) the training arguments give. Built as a Trainer
    optimizer factory, when training starts (after any launcher has wrapped the model), like the Trainer's own.

    peft (0.21) puts every 1-d trainable tensor with the B matrices, meant for biases and norms; FSDP1 with
    `use_orig_params` (the shipped fsdp_lora.yaml) has by then made each LoRA matrix a 1-d view of its shard, so the
    A matrices would learn at the B rate too (measured: the adapter 0.41 away from the single-process run's).
    Tensors 2-d before wrapping go back to the A group (FSDP1 keeps the same Parameter objects; FSDP2 and DDP keep
    the shapes)."""
    ratio = lora_config.get("loraplus_lr_ratio")
    if ratio is None or trainer.optimizer is not None:
        return
    matrices = {id(p) for name, p in trainer.model.named_parameters()
                if p.requires_grad and p.ndim > 1 and "lora_B" not in name}

    def build(model: Any, **_: Any) -> Any:
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        args = trainer.args
        optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs.pop("lr", None)
        optimizer = create_loraplus_optimizer(model, optimizer_class, lr=args.learning_rate,
                                              loraplus_lr_ratio=float(ratio), loraplus_weight_decay=args.weight_decay,
                                              **kwargs)
        group_a, *others = optimizer.param_groups  # peft's order: A, embeddings, B, B without weight decay
        for group in others[1:]:
            group_a["params"].extend(p for p in group["params"] if id(p) in matrices)
            group["params"] = [p for p in group["params"] if id(p) not in matrices]
        return optimizer

    trainer.optimizer_cls_and_kwargs = (lambda: build, {})


def check_layers(lora_config: dict[str, Any], module: Any) -> None:
    """`layers_to_transform` names layers this model has, before any run starts. Indices count from 0 at the
    bottom; a negative index is refused (peft would not read it from the top: it matches no layer at all)."""
    layers = lora_config.get("layers_to_transform")
    count = _layer_count(module)
    if layers is None or count is None:
        return
    given = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    span = f"this model has {count} layers, 0 to {count - 1}"
    if not isinstance(given, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        problem = f"must be a layer index or a list of them ({span})"
    elif any(i < 0 for i in given):
        problem = f"layer indices count from 0 ({span}); negative ones are not read from the top: for the top layer " \
                  f"give [{count - 1}]"
    elif any(i >= count for i in given):
        problem = f"this model has {count} layers (0 to {count - 1})"
    else:
        return
    raise FineTuneConfigError(f"Invalid fine_tune_config: lora_config.layers_to_transform = {layers!r}: {problem}.")


def _layer_count(module: Any) -> int | None:
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    return count if isinstance(count, int) and count > 0 else None


def _with_layer_names(lora_config: dict[str, Any], module: Any) -> dict[str, Any]:
    """`target_modules: all-linear` spelled out as module names when `layers_to_transform` picks layers (peft
    takes that shorthand only for every layer), e.g. LoRA on the top 15 of 30 layers: the backward stops there."""
    if lora_config.get("layers_to_transform") is None or str(lora_config.get("target_modules")).lower() != "all-linear":
        return lora_config
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    model = module.get_base_model() if is_peft_model(module) else module
    every = LoraConfig(target_modules="all-linear")
    _maybe_include_all_linear_layers(every, model)  # in place: the shorthand becomes the modules' full names
    return {**lora_config, "target_modules": sorted({name.rsplit(".", 1)[-1] for name in every.target_modules or []})}


def _same_lora_shape(a: Any, b: Any) -> bool:
    return bool(a.r == b.r and set(_as_list(a.target_modules)) == set(_as_list(b.target_modules))
                and _layers(a) == _layers(b))


def _layers(config: Any) -> list[int] | None:
    layers = getattr(config, "layers_to_transform", None)
    return [layers] if isinstance(layers, int) else (sorted(layers) if layers is not None else None)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else sorted(value or [])
