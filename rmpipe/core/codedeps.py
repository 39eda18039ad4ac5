"""Each stage's code, computed from its imports: the one truth behind dvc.yaml's code deps, the
trainer's resume fingerprint and the tokenized-cache key.

From `stages/<name>.py`, every import of a project module (rmpipe/, stages/, pipeline/) is followed
transitively: `import rmpipe.x`, `from rmpipe import x`, `from rmpipe.x import y`, relative imports,
`importlib.import_module("literal")`, and imports inside functions (a lazy import runs on the stage's
code path all the same). Only `if TYPE_CHECKING:` blocks are skipped: they never run.

A stage's deps also include the files its params name (`PARAM_FILE_DEPS`: the JSON in
`train.deepspeed_config`), marked in dvc.yaml with the comment `PARAM_DEP_MARK` so the generator knows
them as its own when the param changes.

`rmpipe deps` writes the result into dvc.yaml; `rmpipe deps --check` (and tests/test_codedeps.py)
fails when dvc.yaml and the imports differ; every rebuild runs the same check first (`stale_line`).
Every stage form dvc.yaml allows is read: a `cmd` list, `foreach`/`do` and `matrix` stages. A command
that is not `python -m stages.<name>` runs code the generator cannot follow: `unchecked` names it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path

import yaml

from rmpipe.core.io import sha256_file

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rmpipe", "stages", "pipeline")

# The one list of modules left out of every stage's code deps. Each is here because editing it cannot
# change a stage's outputs, only what is printed; its own imports are still followed. A module that
# touches any value written to an output (io's writers, params parsing, ...) does not belong here.
UNRECORDED = {
    "rmpipe/__init__.py": "a docstring and __version__, which no stage reads",
    "stages/__init__.py": "a docstring",
    "pipeline/__init__.py": "a docstring",
    "rmpipe/core/errors.py": "exception classes and the wrapper that turns them into a message and an exit code",
    "rmpipe/core/progress.py": "log format and progress reporting; progress() yields its items unchanged",
}


def _package_marker(path: Path) -> bool:
    """An `__init__.py` holding a docstring only: importing it runs nothing, so it is no code dep
    (one that gains a statement becomes a dep of every stage that imports through it)."""
    if path.name != "__init__.py":
        return False
    body = _parsed(path).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _version(path: Path) -> tuple[Path, int, int]:
    """A file version's key for the caches below: the nine stages' closures share most files, and
    `rmpipe deps --check` (run before every rebuild) parsed each of them ~9 times."""
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


def _parsed(path: Path) -> ast.Module:
    return _parse(*_version(path))


@functools.lru_cache(maxsize=1024)
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@functools.lru_cache(maxsize=1024)
def _imports_of(path: Path, mtime_ns: int, size: int, package: str) -> frozenset[str]:
    return frozenset(_imported_names(_parse(path, mtime_ns, size), package))


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module `name` ("rmpipe.model.batching"), or None for anything else."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Dotted names a module imports (for `from a import b`: both a and a.b, b may be a submodule)."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            names.add(base_name)
            names.update(f"{base_name}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            names.add(node.args[0].value)
        stack.extend(ast.iter_child_nodes(node))
    return names


def closure(entry: str | Path, root: Path = ROOT) -> list[str]:
    """Project files the module at `entry` runs, as root-relative paths: `entry` first, then sorted."""
    root = Path(root)
    start = root / entry
    seen = walk(entry, root)
    files = {p.relative_to(root).as_posix() for p in seen if not _package_marker(p)} - set(UNRECORDED)
    first = start.relative_to(root).as_posix()
    return [first] + sorted(files - {first})


def walk(entry: str | Path, root: Path = ROOT) -> set[Path]:
    """Every project file the import walk from `entry` reads (package markers and UNRECORDED files included)."""
    root = Path(root)
    start = root / entry
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imports_of(*_version(path), package):
            parts = imported.split(".")
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            for i in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:i]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def code_digest(entry: str | Path, root: Path = ROOT) -> dict[str, str]:
    """sha256 of each file in `entry`'s closure: what a fingerprint or cache key records of the code."""
    return {rel: sha256_file(Path(root) / rel) for rel in closure(entry, root)}


