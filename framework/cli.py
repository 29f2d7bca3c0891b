"""What every entry point shares: launcher arguments, config validation, and one-line errors.

A failed start exits non-zero with one line on standard error that says what to change, printed by rank 0
only. Hydra's own composition errors (an unknown key, a missing group option) are caught before Hydra runs the
task, so they too come out as one line, once.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class UserError(Exception):
    """A problem with the user's input: reported as one line, no traceback."""


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


JOINED_PROCESS_GROUP = [False]  # set by framework.parallel.distributed.init_distributed


def leave(code: int = 0) -> None:
    """Exit. A process that joined a process group skips the interpreter's finalisation (``os._exit`` after
    flushing): a gloo worker thread can still be releasing a finished collective's tensors when finalisation
    starts, and its wait for the GIL then ends in ``std::terminate`` ("terminate called without an active
    exception", SIGABRT after a run that did all its work: a core dump shows ``ProcessGroupGloo::runLoop`` ->
    ``~AsyncBarrierWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit`` during ``Py_FinalizeEx``).
    The ``atexit`` handlers run first, as at a normal exit; standard streams and logging are flushed."""
    if not JOINED_PROCESS_GROUP[0]:
        sys.exit(code)
    import atexit
    import logging

    atexit._run_exitfuncs()  # what libraries registered (wandb's finish, multiprocessing's clean-up) still runs
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(message: str, code: int = 2) -> None:
    """Print one line naming the fix (rank 0 only) and exit."""
    if is_rank0():
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif JOINED_PROCESS_GROUP[0] or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import time

        time.sleep(1.0)  # the launcher stops every rank once one has exited: rank 0 prints its line first
    leave(code)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N``, which Hydra rejects: move it to the environment."""
    out = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", arg)
        if m:
            value = m.group(1)
            if value is None and i + 1 < len(argv):
                value = argv[i + 1]
                next(it, None)
            os.environ.setdefault("LOCAL_RANK", value or "0")
            continue
        out.append(arg)
    return out


def _schema_keys(schema, dotted: str) -> list[str] | None:
    node = schema
    for part in [p for p in dotted.split(".") if p]:
        match = [f for f in fields(node) if f.name == part] if is_dataclass(node) else []
        if not match:
            return None
        default = match[0].default_factory() if callable(match[0].default_factory) else match[0].default
        node = default if is_dataclass(default) else None
        if node is None:
            return None
    return [f.name for f in fields(node)] if is_dataclass(node) else None


def explain_compose_error(exc: Exception, schema) -> str:
    """Turn a Hydra/OmegaConf composition error into one line that names the fix."""
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(" ".join(chain).split())
    m = re.search(r"Key '([^']+)' (?:is )?not in (?:struct|'\w+').*?full_key: ([\w.]+)", text)
    if m:
        full = m.group(2)
        parent = full.rsplit(".", 1)[0] if "." in full else ""
        valid = _schema_keys(schema, parent)
        where = f"under '{parent}'" if parent else "at the top level"
        hint = f"; valid keys {where}: {', '.join(valid)}" if valid else ""
        return f"unknown config key '{full}'{hint}"
    m = re.search(r"Could not find '([^']+)'.*?Available options in '([^']+)':\s*(.*?)(?:Config search path|$)", text)
    if m:
        return f"no config '{m.group(1)}'; available in {m.group(2)}: {' '.join(m.group(3).split())}"
    m = re.search(r"Could not override '([^']+)'.*?(Key '[^']+' is not in struct|Value '[^']*' .*?)(?: full_key|$)", text)
    if m:
        return f"could not override '{m.group(1)}': {m.group(2)}"
    return text.split(" Set the environment variable HYDRA_FULL_ERROR")[0]


def validate_overrides(config_name: str, overrides: list[str], schema, config_dir: str = CONFIG_DIR) -> None:
    """Compose the config once up front so a bad key fails in one line before anything heavy starts."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    plain = [o for o in overrides if not o.startswith("hydra") and not o.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name=config_name, overrides=plain)
    except Exception as exc:  # noqa: BLE001 - every composition failure becomes one line
        fail(explain_compose_error(exc, schema))
    finally:
        GlobalHydra.instance().clear()


def reports_user_errors(fn: Callable) -> Callable:
    """Inside a Hydra task function: a UserError becomes one line and a non-zero exit, not Hydra's traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))

    return wrapper


def run_entry(hydra_main: Callable[[], None], config_name: str, schema, config_dir: str = "") -> None:
    """Run a ``@hydra.main`` function after launcher clean-up and up-front validation."""
    sys.argv = [sys.argv[0]] + strip_launcher_args(sys.argv[1:])
    args = sys.argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun and not any(a in ("--help", "-h", "--cfg", "-c", "--info") for a in args):
        validate_overrides(config_name, args, schema, os.path.join(CONFIG_DIR, config_dir))
        # An explicit run_dir is also Hydra's working directory: no stray runs/<name> beside it.
        run_dir = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
        if run_dir and not any(a.startswith("hydra.run.dir=") for a in args):
            sys.argv.append(f"hydra.run.dir={run_dir[-1]}")
    try:
        hydra_main()
    except UserError as exc:
        fail(str(exc))
    except SystemExit as exc:  # Hydra printed a failure and exits 1: leave the same way, with the same code
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr, flush=True)
        leave(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
    leave(0)
