"""The README and docs/ say what the code does: links resolve, modules exist, command lines compose.

- Every relative link of README.md and docs/*.md (outside code) names a file or directory that exists; a link with
  a ``#anchor`` into a Markdown page names one of its headings (GitHub's slugs).
- Every ``python -m framework.X`` shown anywhere (prose, tables, code) is a runnable module.
- Every command line of a Hydra entry point (``framework.train|generate|serve|eval|compress|prepare|export|plan``),
  reached as ``python -m``, ``torchrun ... -m``, ``framework/X.py`` (the deepspeed launcher), ``launch/torchrun.sh X``
  / ``launch/deepspeed.sh X`` or ``launch/slurm/X.sbatch``, in a ```bash block or an inline code span, is run once
  with ``--cfg job``: Hydra composes the config and prints it without running anything, so a key that does not
  exist, a group option that does not exist or a value of the wrong type fails (exit 1). The rules: continuation
  lines are joined and ``#`` comments dropped (shell quoting as bash reads it, ``shlex``); arguments stop at ``&``,
  ``|``, ``;`` or a redirection; only ``key=value`` arguments are passed; a value holding a shell placeholder
  (``<...>``, ``$VAR``, ``...``) has it replaced by the word ``placeholder`` (``[...]`` stays a list), and a
  config-group choice holding one is dropped; Hydra sweeps (``-m``) are skipped. So docs write concrete numbers for
  numeric keys. Distinct command lines run once each, all in one Python process (``runpy``, as ``python -m`` runs a
  module), so the check takes seconds.
- README.md is at most 200 lines, and docs/design.md's file tree names every file under framework/.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
HYDRA_ENTRIES = {"train", "generate", "serve", "eval", "compress", "prepare", "export", "plan"}
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
ANGLE = re.compile(r"<[^<>\n]*>")  # <dir>, <a data config>: replaced before the line is split into words
PLACEHOLDER = re.compile(r"__placeholder__|\$\w*|\.\.\.")
STOP_TOKENS = {"&", "&&", "|", "||", ";", ">", ">>", "2>", "2>&1"}


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code: what renders as Markdown."""
    return INLINE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text, flags=re.UNICODE)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", read(path)).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_at_most_200_lines():
    lines = read(os.path.join(REPO, "README.md")).splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/"


