"""DVC stage `validate`: the Great Expectations contract over data/split/ -> reports/validation.json + data docs.

    python -m stages.validate [--params params.yaml]

Any failed expectation is printed as one `FAIL ...` line and the stage exits 1, which
stops `dvc repro` before training. The HTML data docs are written either way.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rmpipe.audit import offline
from rmpipe.core import io
from rmpipe.core.errors import ValidationFailed
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, split_files
from rmpipe.core.settings import AggregateSettings, ValidateSettings
from rmpipe.core.stage import stage_main
from rmpipe.data.validate.run import ContractResult, contract_params, validate_splits

log = logging.getLogger("rmpipe.validate")


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> ContractResult:
    params = load_params(params_file)
    contract = contract_params(ValidateSettings.parse(params), AggregateSettings.parse(params).min_votes)
    splits = split_files(paths)  # each split read as GX goes: one chunk of texts in memory at a time
    with io.atomic_dir(paths.data_docs) as docs:
        outcome = validate_splits(splits, contract, docs)
        # GX links Bootstrap, bootstrap-table, jQuery... from CDNs: point the pages at local copies (offline clusters)
        for tag in offline.localize_data_docs(docs):
            log.warning("data docs still load from the network: %s", tag)
    io.write_json(paths.validation_report, outcome.summary())
    log.info("%d expectations, %d failed; data docs: %s", outcome.n_expectations, len(outcome.failures),
             paths.data_docs / "index.html")
    if not outcome.success:
        for line in outcome.failures:
            print(line, file=sys.stderr, flush=True)
        raise ValidationFailed(
            f"{len(outcome.failures)} of {outcome.n_expectations} expectations failed; "
            f"details in {paths.data_docs / 'index.html'}"
        )
    return outcome


main = stage_main("validate", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
