"""The export's model card (README.md): a Hugging Face `ModelCard`, metadata in `ModelCardData`.

    text = model_card(record, params, metrics, pathology_report, batch_ids)

What it is, how to load it with plain transformers, the verdict (evaluation, promotion, parity), the
data, training params, held-out metrics, pathology checks, intended use and limits. The figures are
formatted here; the prose is the template below.
"""

from __future__ import annotations

import json

from huggingface_hub import EvalResult, ModelCard, ModelCardData

MODEL_NAME = "rmpipe reward model"
TEMPLATE = """---
{{ card_data }}
---

# Reward model (rmpipe)

A scalar reward model for RLHF: the backbone with a bias-free linear head (`score`, `num_labels=1`) read at \
the last real token of the chat-template rendering of (prompt, response).

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
text = tokenizer.apply_chat_template(messages + [{'role': 'assistant', 'content': response}], tokenize=False)
batch = tokenizer(text, add_special_tokens=False, truncation=True, return_tensors='pt')
reward = model(**batch).logits[:, 0]
```

Rewards are centred with `config.reward_mean` = {{ norm.reward_mean }} and `config.reward_std` = \
{{ norm.reward_std }} (measured on the {{ norm.split }} split, {{ norm.n_rows }} responses).
Or run `rmpipe score PATH --input rows.jsonl`.

## Verdict
- evaluation: **{{ evaluation }}** ({{ failed_checks }})
- promotion: **{{ promotion }}**: {{ promotion_reason }}
- export parity: max |reward difference| {{ parity_diff }} vs the trained model on {{ parity_rows }} golden rows \
(stored in `golden.jsonl`), right- and left-padded

## Data
- {{ batches | length }} preference batches: {{ batches | join(', ') }}
- held-out test split by prompt hash: no test prompt was seen in training or model selection
- exact input hashes, params, code version and packages: `lineage.json` (`rmpipe lineage PATH`, `rmpipe verify PATH`)

## Training
- backbone `{{ backbone }}`, max length {{ max_length }} tokens (longer inputs are left-truncated)
- fine-tuning: {{ fine_tuning }}
- train params: `{{ train_params }}`

## Metrics (held-out test split)
- accuracy (strict, a tie is wrong): {{ accuracy }} on {{ n_pairs }} pairs
- Bradley-Terry loss: {{ bt_loss }}; median margin {{ median_margin }}
- calibration ECE: {{ ece }}
- by annotator agreement: {{ by_agreement }}
- by response length: {{ by_length }}

## Pathology checks
- length bias: R^2 of reward vs length {{ length_r2 }} (flag above {{ length.max_r2 }}); \
accuracy where chosen is shorter: {{ length.accuracy_chosen_shorter }}
- unit battery: {{ battery_passed }}/{{ battery.n or 0 }} pairs ordered right (margin > 0)\
{% if battery.failures %}; failed: {{ battery.failures | join(', ') }}{% endif %}
- padding canary: max score change {{ canary }} when batched with other rows or padded left/right

## Intended use
Scoring candidate responses during PPO / best-of-n for prompts like those in the training batches, \
rendered with the stored chat template.

## Limits
- A reward model is a proxy: optimise against it with a KL penalty, and watch for reward hacking.
- It knows only the preferences in its batches; out-of-domain prompts, other languages and long \
conversations beyond the max length are unmeasured.
- Scores are not comparable across exports; centre with this export's stats.
"""


def _by_bucket(table: dict) -> str:
    return "; ".join(f"{k}: {v['accuracy']:.3f} (n={v['n']})" for k, v in table.items())


def fine_tuning(record: dict, params: dict) -> str:
    """Full fine-tuning, or LoRA with its rank and targets (as training recorded them) and where the adapter is."""
    training = record.get("training") or {}
    lora = (training.get("params") or params).get("train", {}).get("lora") or {}
    if not lora.get("r"):
        return "full (every weight trained)"
    counted = (f" ({training['trainable_parameters']:,} of {training['total_parameters']:,} parameters trained)"
               if training.get("trainable_parameters") else "")
    adapter = (record.get("parity") or {}).get("adapter")
    return (f"LoRA r={lora['r']}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')} on "
            f"{', '.join(lora.get('target_modules', []))}{counted}, the reward head in full; the adapters are merged "
            "into these weights, so plain transformers loads the model"
            + (f"; the adapter alone is in `{adapter['folder']}/` (PEFT on `{adapter['base_model']}`, parity "
               f"{adapter['max_abs_diff']:.2e})" if adapter else ""))


def model_card(record: dict, params: dict, metrics: dict, pathology_report: dict, batch_ids: dict) -> str:
    """README.md of the export: what it is, how to load it, data, params, metrics, pathology, intended use, limits."""
    ev, promo, par = record["evaluation"], record["promotion"], record["parity"]
    battery = pathology_report.get("battery", {})
    length = pathology_report.get("length_bias", {})
    model_cfg = params.get("model", {})
    # The hub's metadata: how to load it, and the held-out accuracy as a model-index result.
    held_out = EvalResult(task_type="text-classification", task_name="reward modeling (pairwise preference)",
                          dataset_type="preference-pairs", dataset_name="held-out test split (by prompt hash)",
                          metric_type="accuracy", metric_name="pairwise accuracy (strict, a tie is wrong)",
                          metric_value=float(metrics["accuracy"]))
    data = ModelCardData(library_name="transformers", pipeline_tag="text-classification", model_name=MODEL_NAME,
                         tags=["reward-model", "rlhf", "rmpipe"], metrics=["accuracy"], eval_results=[held_out])
    card = ModelCard.from_template(
        data, template_str=TEMPLATE,
        norm=record["normalization"],
        evaluation="passed" if ev.get("passed") else "FAILED",
        failed_checks=", ".join(k for k, ok in (ev.get("checks") or {}).items() if not ok) or "all checks passed",
        promotion="promoted" if promo["promoted"] else "not promoted", promotion_reason=promo["reason"],
        parity_diff=f"{par['max_abs_diff']:.2e}", parity_rows=par["n_rows"],
        batches=sorted({b for ids in batch_ids.values() for b in ids}),
        backbone=model_cfg.get("backbone"), max_length=model_cfg.get("max_length"),
        train_params=json.dumps(params.get("train", {}), sort_keys=True), fine_tuning=fine_tuning(record, params),
        accuracy=f"{metrics['accuracy']:.4f}", n_pairs=metrics["n_pairs"], bt_loss=f"{metrics['bt_loss']:.4f}",
        median_margin=f"{metrics['margin']['p50']:.3f}", ece=f"{metrics['ece']:.4f}",
        by_agreement=_by_bucket(metrics["accuracy_by_agreement"]), by_length=_by_bucket(metrics["accuracy_by_length"]),
        length=length, length_r2=f"{length.get('r2', float('nan')):.3f}",
        battery=battery, battery_passed=battery.get("n", 0) - battery.get("n_failed", 0),
        canary=f"{metrics['canary_max_abs_diff']:.2e}",
    )
    return str(card).rstrip("\n") + "\n"  # jinja drops the template's last newline