def test_docs_pages_exist():
    names = {os.path.basename(p) for p in PAGES}
    for page in ("training", "data", "fine-tuning", "checkpoints", "engine", "serving", "compression", "evaluation",
                 "launching", "planning", "results", "design"):
        assert f"{page}.md" in names, f"docs/{page}.md is missing"


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        for target in LINK.findall(prose(read(page))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(dest):
                bad.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                bad.append(f"{rel(page)}: {target} (no heading with anchor #{anchor})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_framework_module_shown_exists():
    missing = []
    for page in PAGES:
        for module in sorted(set(re.findall(r"python -m (framework(?:\.\w+)+)", read(page)))):
            spec = importlib.util.find_spec(module)
            runnable = spec is not None and (spec.submodule_search_locations is None
                                             or importlib.util.find_spec(module + ".__main__") is not None)
            if not runnable:
                missing.append(f"{rel(page)}: python -m {module}")
    assert not missing, "modules that do not exist:\n" + "\n".join(missing)


def shell_lines(text: str) -> list[str]:
    """Command lines of the page: each logical line of its bash blocks, and its inline code spans."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell", ""):
            continue
        out += [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    return out + INLINE.findall(FENCE.sub("", text))


def entry_and_args(line: str) -> tuple[str, list[str]] | None:
    """(entry point, its key=value arguments) of a command line that runs a Hydra entry point, else None."""
    try:
        tokens = shlex.split(ANGLE.sub("__placeholder__", line), comments=True)
    except ValueError:  # an unbalanced quote: prose in backticks, not a command
        return None
    for i, tok in enumerate(tokens):
        entry = None
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("framework."):
            entry, rest = tokens[i + 1].split(".", 1)[1], tokens[i + 2:]
        elif m := re.fullmatch(r"(?:\S*/)?framework/(\w+)\.py", tok):
            entry, rest = m.group(1), tokens[i + 1:]
        elif re.fullmatch(r"(?:\S*/)?launch/(torchrun|deepspeed)\.sh", tok) and i + 1 < len(tokens):
            entry, rest = tokens[i + 1], tokens[i + 2:]
        elif m := re.fullmatch(r"(?:\S*/)?launch/slurm/(\w+)\.sbatch", tok):
            entry, rest = m.group(1), tokens[i + 1:]
        if entry is None:
            continue
        if entry not in HYDRA_ENTRIES:
            return None
        args = []
        for arg in rest:
            if arg in STOP_TOKENS:
                break
            if arg in ("-m", "--multirun"):
                return None  # a sweep
            if "=" in arg and not arg.startswith("-"):
                args.append(arg)
        return entry, args
    return None


def substitute_placeholders(entry: str, args: list[str]) -> list[str]:
    out = []
    for arg in args:
        key, value = arg.split("=", 1)
        if PLACEHOLDER.search(value):
            group_dir = os.path.join(REPO, "configs", key.lstrip("+"))
            if "." not in key and os.path.isdir(group_dir):
                continue  # a group choice such as data=<a data config>
            value = PLACEHOLDER.sub("placeholder", value)
        out.append(f"{key}={value}")
    return out


def documented_commands() -> dict[tuple[str, tuple[str, ...]], str]:
    found: dict[tuple[str, tuple[str, ...]], str] = {}
    for page in PAGES:
        for line in shell_lines(read(page)):
            parsed = entry_and_args(line)
            if parsed:
                entry, args = parsed
                found.setdefault((entry, tuple(substitute_placeholders(entry, args))), f"{rel(page)}: {line.strip()}")
    return found


def test_the_docs_show_commands_of_every_entry_point():
    entries = {entry for entry, _ in documented_commands()}
    assert entries == HYDRA_ENTRIES, f"no command line found for {sorted(HYDRA_ENTRIES - entries)}"


# Runs each command line as ``python -m framework.<entry> --cfg job <args>`` would, all in one fresh process:
# ``runpy`` executes the entry module as __main__ with that argv (its Hydra main and the framework's start-up
# wrapper, which leaves through sys.exit when no process group was joined), so the interpreter starts once.
DRIVER = r"""
import contextlib, io, json, runpy, sys
from hydra.core.global_hydra import GlobalHydra
commands, out_path = json.load(open(sys.argv[1])), sys.argv[2]
results = []
for entry, args in commands:
    sys.argv = [f"framework/{entry}.py", "--cfg", "job", *args]
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module(f"framework.{entry}", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:
            code, _ = 1, print(repr(exc), file=sys.stderr)
    GlobalHydra.instance().clear()
    results.append([code, err.getvalue()[-1500:]])
json.dump(results, open(out_path, "w"))
"""


def test_documented_command_lines_compose(tmp_path):
    commands = documented_commands()
    assert len(commands) > 20, "the command-line extraction found too few commands: is the parser broken?"
    keys = sorted(commands)
    work = tmp_path / "cwd"
    work.mkdir()
    todo, done = tmp_path / "commands.json", tmp_path / "results.json"
    todo.write_text(json.dumps([[entry, list(args)] for entry, args in keys]))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(todo), str(done)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = []
    for (entry, args), (code, err) in zip(keys, json.loads(done.read_text())):
        if code != 0:
            tail = [x for x in err.strip().splitlines() if x.strip()][-6:] or ["(no output)"]
            failures.append(f"{commands[(entry, args)]}\n    python -m framework.{entry} --cfg job {' '.join(args)}\n    "
                            + "\n    ".join(tail))
    assert not failures, "documented commands that Hydra refuses:\n" + "\n".join(failures)
    assert not os.listdir(work), f"--cfg job wrote files: {os.listdir(work)}"


def tree_paths(design: str, root: str = "framework") -> set[str]:
    """The paths the file tree of docs/design.md names under ``root/`` (two spaces of indent a level)."""
    body = read(design).split("## The file tree", 1)[1]
    block = FENCE.search(body).group(2)
    paths, stack, inside = set(), [], False
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        if depth == 0:
            inside = name == f"{root}/"
            stack = [root]
            continue
        if not inside:
            continue
        stack = stack[:depth] + [name.rstrip("/")]
        if not name.endswith("/"):
            paths.add("/".join(stack))
    return paths


def test_design_tree_names_every_framework_file():
    named = tree_paths(os.path.join(REPO, "docs", "design.md"))
    real = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, "framework")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        real |= {rel(os.path.join(dirpath, f)) for f in filenames if not f.endswith((".pyc", ".so"))}
    assert not real - named, f"docs/design.md's file tree misses {sorted(real - named)}: add a line for each"
    assert not named - real, f"docs/design.md's file tree names files that do not exist: {sorted(named - real)}"