def code_hash(entry: str | Path, root: Path = ROOT) -> str:
    blob = "".join(f"{rel}\x1f{digest}\n" for rel, digest in code_digest(entry, root).items())
    return hashlib.sha256(blob.encode()).hexdigest()


# --- dvc.yaml ---------------------------------------------------------------------------------
# Params that name a file whose contents change a stage's outputs, per stage entry module: the file is a dep.
PARAM_FILE_DEPS = {"stages/train.py": ("train.deepspeed_config",)}
PARAM_DEP_MARK = "from params by rmpipe deps"  # the comment on such a dep in dvc.yaml: the generator's own
STAGE_MODULE = re.compile(r"-m\s+(stages\.[\w.${}]+)")


def is_code_dep(dep: str) -> bool:
    """A dvc.yaml dep that names project code (the ones `rmpipe deps` owns); the rest is data."""
    return dep.endswith(".py") and dep.split("/", 1)[0] in PACKAGES


def stage_body(stage: dict) -> dict:
    """Where a stage's cmd and deps are: in `do` for a foreach stage, else in the stage itself (matrix too)."""
    body = stage.get("do") if "foreach" in stage else stage
    return body if isinstance(body, dict) else {}


def _commands(stage: dict) -> list[str]:
    cmd = stage_body(stage).get("cmd", "")
    return [str(c) for c in cmd] if isinstance(cmd, list) else [str(cmd)]


def stage_entries(stage: dict, root: Path) -> tuple[list[str], list[str]]:
    """(`stages/<name>.py` of every `python -m stages.<name>` the stage runs, why any part cannot be followed)."""
    entries, unfollowed = [], []
    for command in _commands(stage):
        modules = STAGE_MODULE.findall(command)
        if not modules:
            unfollowed.append(f"its command `{command}` is not `python -m stages.<name>`")
        rest = STAGE_MODULE.sub("", command)
        if modules and re.search(r"(^|[\s;&|(])(python3?[\d.]*|sh|bash|\./)\s*\S*\.(py|sh)\b", rest):
            unfollowed.append(f"its command `{command}` also runs a script the generator cannot follow")
        for module in modules:
            entry = module.replace(".", "/") + ".py"
            if "$" in module:
                unfollowed.append(f"its module `{module}` is templated")
            elif not (root / entry).is_file():
                unfollowed.append(f"it runs `{module}`, which is not a file under {root}")
            else:
                entries.append(entry)
    return entries, unfollowed


def _stages(dvc_yaml: Path) -> dict:
    return (yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}).get("stages") or {}


def param_file_deps(stage: dict, root: Path, entries: list[str]) -> list[str]:
    """The files the stage's params name (PARAM_FILE_DEPS), read from the params.yaml beside dvc.yaml."""
    keys = [key for entry in entries for key in PARAM_FILE_DEPS.get(entry, ())]
    if not keys:
        return []
    params = root / "params.yaml"
    values = (yaml.safe_load(params.read_text(encoding="utf-8")) or {}) if params.is_file() else {}
    found = []
    for key in keys:
        value = values
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value and value not in found:
            found.append(value)
    return found


def wanted_deps(dvc_yaml: Path, with_params: bool = False) -> dict[str, list[str]]:
    """Per stage of `dvc_yaml` that runs a stage module: the code deps its imports call for (`with_params`: then
    the files its params name)."""
    root = Path(dvc_yaml).parent
    wanted = {}
    for name, stage in _stages(dvc_yaml).items():
        entries = stage_entries(stage, root)[0]
        if entries:
            code = closure(entries[0], root)
            code += sorted({rel for entry in entries[1:] for rel in closure(entry, root)} - set(code))
            wanted[name] = code + (param_file_deps(stage, root, entries) if with_params else [])
    return wanted


def unchecked(dvc_yaml: Path) -> dict[str, str]:
    """Per stage whose code `rmpipe deps` cannot (fully) follow: why. Its code deps are the user's to list."""
    root = Path(dvc_yaml).parent
    return {name: "; ".join(why) for name, stage in _stages(dvc_yaml).items()
            if (why := stage_entries(stage, root)[1])}


