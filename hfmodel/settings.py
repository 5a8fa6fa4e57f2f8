"""Fine-tune settings: the defaults, the typed and validated `FineTuneConfig`, the device decisions, and the
ONE `key=value` parser used by the script's flags, `finetune.py --set` and the chat's `/finetune`.

Values are read as YAML (JSON is YAML too): `40`, `1e-3`, `true`, `null`, `[q_proj, v_proj]`. Nothing typed
is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hfmodel.common import FineTuneConfigError, closest, cpu_has_bf16, logger

if TYPE_CHECKING:
    import torch

# LoRA defaults (peft `LoraConfig` fields). Rank 8 on every linear layer: ~0.7 % of a 135M model
# trains, enough to teach an identity in a few dozen steps.
DEFAULT_LORA_CONFIG: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,  # tiny data + few steps: dropout only slows learning
    "target_modules": "all-linear",
    "bias": "none",
    "task_type": "CAUSAL_LM",
}

# lora_config keys of this project's own, beside peft LoraConfig's fields: LoRA+ (B matrices learn at this ratio
# times the learning rate; peft's create_loraplus_optimizer), off by default
LORA_EXTRA_KEYS = ("loraplus_lr_ratio",)
MAX_LORAPLUS_RATIO = 1000  # beyond it B's steps overflow or swamp A's: the run diverges, not learns faster

# Training defaults (trl `SFTConfig` fields) where they differ from trl's own; device-specific ones
# (bf16/fp16, optimiser, use_cpu) are filled in by `device_training_args`.
DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "learning_rate": 2e-4,  # trl's 2e-5 is for full fine-tuning; LoRA wants ~10x more
    "num_train_epochs": 3,
    "max_steps": -1,  # >0 overrides epochs; set it to the real run length (the LR decay depends on it)
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "max_length": 1024,  # training sequence length in tokens (not the reply length)
    "assistant_only_loss": True,  # loss on assistant turns (+ their end-of-turn token) only
    "padding_free": None,  # None = on when every row fits `max_length` (same losses, ~1.5x faster)
    "activation_checkpointing": False,  # trl turns it on; small models train faster without it
    "logging_steps": 1,
    "eval_strategy": "steps",  # eval_steps is set to evaluate before, halfway and at the end
    "save_strategy": "steps",  # save_steps is set to give ~2 checkpoints per run (for resume)
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "disable_tqdm": True,  # progress is shown by the chat program instead
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,  # a peft model is no PreTrainedModel: transformers would guess True
    "output_dir": "runs",  # each run gets runs/<timestamp>-<model>/ below this
}

# Keys of `fine_tune_config` besides the two dicts (the docstrings of FineTuneConfig's fields, short).
TOP_LEVEL_KEYS = {
    "lora_config": "LoRA settings (peft LoraConfig fields), merged over DEFAULT_LORA_CONFIG",
    "training_args": "training settings (trl SFTConfig fields), merged over DEFAULT_TRAINING_ARGS",
    "eval_data_path": "a separate held-out file for eval loss (default: hold out eval_fraction of the data)",
    "eval_fraction": "fraction held out for eval when there is no eval_data_path (default 0.1; 0 = none)",
    "force_retrain": "train even if an identical earlier run's adapter exists (default False)",
    "resume": "continue the latest interrupted run of this model from its last checkpoint (default False)",
    "probes": "prompts answered before/after in the fine-tune report (default: from the eval split)",
    "method": "sft (default), dpo, orpo or kto: learn answers, or learn from preference pairs / marked answers",
}
SCALAR_KEYS = [k for k in TOP_LEVEL_KEYS if k not in ("lora_config", "training_args")]

# Training methods and the trl config class whose fields `training_args` takes for each (ORPO lives in
# trl.experimental in trl 1.16). Preference runs (hfmodel/preference.py) train a LoRA adapter like SFT does.
METHODS = {
    "sft": "trl SFTConfig",
    "dpo": "trl DPOConfig",
    "orpo": "trl.experimental.orpo ORPOConfig",
    "kto": "trl KTOConfig",
}
# Defaults per preference method where they differ from DEFAULT_TRAINING_ARGS (and from trl, whose 1e-6 learning
# rate is for full fine-tuning). Our own before/after scoring replaces trl's evaluation loop.
METHOD_TRAINING_ARGS: dict[str, dict[str, Any]] = {
    "dpo": {"learning_rate": 5e-4, "beta": 0.1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
            "eval_strategy": "no"},
    "orpo": {"learning_rate": 5e-4, "beta": 0.1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
             "eval_strategy": "no"},
    "kto": {"learning_rate": 5e-4, "beta": 0.1, "per_device_train_batch_size": 8, "eval_strategy": "no"},
}


@dataclass
class FineTuneConfig:
    """Resolved, validated `fine_tune_config`: defaults merged with the user's dict."""

    lora_config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LORA_CONFIG))
    """peft `LoraConfig` fields, merged over DEFAULT_LORA_CONFIG."""
    training_args: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAINING_ARGS))
    """trl `SFTConfig` fields, merged over DEFAULT_TRAINING_ARGS (plus the device's settings)."""
    eval_data_path: str | None = None
    """A separate held-out file for the eval loss; None = hold out `eval_fraction` of the data."""
    eval_fraction: float = 0.1
    """Share of the rows held out for the eval loss when there is no `eval_data_path` (0 = none)."""
    force_retrain: bool = False
    """Train even if an identical earlier run's adapter exists (otherwise it is reused)."""
    resume: bool = False
    """Continue the latest interrupted identical run from its last checkpoint."""
    probes: list[str] | None = None
    """Prompts answered before and after in the report; None = the first held-out questions."""
    method: str = "sft"
    """"sft" (answers), or "dpo" / "orpo" (preference pairs) / "kto" (answers marked good or bad)."""
    user_training_keys: set[str] = field(default_factory=set)
    """The training_args keys the user set (the device may not override those)."""

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None, device: torch.device | None = None,
                  check_fields: bool = True) -> FineTuneConfig:
        """Validate `config` (every problem at once) and merge it over the defaults.

        `check_fields`: check lora/training keys against peft's and trl's fields (imports them: seconds).
        `device`: fill in what the device decides (precision, optimiser).
        """
        config = dict(config or {})
        problems: list[str] = []
        for key in config:
            if key not in TOP_LEVEL_KEYS:
                problems.append(f"unknown key '{key}'{closest(key, list(TOP_LEVEL_KEYS))}; "
                                f"valid keys: {', '.join(TOP_LEVEL_KEYS)}")
        lora = config.get("lora_config") or {}
        args = config.get("training_args") or {}
        for name, value in (("lora_config", lora), ("training_args", args)):
            if not isinstance(value, dict):
                problems.append(f"'{name}' must be a dict, got {type(value).__name__}")
        lora = lora if isinstance(lora, dict) else {}
        args = args if isinstance(args, dict) else {}
        method = config.get("method", "sft")
        method = method_name(method) if isinstance(method, str) else method
        known = method if isinstance(method, str) and method in METHODS else "sft"  # field lists for a bad value
        if check_fields:
            problems += _unknown_keys("lora_config", lora, lora_fields())
            problems += _unknown_keys("training_args", args, trainer_fields(known), known)
        resolved = cls(
            lora_config={**DEFAULT_LORA_CONFIG, **lora},
            training_args={**DEFAULT_TRAINING_ARGS, **METHOD_TRAINING_ARGS.get(known, {}), **args},
            eval_data_path=config.get("eval_data_path"),
            eval_fraction=config.get("eval_fraction", 0.1),
            force_retrain=config.get("force_retrain", False),
            resume=config.get("resume", False) or bool(args.get("resume_from_checkpoint")),
            probes=config.get("probes"),
            method=method,
            user_training_keys=set(args),
        )
        problems += resolved._range_problems()
        if check_fields:
            problems += _type_problems("lora_config", lora, _field_defaults("lora"))
            problems += _type_problems("training_args", args, _field_defaults(known))
            problems += _report_to_problems(resolved.training_args.get("report_to"))
        if problems:
            raise FineTuneConfigError("Invalid fine_tune_config: " + "; ".join(_one_per_key(problems)) + ".")
        if device is not None:
            resolved.training_args.update(device_training_args(device, resolved.training_args, set(args)))
        return resolved

    def _range_problems(self) -> list[str]:
        lora, args, problems = self.lora_config, self.training_args, []

        def check(where: str, key: str, ok: Callable[[Any], bool], need: str) -> None:
            value = (lora if where == "lora_config" else args).get(key)
            valid = False
            try:
                valid = not isinstance(value, bool) and ok(value)
            except TypeError:
                pass
            if not valid:
                problems.append(f"{where}.{key} = {value!r}: must be {need}")

        def finite(v: Any) -> bool:
            return isinstance(v, (int, float)) and math.isfinite(v)

        check("lora_config", "r", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        check("lora_config", "lora_alpha", lambda v: finite(v) and v > 0, "a finite number > 0")
        check("lora_config", "lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
        if lora.get("loraplus_lr_ratio") is not None:
            check("lora_config", "loraplus_lr_ratio", lambda v: finite(v) and 1 <= v <= MAX_LORAPLUS_RATIO,
                  f"a number from 1 to {MAX_LORAPLUS_RATIO} (LoRA+ trains B at this many times the learning rate; "
                  "2 to 16 is usual), or null for plain LoRA")
        check("training_args", "learning_rate", lambda v: 0 < v < 1, "a number in (0, 1)")
        check("training_args", "num_train_epochs", lambda v: finite(v) and v > 0, "a finite number > 0")
        check("training_args", "max_steps", lambda v: isinstance(v, int) and (v == -1 or v >= 1),
              "a whole number >= 1 (or -1 to use num_train_epochs)")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check("training_args", key, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        if args.get("max_length") is not None:
            check("training_args", "max_length", lambda v: isinstance(v, int) and v >= 16, "an integer >= 16")
        for key in ("seed", "data_seed"):  # torch, numpy and random all take seeds of 32 bits
            if key == "seed" or args.get(key) is not None:
                check("training_args", key, lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED,
                      f"a whole number from 0 to {MAX_SEED}")
        problems += number_problems(problems, lora_config=lora, training_args=args)
        if not isinstance(self.eval_fraction, (int, float)) or not 0 <= self.eval_fraction < 0.5:
            problems.append(f"eval_fraction = {self.eval_fraction!r}: must be a number in [0, 0.5)")
        if not isinstance(self.method, str) or self.method not in METHODS:
            problems.append(f"method = {self.method!r}: must be one of {', '.join(METHODS)}")
        for key in ("force_retrain", "resume"):
            if not isinstance(getattr(self, key), bool):
                problems.append(f"{key} = {getattr(self, key)!r}: must be true or false")
        if self.probes is not None and not (
            isinstance(self.probes, list) and all(isinstance(p, str) and p.strip() for p in self.probes)
        ):
            problems.append("probes must be a list of non-empty strings")
        return problems

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("user_training_keys")
        return json.loads(json.dumps(data, default=str))


MAX_SEED = 2**32 - 1


def _one_per_key(problems: list[str]) -> list[str]:
    """The first problem found for each key (a value can fail the range and the type check)."""
    seen, kept = set(), []
    for problem in problems:
        key = problem.split(" = ", 1)[0] if " = " in problem else problem
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


def number_problems(found: list[str], **sections: dict[str, Any]) -> list[str]:
    """Numbers not already reported in `found` must be finite and fit 64 bits: NaN, inf or 10**30 would fail deep
    inside training or generation. `sections`: name -> {key: value}."""
    problems = []
    for where, values in sections.items():
        for key, value in values.items():
            if any(p.startswith(f"{where}.{key} = ") for p in found) or isinstance(value, bool):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{where}.{key} = {value!r}: must be a finite number")
            elif isinstance(value, int) and not -(2**63) <= value < 2**63:
                problems.append(f"{where}.{key} = {value!r}: too large (at most {2**63 - 1})")
    return problems


def _report_to_problems(report_to: Any) -> list[str]:
    """Each logger in `report_to` must be one transformers knows and installed here (else the Trainer raises)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else report_to
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return [f"training_args.report_to = {report_to!r}: must be a logger name or a list of them"]
    known = list(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in ("none", "all") and n not in known]
    if unknown:
        return [f"training_args.report_to = {report_to!r}: unknown logger '{unknown[0]}'{closest(unknown[0], known)}; "
                f"use none or one of: {', '.join(known)}"]
    installed = get_available_reporting_integrations()
    missing = [n for n in names if n in known and n not in installed]
    if missing:
        return [f"training_args.report_to = {report_to!r}: {', '.join(missing)} not installed (pip install "
                f"{' '.join(n.replace('_', '-') for n in missing)}), or use report_to=none "
                f"(installed loggers: {', '.join(installed) or 'none'})"]
    return []


def lora_fields() -> list[str]:
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig)] + list(LORA_EXTRA_KEYS)


def sft_fields() -> list[str]:
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig)]


def trainer_config_class(method: str = "sft") -> type:
    """The trl config dataclass whose fields `training_args` takes for `method` (a key of METHODS)."""
    if method == "orpo":
        import warnings

        with warnings.catch_warnings():  # trl warns on every first import from trl.experimental
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.orpo import ORPOConfig
        return ORPOConfig
    import trl

    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "kto": trl.KTOConfig}[method]


def trainer_fields(method: str = "sft") -> list[str]:
    return [f.name for f in dataclasses.fields(trainer_config_class(method))]


def _field_defaults(which: str) -> dict[str, Any]:
    """Field defaults of peft's LoraConfig ("lora") or of a method's trl config class."""
    from peft import LoraConfig

    cls = LoraConfig if which == "lora" else trainer_config_class(which)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _type_problems(where: str, given: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """A value whose type cannot be what the field's default is (e.g. warmup_steps="soon")."""
    problems = []
    for key, value in given.items():
        default = defaults.get(key, dataclasses.MISSING)
        if value is None or default is dataclasses.MISSING or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            problems.append(f"{where}.{key} = {value!r}: must be {type(default).__name__} like the default {default!r}")
    return problems


def _unknown_keys(where: str, given: dict[str, Any], valid: list[str], method: str = "sft") -> list[str]:
    problems = []
    common = DEFAULT_LORA_CONFIG if where == "lora_config" else DEFAULT_TRAINING_ARGS
    docs = "peft LoraConfig" if where == "lora_config" else METHODS[method]
    for key in given:
        if key not in valid:
            other = [m for m in METHODS if m != method and where == "training_args" and key in trainer_fields(m)]
            hint = f" (a setting of method={'/'.join(other)})" if other else closest(key, valid)
            problems.append(f"unknown key {where}.{key}{hint}; common keys: {', '.join(k for k in common if k in valid)} "
                            f"(all {len(valid)} are the fields of {docs})")
    return problems


# =============================================================================================
# What the device decides


def training_precision(device: torch.device, args: dict[str, Any], user_keys: set[str]) -> tuple[bool, bool]:
    """(bf16, fp16): the mixed precision a run on `device` trains with (the decision only, no warnings).

    bf16 (else fp16) on CUDA; on CPU bf16 autocast where the CPU has bf16 instructions (LoRA weights and
    optimiser state stay fp32), else fp32; fp32 on MPS. The user's `bf16` / `fp16` win where the device can
    honour them; `bf16: false` forces fp32.
    """
    if device.type == "cuda":
        import torch

        bf16 = torch.cuda.is_bf16_supported()
        return (bool(args.get("bf16")) if "bf16" in user_keys else bf16,
                bool(args.get("fp16")) if "fp16" in user_keys else not bf16)
    if device.type == "cpu":
        return (bool(args.get("bf16")) if "bf16" in user_keys else cpu_has_bf16()), False
    return False, False


def device_training_args(device: torch.device, args: dict[str, Any], user_keys: set[str]) -> dict[str, Any]:
    """Settings the device can honour; user settings it cannot are downgraded with one warning each."""
    out: dict[str, Any] = {}
    out["bf16"], out["fp16"] = training_precision(device, args, user_keys)
    if device.type == "cuda":
        if "optim" not in user_keys:
            out["optim"] = "adamw_torch_fused"
        return out
    out["use_cpu"] = device.type == "cpu"
    if device.type == "cpu" and out["bf16"] and not cpu_has_bf16():
        logger.warning("bf16=True on a CPU without bf16 instructions (AVX512-BF16/AMX) is slower than fp32; "
                       "training in bf16 as asked.")
    if device.type != "cpu" and args.get("bf16"):
        logger.warning("bf16=True is not supported for training on %s; training in float32.", device.type)
    if args.get("fp16"):
        logger.warning("fp16=True is not supported for training on %s; training in %s.", device.type,
                       "bf16" if out["bf16"] else "float32")
    optim = str(args.get("optim", "adamw_torch") if "optim" in user_keys else "adamw_torch")
    if "8bit" in optim or "paged" in optim or "bnb" in optim:
        logger.warning("optim=%s needs bitsandbytes on a CUDA GPU; using adamw_torch on %s.", optim, device.type)
        optim = "adamw_torch"
    out["optim"] = optim
    return out


# =============================================================================================
# The one `key=value` parser

LIST_KEYS = ("target_modules", "modules_to_save")  # `a,b` means a list for these


def _yaml_loader() -> type:
    """yaml.SafeLoader that also reads `1e-3` as a float (YAML 1.1 / PyYAML wants `1.0e-3`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # Only true/false are booleans: YAML 1.1 would read `save_strategy=no` as False.
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )
    return Loader


def load_yaml(text: str) -> Any:
    """Parse YAML (or JSON) text with the safe loader above; raises yaml.YAMLError."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """`40` -> 40, `1e-3` -> 0.001, `true` -> True, `none`/`null` -> None, `[a, b]` -> list; else the text."""
    import yaml

    if text.strip().lower() == "none":
        return None
    try:
        return load_yaml(text)
    except (yaml.YAMLError, RecursionError):  # not YAML, or nested absurdly deep: the text, as typed
        return text


def fine_tune_key(key: str) -> list[str]:
    """Where a key goes in `fine_tune_config`: `lora.r` / `lora_config.r`, `training_args.x`, a top-level key
    (`eval_fraction`, ...), or a bare trl SFTConfig field (`max_steps`)."""
    head, dot, rest = key.partition(".")
    if head in ("lora", "lora_config") and rest:
        return ["lora_config", rest]
    if head == "training_args" and rest:
        return ["training_args", rest]
    if key in SCALAR_KEYS:
        return [key]
    if not dot and (key in sft_fields() or any(key in trainer_fields(m) for m in METHODS if m != "sft")):
        return ["training_args", key]  # the chosen method's config class checks it
    valid = sorted(set(sft_fields()) | {f"lora.{k}" for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
                   | set(SCALAR_KEYS))
    raise FineTuneConfigError(
        f"Unknown setting '{key}'{closest(key, valid)}. Use a trl SFTConfig field (max_steps, learning_rate, ...), "
        f"lora.<field> (lora.r, lora.lora_alpha, ...) or one of: {', '.join(SCALAR_KEYS)}.")


def split_assignment(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FineTuneConfigError(f"'{text}' is not key=value (e.g. max_steps=40, lora.r=16, learning_rate=1e-3).")
    value = parse_value(raw)
    if key.rsplit(".", 1)[-1] in LIST_KEYS and isinstance(value, str) and "," in value:
        value = [part.strip() for part in value.split(",") if part.strip()]
    return key, value


def assign(config: dict[str, Any], path: list[str], value: Any, where: str = "") -> None:
    """Set `config[path[0]][path[1]]... = value`, creating the mappings on the way."""
    target = config
    for part in path[:-1]:
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise FineTuneConfigError(f"{where or '.'.join(path)}: '{part}' is not a mapping")
        target = child
    target[path[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`max_steps=40 lora.r=16 force_retrain=true` -> a fine_tune_config fragment."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, value = split_assignment(pair)
        if key == "method" and isinstance(value, str):
            value = method_name(value)
        assign(config, fine_tune_key(key), value)
    return config


def method_name(value: str) -> str:
    """A typed method as the key of METHODS it means: `DPO` and ` dpo ` are `dpo`."""
    return value.strip().lower()


def merge_config(base: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, one level deep for the lora_config / training_args dicts."""
    merged = json.loads(json.dumps(base or {}))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
