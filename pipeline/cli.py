"""The `rmpipe` command. Sub-commands import their heavy dependencies lazily so `rmpipe --help` is instant."""

from __future__ import annotations

import argparse
import sys

from rmpipe.core.errors import exits_cleanly
from rmpipe.core.progress import setup_logging
from rmpipe.core.params import PARAMS_FILE


def _sample_data(args: argparse.Namespace) -> None:
    from rmpipe.core.params import load_params, section
    from rmpipe.data.sample.batches import write_sample_batches

    cfg = section(load_params(args.params), "sample_data")
    if args.seed is not None:
        cfg = {**cfg, "seed": args.seed}
    if args.n_pairs is not None:
        cfg = {**cfg, "n_pairs": args.n_pairs}
    for path in write_sample_batches(args.out, cfg):
        print(path)


def _import(args: argparse.Namespace) -> None:
    import json

    from rmpipe.data.collect.hf_batches import import_dataset

    path, source = import_dataset(args.dataset_id, args.split, args.revision, args.out, args.name)
    print(path)
    print(json.dumps({k: source[k] for k in ("dataset_id", "split", "revision", "resolved_revision", "rows")}))


def _lineage(args: argparse.Namespace) -> None:
    from rmpipe.audit.lineage import describe, read_manifest

    print(describe(read_manifest(args.path)))


def _verify(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.core.errors import ValidationFailed
    from rmpipe.audit.lineage import verify_export

    # Inside the project (dvc.yaml here), the recorded inputs are re-hashed too.
    root = Path(".") if Path("dvc.yaml").exists() and not args.export_only else None
    problems = verify_export(Path(args.path), root)
    for line in problems:
        print(line)
    if problems:
        raise ValidationFailed(f"{len(problems)} mismatch(es) in {args.path}")
    print(f"ok: every file of {args.path}" + (" and every recorded input present here" if root else "") + " matches its manifest")


def _score(args: argparse.Namespace) -> None:
    import json

    from rmpipe.core import io
    from rmpipe.export.score import score_file

    rows = score_file(args.path, args.input, args.batch_size)
    if args.output:
        io.write_jsonl(args.output, rows)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))


def _require_space_for_prefect() -> None:
    """A full disk under Prefect's database stops here, in one line (see prefect_env.require_space)."""
    from pipeline import prefect_env

    prefect_env.configure()
    prefect_env.require_space()


def _rebuild(args: argparse.Namespace) -> None:
    import json

    from pipeline.orphans import tie_descendants_to_this_process

    tie_descendants_to_this_process()  # first: Prefect's temporary server must not outlive a killed command
    _require_space_for_prefect()
    from pipeline.flows import rebuild

    result = rebuild(targets=args.targets, set_params=args.set, force=args.force)
    print(json.dumps(result, indent=2))


def _on_new_batch(args: argparse.Namespace) -> None:
    import json

    from pipeline.orphans import tie_descendants_to_this_process

    tie_descendants_to_this_process()  # first: Prefect's temporary server must not outlive a killed command
    _require_space_for_prefect()
    from pipeline.flows import on_new_batch

    summary = on_new_batch(batch_path=args.path)
    print(json.dumps(summary, indent=2, default=str))


def _serve(args: argparse.Namespace) -> None:
    from pipeline.service import serve

    serve()


def _watch(args: argparse.Namespace) -> None:
    from pipeline.service import announce_batch, require_server
    from pipeline.watch import watch

    require_server()
    watch(args.dir, announce_batch, interval_s=args.interval, state_file=args.state)