def _dep_name(dep) -> str:
    """A dvc.yaml dep's path (a dep is a path, or a one-key mapping of path -> options)."""
    return dep if isinstance(dep, str) else next(iter(dep))


def _comment_text(token) -> str:
    """The text of a ruamel comment entry (a token, or nested lists of tokens)."""
    if isinstance(token, list):
        return " ".join(_comment_text(t) for t in token if t is not None)
    return str(getattr(token, "value", "") or "")


def _owned(deps) -> list[str]:
    """The deps of a round-trip-loaded list that `rmpipe deps` writes: code deps and marked param-file deps."""
    items = getattr(getattr(deps, "ca", None), "items", {})
    return [_dep_name(d) for i, d in enumerate(deps or [])
            if is_code_dep(_dep_name(d)) or PARAM_DEP_MARK in _comment_text(items.get(i))]


def drift(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage whose generated dvc.yaml deps differ from its imports and param files: (missing, extra)."""
    doc = _round_trip_yaml().load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    stages = doc.get("stages") or {}
    out = {}
    for name, wanted in wanted_deps(dvc_yaml, with_params=True).items():
        listed = set(_owned(stage_body(stages[name]).get("deps")))
        missing, extra = sorted(set(wanted) - listed, key=wanted.index), sorted(listed - set(wanted))
        if missing or extra:
            out[name] = (missing, extra)
    return out


def stale_line(dvc_yaml: Path) -> str | None:
    """One line naming each stage whose dvc.yaml deps are stale and what to run, or None when none is."""
    changed = drift(dvc_yaml)
    if not changed:
        return None
    what = "; ".join(f"stage {name}: " + ", ".join(f"{word} {' '.join(paths)}" for word, paths in
                                                    (("missing", missing), ("extra", extra)) if paths)
                     for name, (missing, extra) in changed.items())
    return f"{dvc_yaml} is stale ({what}): run `rmpipe deps` to rewrite it, then rebuild"


def _round_trip_yaml():
    """ruamel.yaml in round-trip mode, set to dvc.yaml's layout: loading and dumping an unchanged file
    gives back the same text (comments, quotes, blank lines and order kept)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096
    return rt


def rewrite(text: str, wanted: dict[str, list[str]]) -> str:
    """dvc.yaml text with each stage's generated deps replaced by `wanted[stage]`, placed first in its deps.

    A round-trip YAML edit: data deps, comments and layout stay as they are; a comment after a code dep
    that is still wanted stays with it, and what trails the list (blank lines, the next key's comment)
    stays at its end. A param-file dep (not project code) is written with the PARAM_DEP_MARK comment.
    """
    import io

    rt = _round_trip_yaml()
    doc = rt.load(text)
    for name, stage in (doc.get("stages") or {}).items():
        deps = stage_body(stage).get("deps") if name in wanted else None
        if deps is None:
            continue
        owned = set(_owned(deps))
        comments = {_dep_name(d): deps.ca.items.get(i) for i, d in enumerate(deps)}
        trailing = deps.ca.items.get(len(deps) - 1)
        new = list(wanted[name]) + [d for d in deps if _dep_name(d) not in owned]
        deps.ca.items.clear()
        del deps[:]
        for i, dep in enumerate(new):
            deps.append(dep)
            comment = trailing if i == len(new) - 1 else comments.get(_dep_name(dep))
            if comment is not None and (i == len(new) - 1 or comment is not trailing):
                deps.ca.items[i] = comment
            elif not is_code_dep(_dep_name(dep)) and dep in wanted[name]:
                deps.yaml_add_eol_comment(f"# {PARAM_DEP_MARK}", i, column=0)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def write_deps(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Rewrite `dvc_yaml`'s code deps from the imports; returns what changed (as `drift` would have)."""
    dvc_yaml = Path(dvc_yaml)
    changed = drift(dvc_yaml)
    if changed:
        text = dvc_yaml.read_text(encoding="utf-8")
        dvc_yaml.write_text(rewrite(text, wanted_deps(dvc_yaml, with_params=True)), encoding="utf-8")
    return changed
