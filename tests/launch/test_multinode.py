"""Several nodes on one machine: two network namespaces joined by a veth pair, each running launch/torchrun.sh
against a c10d rendezvous on the first, or each running an sshd that the deepspeed launcher reaches through pdsh.
And the launch failures that must end with one clear line, not a hang."""

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.helpers import REPO, TINY_TRAIN, assert_ok, env, losses, run_module

pytestmark = pytest.mark.launch

TORCHRUN_SH = os.path.join(REPO, "launch", "torchrun.sh")
DEEPSPEED_SH = os.path.join(REPO, "launch", "deepspeed.sh")
IFNAME = "mtnet"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def nodes():
    """Two 'hosts': namespaces with their own addresses on a veth pair. Torn down afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip: run the tests as root to cover several nodes")
    tag = os.getpid() % 10000
    subnet = f"10.231.{tag % 250}"
    # Inside its namespace each end of the pair is called IFNAME: one GLOO_SOCKET_IFNAME serves every node, as on
    # a cluster whose nodes name their interfaces alike (the deepspeed launcher forwards one value to all).
    hosts = [{"ns": f"mt{tag}a", "dev": IFNAME, "addr": f"{subnet}.1", "veth": f"vm{tag}a"},
             {"ns": f"mt{tag}b", "dev": IFNAME, "addr": f"{subnet}.2", "veth": f"vm{tag}b"}]
    try:
        for h in hosts:
            _ip("netns", "add", h["ns"])
        _ip("link", "add", hosts[0]["veth"], "type", "veth", "peer", "name", hosts[1]["veth"])
        for h in hosts:
            _ip("link", "set", h["veth"], "netns", h["ns"])
            _ip("-n", h["ns"], "link", "set", h["veth"], "name", h["dev"])
            _ip("-n", h["ns"], "addr", "add", f"{h['addr']}/24", "dev", h["dev"])
            _ip("-n", h["ns"], "link", "set", h["dev"], "up")
            _ip("-n", h["ns"], "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for h in hosts:
            subprocess.run(["ip", "netns", "del", h["ns"]], capture_output=True)
        pytest.skip(f"could not create network namespaces: {exc.stderr.strip()}")
    yield {"hosts": hosts, "subnet": subnet}
    for h in hosts:
        subprocess.run(["ip", "netns", "del", h["ns"]], capture_output=True)


def on_nodes(nodes, what: str, args: list[str], nproc: int, port: int, timeout: int = 300):
    """The same launch/torchrun.sh command on both nodes at once; returns both finished processes."""
    master = nodes["hosts"][0]["addr"]
    procs = []
    for rank, h in enumerate(nodes["hosts"]):
        e = {**env(), "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": master, "MASTER_PORT": str(port),
             "LOCAL_ADDR": h["addr"], "GLOO_SOCKET_IFNAME": h["dev"], "NPROC": str(nproc), "RDZV_TIMEOUT": "120"}
        procs.append(subprocess.Popen(["ip", "netns", "exec", h["ns"], TORCHRUN_SH, what, *args], env=e, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        p.stdout_text, p.stderr_text = p.communicate(timeout=timeout)
    return procs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 10 steps: what every layout across the nodes must reproduce."""
    ref = tmp_path_factory.mktemp("ref")
    assert_ok(run_module("framework.train", [*TINY_TRAIN, "trainer.max_steps=10", f"run_dir={ref}"]))
    return losses(str(ref))


def assert_same_curve(want: dict, got: dict) -> None:
    assert sorted(got) == sorted(want)
    for step, value in want.items():
        assert abs(got[step] - value) <= 1e-4 * abs(value), (step, got[step], value)


def test_two_nodes_train_and_generate(nodes, reference, tmp_path):
    run = tmp_path / "two_nodes"
    args = [a for a in TINY_TRAIN if not a.startswith("checkpoint.export")]
    procs = on_nodes(nodes, "train", [*args, "trainer.max_steps=10", "parallel.tp=2", f"run_dir={run}"], nproc=2,
                     port=29631)
    for p in procs:
        assert p.returncode == 0, p.stderr_text[-4000:]
    assert "world=4 (pp=1 x dp=2 x tp=2)" in procs[0].stderr_text
    assert_same_curve(reference, losses(str(run)))

    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("reverse: 1 2 3 =", "reverse: 9 8 7 6 5 =")))
    common = [f"model_dir={run}", f"prompts={prompts}", "infer.max_new_tokens=8"]
    procs = on_nodes(nodes, "generate", [*common, "infer.pp=2", f"output={tmp_path / 'pp2.jsonl'}"], nproc=1,
                     port=29632)
    for p in procs:
        assert p.returncode == 0, p.stderr_text[-4000:]
    assert_ok(run_module("framework.generate", [*common, f"output={tmp_path / 'pp1.jsonl'}"]))
    pp1, pp2 = ([json.loads(x)["token_ids"] for x in (tmp_path / f).read_text().splitlines()]
                for f in ("pp1.jsonl", "pp2.jsonl"))
    assert pp1 == pp2 and len(pp1) == 2


