"""DVC stage `evaluate`: trained reward model + held-out test split -> metrics, pathology report, plots.

    python -m stages.evaluate [--params params.yaml]

Writes metrics/eval.json (the headline DVC metrics), reports/eval.json (every figure),
reports/pathology.json, reports/eval.md and plots/eval/*.csv. The verdict (`passed`) is
recorded either way; the export stage's promotion gate reads it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rmpipe.core import io
from rmpipe.core.errors import DataError
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, read_splits
from rmpipe.core.settings import EvalSettings, ModelSettings
from rmpipe.core.stage import stage_main
from rmpipe.evaluation.evaluate import evaluate_model, headline, load_checkpoint
from rmpipe.evaluation.pathology import load_battery

log = logging.getLogger("rmpipe.evaluate")


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    params = load_params(params_file)
    settings, model_settings = EvalSettings.parse(params), ModelSettings.parse(params)
    splits = read_splits(paths, ("test", "val"))
    test, val = splits["test"], splits["val"]
    if test.empty:
        raise DataError(f"{paths.split('test')} has no pairs: nothing held out to evaluate on")
    battery = load_battery(settings.battery_file)
    model, tokenizer = load_checkpoint(paths.model_dir, model_settings.trust_remote_code)  # the code training ran with

    result = evaluate_model(model, tokenizer, test, val, battery, settings, model_settings.max_length)

    io.write_json(paths.eval_report, result.metrics)
    io.write_json(paths.eval_metrics, headline(result.metrics))
    io.write_json(paths.pathology, result.pathology)
    io.write_text(paths.eval_summary, result.summary)
    for name, table in result.plots.items():
        with io.atomic_path(paths.eval_plots / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)

    m = result.metrics
    log.info("accuracy %.4f (95%% CI %.4f-%.4f) on %d test pairs, BT loss %.4f, ECE %.4f, length R^2 %.3f",
             m["accuracy"], m["accuracy_ci_low"], m["accuracy_ci_high"], m["n_pairs"], m["bt_loss"], m["ece"], m["length_r2"])
    for name in result.pathology["battery"]["failures"]:
        log.warning("battery pair failed: %s", name)
    failed = [name for name, ok in m["checks"].items() if not ok]
    log.info("verdict: %s%s", "PASSED" if m["passed"] else "FAILED", f" ({', '.join(failed)})" if failed else "")
    return m


main = stage_main("evaluate", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
