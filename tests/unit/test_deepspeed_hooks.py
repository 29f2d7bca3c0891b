"""Every private DeepSpeed hook (framework/parallel/deepspeed_hooks.py) against the installed DeepSpeed: one test per
hook, failing with the hook's name and the releases it was checked against when an upgrade breaks it.

Each check reads the private name on the real class or module (it exists, with the signature the hook calls) and,
where it is cheap, runs the hook: AutoTP's layers on a tiny Linear, ``zero.Init`` on a tiny Linear, the optimizer
hooks on a one-process ZeRO-2 engine (gloo), the shared-memory all-reduce op in a world of one. The checks run once,
together, in a child process (a world of one: DeepSpeed's comm layer and groups are process-global), in ~10 s.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch

from framework.parallel import deepspeed_hooks as hooks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKS: dict[str, object] = {}  # hook name -> check, run in order in the child


def check(*hook_fns):
    def register(fn):
        for hook in hook_fns:
            CHECKS.setdefault(hook.__name__, fn)
        return fn

    return register


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ---- the checks (run in the child, in this order) ----

@check(hooks.load_shm_allreduce_op, hooks.shm_vector_kernel_level, hooks.init_shm_allreduce, hooks.shm_all_reduce,
       hooks.unlink_deepspeed_shm)
def check_shm_allreduce(results: dict) -> None:
    """First in the process: the op's segments are named after MASTER_ADDR and the name standing in for the port."""
    import deepspeed

    csrc = os.path.join(os.path.dirname(deepspeed.__file__), "ops", "csrc", "cpu", "comm")
    shm_cpp, iface = (open(os.path.join(csrc, f)).read() for f in ("shm.cpp", "shm_interface.cpp"))
    assert '#define SHM_BUFFER_NAME "deepspeed_allreduce_buffer"' in shm_cpp and '"%s_%d_%s_%s"' in shm_cpp, \
        "shm.cpp names its segments otherwise"
    assert 'getenv("LOCAL_SIZE")' in iface and 'getenv("MASTER_PORT")' in iface, "the op reads other variables"
    assert 'm.def("inference_all_reduce(Tensor self) -> Tensor")' in iface, "no inference_all_reduce op"
    try:
        op = hooks.load_shm_allreduce_op()
    except Exception as e:  # reported against this hook
        results["load_shm_allreduce_op"] = f"ShareMemCommBuilder().load() failed: {e!r}"
        raise
    level = hooks.shm_vector_kernel_level(op)
    results["shm_vector_kernel_level"] = None if level in (0, 1, 2) else f"vector_kernel_level() gave {level!r}, not 0-2"
    name = f"miaotuihooks{os.getpid()}"
    hooks.init_shm_allreduce(op, 1, 0, name)
    segment = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{name}_0"
    assert os.path.exists(segment), f"no segment {segment} after initialize"
    if level >= 1:
        out = hooks.shm_all_reduce(torch.full((8,), 3.0))
        assert torch.equal(out, torch.full((8,), 3.0)), f"inference_all_reduce of 3s over one rank gave {out}"
    hooks.unlink_deepspeed_shm(name)
    assert not os.path.exists(segment), "unlink_deepspeed_shm left the segment's name"


@check(hooks.comm_initialized, hooks.comm_has_shm_allreduce)
def check_comm(results: dict) -> None:
    import deepspeed
    from deepspeed.comm.torch import TorchBackend

    assert "self.shm_comm_op =" in inspect.getsource(TorchBackend.__init__), "TorchBackend has no shm_comm_op"
    assert hooks.comm_initialized() is False, "comm_initialized() is True before deepspeed.init_distributed"
    deepspeed.init_distributed(dist_backend="gloo")
    assert hooks.comm_initialized() is True, "comm_initialized() is False after deepspeed.init_distributed"
    assert hooks.comm_has_shm_allreduce() is True, "no shm_comm_op on the comm backend (built above)"


@check(hooks.init_tp_mesh, hooks.tensor_parallel_group)
def check_tp_mesh(results: dict) -> None:
    import torch.distributed as dist
    from deepspeed.utils import groups

    assert params(groups._init_tp_mesh_device)[:1] == ["tensor_model_parallel_size"], \
        f"_init_tp_mesh_device{inspect.signature(groups._init_tp_mesh_device)}"
    assert hooks.tensor_parallel_group(1) is None
    hooks.init_tp_mesh(1)
    group = hooks.tensor_parallel_group(2)  # the mesh's tp group (of one rank here)
    assert group is not None and dist.get_world_size(group) == 1, f"tensor-parallel group {group}"


@check(hooks.autotp_shard_spec)
def check_autotp_layers(results: dict) -> None:
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    with torch.device("meta"):  # AutoTP cuts the meta model: these attributes are what fill_tp_shards reads
        col_linear, row_linear = torch.nn.Linear(8, 16, bias=True), torch.nn.Linear(16, 8, bias=False)
    column, row = LinearLayer(col_linear, mp_group=None), LinearAllreduce(row_linear, mp_group=None)
    assert hooks.autotp_shard_spec(column) == ((16,), 0, {"weight": (0, (16, 8)), "bias": (0, (16,))}), \
        f"LinearLayer gave {hooks.autotp_shard_spec(column)}"
    assert hooks.autotp_shard_spec(row) == ((16,), 0, {"weight": (1, (8, 16))}), \
        f"LinearAllreduce gave {hooks.autotp_shard_spec(row)}"
    assert hooks.autotp_shard_spec(torch.nn.Linear(2, 2)) is None


