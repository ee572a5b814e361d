"""Every path of a run comes from RunLayout (trinityx_ds/storage/layout.py): no other module of the
package, no Slurm template or script and no tool spells a run's sub-paths (issue 29 item 3).
Two spellings of one folder drift apart: `trinityx eval` wrote <run>/eval/<variant> while the Slurm
pipeline passed `--out <run>/eval`.

What counts as spelling a path (patterns meant to catch path use, not the words):
  Python (string literals, docstrings excepted)
    - a run's folder or file name as a path part: an operand of `/`, or an argument of
      Path(), joinpath(), os.path.join(), glob(), rglob(), with_name()      run / "stage1"
    - a path-shaped piece of a string: `stage1`, `stage2`, `stage*` or `checkpoints` joined to
      a slash on either side, any other name of the run after a slash, or `slurm/logs`
                                                                          f"{run}/stage2/router.safetensors"
  shell (slurm/*.sbatch, slurm/*.sh; comments excepted, #SBATCH lines kept)
    - the same path-shaped pieces, and the weight files' names anywhere   "$RUN_DIR/stage1/$EXPERT"
A word alone is not a path: the CLI's `eval` subcommand, the config's `train.stage1` section, the
Slurm job `experts`, a module named eval/judge.py.

A failure names file:line and the spelling for each.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "trinityx_ds" / "storage" / "layout.py"

# The names of a run's folders and files: RunLayout's (test_names_are_layouts checks that
# storage/layout.py spells each). Distinctive ones are a path on either side of a slash.
DISTINCT = ("stage1", "stage2", "checkpoints")
NAMES = (*DISTINCT, "experts", "hf", "eval", "slurm", "logs", "tensorboard", "imported", "models", "tiny-llama",
         "eval_data", "hhh_heldout")
# (not parity.json, the demo's check of its backbone: eval/parity.py names its own temporary file so)
FILES = ("expert.safetensors", "router.safetensors", "validation.json", "metrics.jsonl", "hhh_heldout.json")


def _alt(names) -> str:
    return "|".join(re.escape(n) for n in names)


_SEG = _alt(DISTINCT) + r"|stage\*"
_TAIL = r"(?![\w.-])"  # the name ends there: /eval, /eval/, not /evaluate nor /eval.py
PATH_PIECES = re.compile(
    rf"(?:^|[^\w.-])(?:{_SEG})/"              # stage1/...  checkpoints/
    rf"|/(?:{_SEG}|{_alt(NAMES)}|{_alt(FILES)}){_TAIL}"  # .../stage2  {run}/hf  {dir}/expert.safetensors
    r"|(?:^|[^\w.-])slurm/logs" + _TAIL)
SHELL_FILES = re.compile(_alt(FILES[:2]))
PATH_CALLS = {"Path", "PurePath", "joinpath", "join", "glob", "rglob", "with_name"}
NOT_A_PATH = re.compile(r"trinityx_ds/|\.py\b")  # a module of the package named in a message


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _line_of(lines: list[str], node: ast.AST, needle: str) -> int:
    """The line of `needle` inside `node` (an f-string's pieces carry the line where it starts)."""
    for n in range(node.lineno, (node.end_lineno or node.lineno) + 1):
        if needle in lines[n - 1]:
            return n
    return node.lineno


def python_spellings(text: str, name: str = "<text>") -> list[tuple[int, str]]:
    """(line, spelling) of every run path spelled in Python source `text`."""
    tree = ast.parse(text, name)
    lines, docs, out = text.splitlines(), _docstrings(tree), []
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docs:
            continue
        parent = parents.get(id(node))
        if node.value in (*NAMES, *FILES) and (
                isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)
                or isinstance(parent, ast.Call) and node in parent.args and _call_name(parent) in PATH_CALLS):
            out.append((_line_of(lines, node, f'"{node.value}"'), repr(node.value)))
            continue
        for token in node.value.split():
            if PATH_PIECES.search(token) and not NOT_A_PATH.search(token):
                out.append((_line_of(lines, node, token), repr(token)))
    return sorted(set(out))


def shell_spellings(text: str) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith("#SBATCH"):
            line = re.sub(r"(^|\s)#.*", "", line)  # a comment (`${#a[@]}` and `$#` have no space before)
        for token in line.split():
            if PATH_PIECES.search(token) or SHELL_FILES.search(token):
                out.append((n, token))
    return out


def _files() -> list[Path]:
    package = [p for p in sorted((ROOT / "trinityx_ds").rglob("*.py")) if p != LAYOUT]
    slurm = sorted(p for p in (ROOT / "slurm").iterdir() if p.suffix in (".sbatch", ".sh"))
    return package + slurm + sorted((ROOT / "tools").glob("*.py"))


def spellings(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return python_spellings(text, str(path)) if path.suffix == ".py" else shell_spellings(text)


def test_no_run_path_is_spelled_outside_the_layout():
    bad = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in _files()
           for line, what in spellings(path)]
    assert not bad, (f"{len(bad)} spelling(s) of a run's paths outside storage/layout.py "
                     "(ask RunLayout, or render the path into the template):\n  " + "\n  ".join(bad))


def test_names_are_layouts():
    """The names looked for are the ones storage/layout.py gives a run's folders and files."""
    tree = ast.parse(LAYOUT.read_text(encoding="utf-8"))
    spelled = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert set(NAMES + FILES) <= spelled, sorted(set(NAMES + FILES) - spelled)


@pytest.mark.parametrize("source", [
    'run / "stage1" / name', 'Path(run, "hf")', 'os.path.join(run, "eval")', 'out / "hhh_heldout.json"',
    'f"{run}/stage2/router.safetensors"', 'f"{e}/expert.safetensors (run it first)"', 'out / "validation.json"',
    'p.glob("*/checkpoints")', 'Path("out/stage1/harm")', 'f"{out}/stage*/.../checkpoints"', 'x / "metrics.jsonl"',
    'help="report folder [RUN/eval/<variant>]"', 'x = "slurm/logs"',
])
def test_python_path_spellings_are_found(source):
    assert python_spellings(source), source


@pytest.mark.parametrize("source", [
    'sub.add_parser("eval")', 'cfg["train"]["stage1"]', 'for s in ("stage1", "stage2"): pass',
    'JOBS = ("experts", "router", "export", "eval")', 'help="see eval/judge.make_judge"',
    'x = "trinityx_ds/eval/heldout.py"', 'data_dir("slurm")', 'ROUTER = "router.safetensors"',
    'def f():\n    """Writes <run>/stage2/router.safetensors."""\n', 'run / "evaluation"',
])
def test_python_words_are_not_paths(source):
    assert not python_spellings(source), source


def test_shell_spellings():
    script = ('train_stage "$RUN_DIR/stage1/$EXPERT/expert.safetensors" "$RUN_DIR/stage1/$EXPERT/checkpoints"\n'
              'run_tasks 2 trinityx_ds.cli eval --checkpoint "$RUN_DIR" --out "$EVAL_DIR"\n'
              '# export HF_HOME=/shared/cache/hf\n'
              'train_stage "$RUN_DIR/stage2/router.safetensors" x  # done file\n'
              '#SBATCH --output=/run/slurm/logs/%x.out\n')
    assert [n for n, _ in shell_spellings(script)] == [1, 1, 4, 5]