def _sample_pairs(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.core.params import load_params, section
    from rmpipe.model.sampling import sample_pairs_file
    from rmpipe.core.settings import ModelSettings, SamplingSettings

    params = load_params(args.params)
    overrides = {key: getattr(args, key) for key in ("n_completions", "seed", "max_new_tokens")
                 if getattr(args, key) is not None}
    sampling = SamplingSettings.from_section({**section(params, "sampling"), **overrides})
    backbone = {"backbone": args.backbone} if args.backbone else {}
    model = ModelSettings.from_section({**section(params, "model"), **backbone})
    out = args.out or f"data/tasks/{Path(args.prompts).stem}.tasks.jsonl"
    sample_pairs_file(args.prompts, out, model, sampling, groups=args.groups)
    print(out)


def _deps(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.core.codedeps import drift, unchecked, write_deps
    from rmpipe.core.errors import ConfigError, ValidationFailed

    dvc_yaml = Path(args.dvc_yaml)
    if not dvc_yaml.exists():
        raise ConfigError(f"{dvc_yaml} not found: run from the project root (where dvc.yaml is)")
    changed = drift(dvc_yaml) if args.check else write_deps(dvc_yaml)
    for stage, why in unchecked(dvc_yaml).items():  # never skipped in silence: list its code deps by hand
        print(f"{stage}: not checked ({why}): list the code it runs as deps by hand")
    for stage, (missing, extra) in changed.items():
        print(f"{stage}: " + "; ".join(f"{word} {', '.join(paths)}"
                                        for word, paths in (("missing", missing), ("extra", extra)) if paths))
    if args.check and changed:
        raise ValidationFailed(f"{dvc_yaml}: code deps of {len(changed)} stage(s) differ from their imports; "
                               "run `rmpipe deps` to rewrite them")
    print(f"ok: {dvc_yaml} code deps match the stages' imports" if args.check or not changed
          else f"rewrote the code deps of {len(changed)} stage(s) in {dvc_yaml}")


def _trace(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.audit.trace import raise_if_damaged, render, to_json, trace

    result = trace(Path("."), batch=args.batch, annotator=args.annotator)
    print(to_json(result) if args.json else render(result), flush=True)
    raise_if_damaged(result)


def _retract(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.core.errors import UserError
    from pipeline.retract import render, retract_annotator, retract_batch, to_json

    if (args.batch is None) == (args.annotator is None):
        raise UserError("retract needs exactly one of --batch NAME or --annotator ID")
    if args.annotator is not None and args.purge:
        raise UserError("--purge deletes a batch file and its cache objects; an annotator's votes are left out "
                        "through params (aggregate.exclude_annotators), nothing to purge")
    if args.batch is not None:
        outcome = retract_batch(Path("."), args.batch, args.reason, by=args.by, purge=args.purge)
    else:
        outcome = retract_annotator(Path("."), args.annotator, args.reason, by=args.by)
    print(to_json(outcome) if args.json else render(outcome))


def _history(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from rmpipe.audit import history
    from rmpipe.core.errors import ValidationFailed

    if args.share is not None:
        from rmpipe.audit.chain import share

        for command in share(Path("."), args.share):
            print(command)
        return
    if args.verify:
        n, problem, where = history.verify(Path("."))
        if problem:
            raise ValidationFailed(f"history ({where}): {problem}")
        print(f"ok: {n} record(s) in {where}, each chained to the one before it")
        return
    rows = history.records(Path("."))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    print(f"# {len(rows)} record(s) in {history.location(Path('.'))}")
    for row in rows:
        print(history.describe(row))


def _register(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.audit.registry import register_export
    from rmpipe.core.params import load_params
    from rmpipe.core.settings import ExportSettings

    export = ExportSettings.parse(load_params(Path(PARAMS_FILE)))
    result = register_export(Path("."), export.out_dir, args.trigger)
    if "note" in result:
        print(result["note"])
    else:
        print(f"{result['tag']} ({'new' if result['new'] else 'already registered'}) on commit "
              f"{result['commit'][:12]}; stage: {result['stage'] or 'none'}")


def _report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rmpipe.audit.report import write_report

    print(write_report(Path("."), Path(args.out)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmpipe", description=__doc__)
    parser.add_argument("--params", default=PARAMS_FILE, help=f"params file (default: {PARAMS_FILE})")
    sub = parser.add_subparsers(dest="command", required=True)
    _data_commands(sub)
    _model_commands(sub)
    _flow_commands(sub)
    _audit_commands(sub)
    from pipeline.annotate import add_commands

    add_commands(sub)  # rmpipe annotate server|push|pull|run|serve (Label Studio)
    return parser


def _data_commands(sub) -> None:
    """Preference data in: the bundled sample, SFT samples to annotate, a Hugging Face dataset."""
    p = sub.add_parser("sample-data", help="write the bundled default preference batches")
    p.add_argument("--out", default="data/incoming", help="folder to write batches into")
    p.add_argument("--seed", type=int, default=None, help="override sample_data.seed")
    p.add_argument("--n-pairs", type=int, default=None, help="override sample_data.n_pairs")
    p.set_defaults(func=_sample_data)

    p = sub.add_parser("sample-pairs", help="sample SFT completions for prompts and write A/B annotation tasks")
    p.add_argument("prompts", help=".jsonl with a 'prompt' field (text or chat messages), or .txt with one prompt per line")
    p.add_argument("--out", default=None, help="tasks JSONL (default: data/tasks/<prompts name>.tasks.jsonl)")
    p.add_argument("--backbone", default=None, help="override model.backbone: tiny, smollm2-135m-instruct, a folder or hub id")
    p.add_argument("--n-completions", type=int, default=None, help="override sampling.n_completions")
    p.add_argument("--seed", type=int, default=None, help="override sampling.seed")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override sampling.max_new_tokens")
    p.add_argument("--groups", action="store_true",
                   help="one ranking task per prompt (prompt + its K responses) instead of A/B pairs")
    p.set_defaults(func=_sample_pairs)

    p = sub.add_parser("import", help="one split of a Hugging Face dataset -> a batch in data/incoming (+ its source record)")
    p.add_argument("dataset_id", help="hub id (owner/name; needs network) or a local dataset folder")
    p.add_argument("--split", default="train", help="split to import (default: train)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default: the main branch)")
    p.add_argument("--out", default="data/incoming", help="folder to write the batch into")
    p.add_argument("--name", default=None, help="batch file name without .parquet (default: <owner>__<name>-<split>)")
    p.set_defaults(func=_import)


def _model_commands(sub) -> None:
    """An export read, checked and used; the stages' code deps."""
    p = sub.add_parser("lineage", help="print an export's lineage manifest readably")
    p.add_argument("path", help="export folder (e.g. models/export)")
    p.set_defaults(func=_lineage)

    p = sub.add_parser("verify", help="re-hash an export and its recorded inputs; non-zero exit on any mismatch")
    p.add_argument("path", help="export folder (e.g. models/export)")
    p.add_argument("--export-only", action="store_true", help="check the export's files only, not the project inputs")
    p.set_defaults(func=_verify)

    p = sub.add_parser("score", help="score prompt/response rows with an exported model (plain transformers)")
    p.add_argument("path", help="export folder (e.g. models/export)")
    p.add_argument("--input", required=True, help="JSONL: prompt + response, or prompt + chosen + rejected")
    p.add_argument("--output", default=None, help="JSONL to write (default: print to stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_score)

    p = sub.add_parser("deps", help="write each stage's code deps in dvc.yaml from its imports (--check: only compare)")
    p.add_argument("--check", action="store_true", help="change nothing; exit non-zero naming each stage's missing/extra code deps")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="pipeline file (default: dvc.yaml)")
    p.set_defaults(func=_deps)


def _flow_commands(sub) -> None:
    """The pipeline run through DVC and Prefect: by hand, per delivered batch, as a service."""
    p = sub.add_parser("rebuild", help="run the pipeline through DVC (dvc repro) as a Prefect flow")
    p.add_argument("targets", nargs="*", help="dvc.yaml stages to bring up to date (default: all)")
    p.add_argument("-S", "--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="override a param via `dvc exp run -S` (recorded in params.yaml and dvc.lock)")
    p.add_argument("--force", action="store_true", help="re-run stages even if DVC finds them up to date")
    p.set_defaults(func=_rebuild)

    p = sub.add_parser("on-new-batch", help="check, register and train on one delivered batch file (a Prefect flow)")
    p.add_argument("path", help="the batch file (.jsonl, .csv or .parquet); its file name is its batch id")
    p.set_defaults(func=_on_new_batch)

    p = sub.add_parser("serve", help="serve the event-triggered on-new-batch deployment (needs PREFECT_API_URL)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("watch", help="announce each new complete batch file in DIR to the Prefect server")
    p.add_argument("dir", help="delivery folder to watch")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--state", default=None, help="state file of announced files (default: DIR/.rmpipe-watch.json)")
    p.set_defaults(func=_watch)


def _audit_commands(sub) -> None:
    """Where a batch or an annotator went, taking one out, and the audit page."""
    p = sub.add_parser("trace", help="every recorded model a batch or an annotator reached, and the pairs it decided")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--batch", default=None, help="batch id (its file name)")
    who.add_argument("--annotator", default=None, help="annotator id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_trace)

    p = sub.add_parser("retract", help="take a batch or an annotator out, rebuild through DVC, record why and what changed")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--batch", default=None, help="batch id in data/incoming (moved to data/retracted)")
    who.add_argument("--annotator", default=None, help="annotator id (added to aggregate.exclude_annotators)")
    p.add_argument("--reason", required=True, help="why (recorded, and the reason a re-delivery is refused)")
    p.add_argument("--by", default=None, help="who asked (default: the current user)")
    p.add_argument("--purge", action="store_true",
                   help="also delete the batch file and its DVC cache objects (recording their hashes); "
                        "on an already retracted batch: purge only")
    p.add_argument("--json", action="store_true", help="print the outcome record as JSON")
    p.set_defaults(func=_retract)

    p = sub.add_parser("history", help="every model built and every retraction, from the hash-chained audit history")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="print the records as JSON")
    what.add_argument("--verify", action="store_true",
                      help="check the chain; non-zero exit naming the first record altered, removed or reordered")
    what.add_argument("--share", metavar="REMOTE", nargs="?", const="origin", default=None,
                      help="have `git fetch REMOTE` bring the team's history too; prints the push command")
    p.set_defaults(func=_history)

    p = sub.add_parser("register", help="register the current export as a reward-model version in GTO (once; "
                                        "prod when its gate promoted it)")
    p.add_argument("--trigger", default="dvc repro", help="what built it (recorded in the tag message)")
    p.set_defaults(func=_register)

    p = sub.add_parser("report", help="write the audit report: one self-contained HTML page")
    p.add_argument("--out", default="reports/audit.html", help="HTML file to write (default: reports/audit.html)")
    p.set_defaults(func=_report)


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
