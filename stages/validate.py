"""DVC stage `validate`: the Great Expectations contract over data/split/ -> reports/validation.json + data docs.

    python -m stages.validate [--params params.yaml]

Any failed expectation is printed as one `FAIL ...` line and the stage exits 1, which
stops `dvc repro` before training. The HTML data docs are written either way.

A split part's suites are memoized under `.rmpipe/memo/validate/` (rmpipe.data.part_memo: keyed by the
part's content sha256, the contract's thresholds and this stage's code closure; sealed, checked on use):
an unchanged part is not checked again, a new one is, and the cross-split checks run over every part.
validation.json is byte for byte what a run without the memo writes.
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
from rmpipe.data.part_memo import PartMemo, stage_code
from rmpipe.data.validate.contract import validate_splits
from rmpipe.data.validate.run import ContractResult, contract_params

log = logging.getLogger("rmpipe.validate")

MEMO_DIR = Path(".rmpipe/memo/validate")
FORMAT = "rmpipe-validate-memo/1"


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths(),
        memo_dir: Path = MEMO_DIR) -> ContractResult:
    params = load_params(params_file)
    contract = contract_params(ValidateSettings.parse(params), AggregateSettings.parse(params).min_votes)
    splits = split_files(paths)  # each split read as GX goes: one part and one chunk of texts at a time
    memo = PartMemo(memo_dir, {"format": FORMAT, "contract": repr(contract), "code": stage_code("stages/validate.py", memo_dir)})
    with io.atomic_dir(paths.data_docs) as docs:
        outcome = validate_splits(splits, contract, docs, memo=memo)
        # GX links Bootstrap, bootstrap-table, jQuery... from CDNs: point the pages at local copies (offline clusters)
        for tag in offline.localize_data_docs(docs):
            log.warning("data docs still load from the network: %s", tag)
    io.write_json(paths.validation_report, outcome.summary())
    memo.finish("validate")
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
