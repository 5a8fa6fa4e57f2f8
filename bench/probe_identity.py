"""Does the demo fine-tune work? Ask the 10 held-out identity probes and 6 general questions, base vs tuned.

    python bench/probe_identity.py runs/<run>/adapter        # greedy decoding, the chat's system prompt

Prints each answer and the counts: identity answers that name Ember, general answers that contain an expected
word (data/ember_probes.json). The demo targets: >= 8/10 identity after tuning, general answers still right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def score(local_model_path: str, system_prompt: str) -> dict[str, int]:
    from huggingface_model import HuggingFaceWrapper

    model = HuggingFaceWrapper(config_name="probe", local_model_path=local_model_path, max_length=48,
                               system_prompt=system_prompt)
    probes = json.loads((ROOT / "data" / "ember_probes.json").read_text())
    system = {"role": "system", "content": system_prompt}
    questions = probes["identity"] + [item["prompt"] for item in probes["general"]]
    # All 16 probes in one batched generate (each row is the reply generate() would give alone).
    answers = [r.text for r in model.generate_batch([[system, {"role": "user", "content": q}] for q in questions],
                                                    do_sample=False)]
    identity = general = 0
    for question, answer in zip(probes["identity"], answers, strict=False):
        identity += "ember" in answer.lower()
        print(f"  identity | {question} -> {answer}")
    for item, answer in zip(probes["general"], answers[len(probes["identity"]):], strict=True):
        general += any(word in answer.lower() for word in item["expect_any"])
        print(f"  general  | {item['prompt']} -> {answer}")
    return {"identity": identity, "identity_total": len(probes["identity"]), "general": general,
            "general_total": len(probes["general"])}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    import load_finetune_huggingface_model as script
    from huggingface_model import bundled_model_folder

    adapter = sys.argv[1]
    base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = base if base and Path(base).is_dir() else str(bundled_model_folder())
    results = {}
    for label, path in (("base", base), ("tuned", adapter)):
        print(f"{label}: {path}")
        results[label] = score(path, script.sys_prompt)
    for label, r in results.items():
        print(f"{label:>5}: identity {r['identity']}/{r['identity_total']}, general {r['general']}/{r['general_total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
