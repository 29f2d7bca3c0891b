"""``python -m framework.eval model_dir=<dir> tasks=[...]``: lm-evaluation-harness tasks through the engine.

Every rank builds its stage of the engine (any pp x tp under torchrun); rank 0 runs lm-eval in its main thread and
the engine loop in a second one (harness.py says why), the other ranks follow the engine. Tasks come from lm-eval's
own registry (their data must be in the local datasets cache: nothing is downloaded here) and from
``include_path`` (default: the project's offline tasks in configs/lm_eval/).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

from framework.cli import UserError

PROJECT_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "configs", "lm_eval")


def task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    path = include_path or (PROJECT_TASKS if os.path.isdir(PROJECT_TASKS) else None)
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"include_path={include_path}: no such directory of task YAMLs")
    return TaskManager(include_path=path) if path else TaskManager()


def check_tasks(manager, tasks: list[str]) -> None:
    """Unknown task names are refused in one line, before any weight is read."""
    unknown = [t for t in tasks if manager.match_tasks([t]) == [] and t not in manager.all_groups]
    if unknown:
        some = ", ".join(sorted(n for n in manager.all_tasks if n.startswith("miaotui"))[:6])
        raise UserError(f"unknown task '{unknown[0]}': use a task of lm-eval or of include_path (e.g. {some})")


def infer_config(cfg):
    """The engine keys: ``infer.*``, with the evaluation's own ``dtype`` and ``quant`` where infer leaves them."""
    inf = cfg.infer
    return dataclasses.replace(inf, dtype=inf.dtype or cfg.dtype, quant=inf.quant or cfg.quant,
                               quant_group_size=cfg.quant_group_size)


def run_tasks(cfg) -> dict | None:
    """Evaluate; rank 0 returns lm-eval's results (and writes ``output``), the other ranks None."""
    from framework.evaluation.harness import EngineClient, MiaotuiLM
    from framework.infer.startup import build_engine, start_stage_ranks
    from framework.parallel.distributed import destroy

    manager = task_manager(cfg.include_path)
    check_tasks(manager, list(cfg.tasks))
    inf = infer_config(cfg)
    st = start_stage_ranks(cfg.model_dir, inf)
    max_len = inf.max_seq_len or st.args.max_seq_len
    max_batch = inf.batch_size if inf.batch_size is not None else inf.max_batch
    engine, _ = build_engine(inf, st.model_dir, st.args, st.stages, st.rank, st.device, st.dtype, max_batch, max_len,
                             st.tokenizer, st.say)
    if st.rank != 0:
        engine.run()
        destroy()
        return None
    client = EngineClient(engine.scheduler, st.tokenizer)

    def run_engine() -> None:
        try:
            engine.run(client.poll)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting lm-eval thread, which raises it
            client.fail(exc)

    thread = threading.Thread(target=run_engine, name="engine", daemon=True)
    thread.start()
    try:
        results = evaluate(cfg, manager, MiaotuiLM(client, st.tokenizer, max_len, seed=inf.seed))
    finally:
        client.close()
        thread.join()
    destroy()
    return results


def evaluate(cfg, manager, lm) -> dict:
    """lm-eval's ``simple_evaluate`` on ``lm``; prints its table and writes the results JSON to ``cfg.output``."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    results = simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                              task_manager=manager, log_samples=cfg.log_samples, random_seed=cfg.seed,
                              numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    print(make_table(results), flush=True)
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)) or ".", exist_ok=True)
        with open(cfg.output + ".tmp", "w") as f:
            json.dump(results, f, indent=1, default=handle_non_serializable)
        os.replace(cfg.output + ".tmp", cfg.output)
    return results