@pytest.fixture(scope="module")
def sshd(nodes, tmp_path_factory):
    """An sshd in each namespace (a key made here, nothing of the machine's ssh set-up touched); pdsh from Debian.
    Yields the environment that lets pdsh (and launch/deepspeed.sh's check) log in with that key."""
    def missing():
        return [t for t in ("pdsh", "ssh", "ssh-keygen", "/usr/sbin/sshd") if shutil.which(t) is None]

    if missing() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "pdsh", "openssh-server",
                        "openssh-client"], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       capture_output=True, timeout=600)
    if missing():
        pytest.skip(f"the deepspeed launcher across nodes needs {', '.join(missing())} (Debian: pdsh openssh-server)")
    keys = tmp_path_factory.mktemp("ssh")
    for name in ("id", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "id.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    daemons = []
    for h in nodes["hosts"]:
        daemons.append(subprocess.Popen(
            ["ip", "netns", "exec", h["ns"], "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null",
             "-o", f"ListenAddress={h['addr']}", "-o", f"HostKey={keys / 'host'}",
             "-o", f"AuthorizedKeysFile={keys / 'authorized_keys'}", "-o", "PermitRootLogin=prohibit-password",
             "-o", "PasswordAuthentication=no", "-o", "StrictModes=no", "-o", "UsePAM=no", "-o", "PidFile=none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1)
    yield {"PDSH_SSH_ARGS_APPEND": f"-i {keys / 'id'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                   "-o LogLevel=ERROR"}
    for d in daemons:
        d.terminate()
        d.wait(timeout=30)


def test_deepspeed_launcher_across_two_nodes(nodes, sshd, reference, tmp_path):
    """launch/deepspeed.sh on the first node starts both nodes' ranks through pdsh and ssh; dp=2 x tp=2 over the
    veth pair continues the one-process curve."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h['addr']} slots=2\n" for h in nodes["hosts"]))
    run = tmp_path / "run"
    args = [a for a in TINY_TRAIN if not a.startswith("checkpoint.export")]
    e = {**env(), **sshd, "HOSTFILE": str(hostfile), "MASTER_PORT": "29641", "GLOO_SOCKET_IFNAME": IFNAME}
    proc = subprocess.run(["ip", "netns", "exec", nodes["hosts"][0]["ns"], DEEPSPEED_SH, "train", *args,
                           "trainer.max_steps=10", "parallel.tp=2", f"run_dir={run}"], env=e, cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    assert_ok(proc)
    out = proc.stdout + proc.stderr
    assert "world=4 (pp=1 x dp=2 x tp=2)" in out
    assert_same_curve(reference, losses(str(run)))

    # without the key, the login check names the host in one line before anything starts
    bad = {**e, "PDSH_SSH_ARGS_APPEND": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                        "-o IdentitiesOnly=yes -i /nonexistent"}
    proc = subprocess.run(["ip", "netns", "exec", nodes["hosts"][0]["ns"], DEEPSPEED_SH, "train", "model=debug"],
                          env=bad, cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "refuses a passwordless ssh login" in lines[0], proc.stderr


def test_hostfile_naming_an_unreachable_host(nodes, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{nodes['subnet']}.9 slots=2\n")  # on the veth subnet, but nobody has it
    t0 = time.monotonic()
    proc = subprocess.run(["ip", "netns", "exec", nodes["hosts"][0]["ns"], DEEPSPEED_SH, "train", "model=debug"],
                          env={**env(), "HOSTFILE": str(hostfile), "CONNECT_TIMEOUT": "5"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert time.monotonic() - t0 < 30
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and f"{nodes['subnet']}.9" in lines[0] and "unreachable" in lines[0]


def test_rendezvous_that_never_completes(tmp_path):
    """Only one of two nodes starts: a clear line once the configured timeout passes, never a hang."""
    t0 = time.monotonic()
    proc = subprocess.run([TORCHRUN_SH, "train", *TINY_TRAIN, f"run_dir={tmp_path}"], cwd=REPO,
                          env={**env(), "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29633",
                               "RDZV_TIMEOUT": "10", "NPROC": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 90
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "rendezvous at 127.0.0.1:29633 did not complete within 10s" in lines[0]