@check(hooks.after_autotp)
def check_after_autotp(results: dict) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_tensor_parallel
    assert params(original) == ["self", "model", "tp_config"], f"_configure_tensor_parallel{inspect.signature(original)}"
    init = inspect.getsource(DeepSpeedEngine.__init__)
    assert "= self._configure_tensor_parallel(model, self.tensor_parallel_config())" in init, \
        "DeepSpeedEngine.__init__ no longer takes the sources from _configure_tensor_parallel(model, tp_config)"
    with hooks.after_autotp(torch.nn.Linear(2, 2), lambda m: None):
        assert DeepSpeedEngine._configure_tensor_parallel is not original
    assert DeepSpeedEngine._configure_tensor_parallel is original, "the original method was not put back"


@check(hooks.record_param_names)
def check_record_param_names(results: dict) -> None:
    from deepspeed.utils import debug

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    hooks.record_param_names(model)
    assert debug.param_names[model[0].weight] == "0.weight", "debug.param_names does not name the parameters"


@check(hooks.partition_only_init)
def check_partition_only_init(results: dict) -> None:
    import deepspeed

    init_cls = deepspeed.zero.Init
    zero_init_param = init_cls._zero_init_param
    assert params(zero_init_param) == ["self", "param"], f"Init._zero_init_param{inspect.signature(zero_init_param)}"
    assert params(init_cls._convert_to_deepspeed_param) == ["self", "param"]
    source = inspect.getsource(zero_init_param)
    assert "self._convert_to_deepspeed_param(param)" in source and "param.partition()" in source, \
        "Init._zero_init_param no longer converts then partitions: mirror its new steps"
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with hooks.partition_only_init(config_dict_or_path=config, mem_efficient_linear=False):
        linear = torch.nn.Linear(8, 4)
    assert hooks.has_fp32_master(linear.weight), "a zero.Init parameter has no ds_id"
    assert linear.weight.ds_numel == 32 and linear.weight.ds_tensor.numel() == 32 and linear.weight.numel() == 0, \
        "the parameter was not partitioned"


@check(hooks.inner_optimizer, hooks.relink_optimizer_state, hooks.has_fp32_master)
def check_optimizer_hooks(results: dict) -> None:
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_get_full_optimizer_state

    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        source = inspect.getsource(cls._lazy_init_hp_params_optimizer_state)
        assert "_hp_optimizer_states_linked" in source, f"{cls.__name__} links its optimizer state otherwise"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    groups = [{"params": [model[0].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3), config={
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
    engine.backward(engine(torch.randn(1, 8)).square().sum())
    engine.step()
    inner = hooks.inner_optimizer(engine)
    assert isinstance(inner, torch.optim.AdamW) and inner is not engine.optimizer, f"inner optimizer {type(inner)}"
    assert hasattr(engine.optimizer, "_hp_optimizer_states_linked"), "ZeRO 2's optimizer has no _hp_optimizer_states_linked"
    hooks.relink_optimizer_state(engine)
    assert engine.optimizer._hp_optimizer_states_linked is True
    for name, p in engine.module.named_parameters():  # the second group's moments too
        assert hooks.has_fp32_master(p), f"{name} has no _hp_mapping under ZeRO 2"
        moment = safe_get_full_optimizer_state(p, "exp_avg")
        assert moment is not None and moment.shape == p.shape and moment.abs().sum() > 0, f"no exp_avg for {name}"
    assert not hooks.has_fp32_master(torch.nn.Parameter(torch.zeros(2)))


def run_checks() -> dict[str, str | None]:
    """In a world of one (the child): every check, its error (None: passed) reported against each of its hooks."""
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.pop("LOCAL_SIZE", None)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        os.environ["MASTER_PORT"] = "29999"  # the comm layer's op names segments after it (none at LOCAL_SIZE 1)
        results: dict[str, str | None] = {}
        for fn in dict.fromkeys(CHECKS.values()):
            covered = [n for n, f in CHECKS.items() if f is fn]
            try:
                fn(results)
                error = None
            except Exception as e:  # every hook's result is reported: each test fails on its own
                error = f"{type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].lineno})"
            for n in covered:
                results.setdefault(n, error)
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, str | None]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", "import json, tests.unit.test_deepspeed_hooks as t; "
                           "print('RESULTS ' + json.dumps(t.run_checks()))"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"the checks' process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def test_every_hook_has_a_check_and_a_checked_range():
    assert sorted(CHECKS) == sorted(hooks.HOOKS), "a hook without a check here (or a check of no hook)"
    public = {n for n, f in vars(hooks).items() if inspect.isfunction(f) and f.__module__ == hooks.__name__
              and not n.startswith("_") and n != "checked"}
    assert public == set(hooks.HOOKS), f"functions of deepspeed_hooks not registered with @checked: {public - set(hooks.HOOKS)}"


@pytest.mark.parametrize("hook", sorted(hooks.HOOKS))
def test_hook_works_with_the_installed_deepspeed(results, hook):
    first, last = hooks.HOOKS[hook]
    installed = importlib.metadata.version("deepspeed")
    assert hook in results, f"DeepSpeed hook {hook} was not checked"
    assert results[hook] is None, (f"DeepSpeed hook {hook} (framework/parallel/deepspeed_hooks.py, checked against "
                                   f"DeepSpeed {first}-{last}) broke with the installed DeepSpeed {installed}: "
                                   f"{results[hook]}")
