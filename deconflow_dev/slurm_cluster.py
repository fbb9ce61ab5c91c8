"""A real one-node SLURM cluster on localhost, for development and CI.

``deconflow slurm up|down|status|env`` (or ``python -m deconflow_dev.slurm_cluster ...``) runs
munged, MariaDB, slurmdbd, slurmctld and slurmd as root with every config, socket, pid file,
log, spool and database under one state directory, on non-default ports, so it never touches
(or collides with) a system SLURM. The node advertises fake GPUs as ``gres/gpu`` (4, backed by
plain files under ``<state>/dev``) and ``gres/shard`` (8) so GPU-style job scripts schedule
exactly as they would on the real clusters. Clients only need ``SLURM_CONF`` (see :func:`env`):
the munge socket path travels inside slurm.conf via ``AuthInfo=socket=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deconflow_dev import ports

CLUSTER_NAME = "deconflow"
NODE_NAME = "localhost"
PARTITION = "gpu"
# A cluster-wide license of count 1: jobs that ask for it (``--licenses=serial``) run one at
# a time, like jobs on a one-GPU node, while other jobs share the node (a test's own slot).
SERIAL_LICENSE = "serial"
# Bumped when the generated configs change: a running cluster whose slurm.conf names an
# older version is restarted by ``up`` with the new files.
CONFIG_VERSION = 2
CONFIG_MARK = f"# deconflow_dev config version {CONFIG_VERSION}"
# Fake GPUs and GPU shards the node advertises; the scale benchmark raises them
# (e.g. DECONFLOW_SLURM_GPUS=8 DECONFLOW_SLURM_SHARDS=16 DECONFLOW_SLURM_CPUS=16).
# Read when the config is rendered (on `up`), not at import.


def gpu_count() -> int:
    return int(os.environ.get("DECONFLOW_SLURM_GPUS", "4"))


def shard_count() -> int:
    return int(os.environ.get("DECONFLOW_SLURM_SHARDS", "8"))


# Per-checkout ports (deconflow_dev.ports), clear of SLURM's 6817-6819 and MariaDB's 3306,
# so two checkouts on one machine run their clusters side by side.
SLURMCTLD_PORT = ports.port("slurmctld")
SLURMD_PORT = ports.port("slurmd")
SLURMDBD_PORT = ports.port("slurmdbd")
MARIADB_PORT = ports.port("mariadb")
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
# Only reachable on 127.0.0.1 of a dev/CI box; a secret would buy nothing here.
DB_PASS = "deconflow-slurm"

MARKER_VAR = "DECONFLOW_SLURM_DIR"
STEP_TIMEOUT_S = 60.0
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# binary -> Debian package that provides it
PACKAGES = {
    "slurmctld": "slurm-wlm",
    "slurmd": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "slurmdbd": "slurmdbd",
    "munged": "munge",
    "mariadbd": "mariadb-server",
}
NODE_OK_STATES = {"idle", "mixed", "allocated", "completing"}


def _say(msg: str) -> None:
    """One progress line per step, so a user watching `up` sees where it is."""
    print(f"[deconflow slurm] {msg}", flush=True)


class ClusterError(RuntimeError):
    """Raised when a daemon does not come up; the message carries the relevant log tail."""


@dataclass(frozen=True)
class Layout:
    """Every path the cluster uses; all of them live under ``root``."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def gres_conf(self) -> Path:
        return self.etc / "gres.conf"

    @property
    def cgroup_conf(self) -> Path:
        return self.etc / "cgroup.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        return self.etc / "slurmdbd.conf"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket.2"

    @property
    def mysql_dir(self) -> Path:
        return self.root / "mysql"

    @property
    def mysql_data(self) -> Path:
        return self.mysql_dir / "data"

    @property
    def mysql_socket(self) -> Path:
        return self.mysql_dir / "mysqld.sock"

    @property
    def ctld_spool(self) -> Path:
        return self.root / "spool" / "slurmctld"

    @property
    def slurmd_spool(self) -> Path:
        return self.root / "spool" / "slurmd"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    def pid(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"

    def logfile(self, daemon: str) -> Path:
        return self.log / f"{daemon}.log"


@dataclass
class ClusterInfo:
    """What a caller of :func:`up` needs to talk to the cluster."""

    state_dir: Path
    slurm_conf: Path
    cluster_name: str
    node_name: str
    partition: str
    gpus: int
    shards: int
    ports: dict[str, int]
    env: dict[str, str]
    started: list[str] = field(default_factory=list)  # empty: it was already up (no-op)
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------- paths / helpers


def default_state_dir() -> Path:
    """``$DECONFLOW_SLURM_DIR``, else ``$DECONFLOW_DATA/slurm`` (default ``data/slurm``)."""
    explicit = os.environ.get(MARKER_VAR)
    if explicit:
        return Path(explicit).expanduser().resolve()
    return (Path(os.environ.get("DECONFLOW_DATA", "data")) / "slurm").expanduser().resolve()


def _layout(state_dir: Path | str | None) -> Layout:
    root = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    return Layout(root)


def env(state_dir: Path | str | None = None) -> dict[str, str]:
    """Environment variables a SLURM client (sbatch, sacct, ...) needs for this cluster."""
    lay = _layout(state_dir)
    return {"SLURM_CONF": str(lay.slurm_conf), MARKER_VAR: str(lay.root)}


def _daemon_env(lay: Layout) -> dict[str, str]:
    """Daemons get SLURM_CONF (slurmdbd finds slurmdbd.conf next to it) plus our marker."""
    return {**os.environ, **env(lay.root)}


def _which(name: str) -> str | None:
    """shutil.which that also looks in sbin dirs, which non-root PATHs often lack."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _bin(name: str) -> str:
    path = _which(name)
    if path is None and name == "mariadbd":
        path = _which("mysqld")
    if path is None and name == "mariadb-install-db":
        path = _which("mysql_install_db")
    if path is None and name in ("mariadb", "mariadb-admin"):
        path = _which(name.replace("mariadb", "mysql"))
    if path is None:
        raise ClusterError(f"required program {name!r} not found")
    return path


def _run(
    argv: Sequence[str],
    lay: Layout,
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client command against our cluster (SLURM_CONF set), capturing output."""
    proc = subprocess.run(
        list(argv),
        env=_daemon_env(lay),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
    if check and proc.returncode != 0:
        raise ClusterError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout}{proc.stderr}"
        )
    return proc


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def _wait(
    what: str, probe: Callable[[], bool], log: Path | None, timeout: float = STEP_TIMEOUT_S
) -> None:
    """Poll ``probe`` until true; on timeout raise with the daemon's log tail attached."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    detail = _tail(log) if log else ""
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- process tracking

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
# /proc/<pid>/comm values we accept for each daemon (comm is truncated to 15 chars)
COMMS = {
    "munged": {"munged"},
    "mariadbd": {"mariadbd", "mysqld"},
    "slurmdbd": {"slurmdbd"},
    "slurmctld": {"slurmctld"},
    "slurmd": {"slurmd"},
}
ALL_COMMS = set().union(*COMMS.values()) | {"slurmstepd"}


def _proc_comm(pid: int) -> str | None:
    """Command name of a live (non-zombie) process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ..." - comm may contain spaces/parens, so split on the last ')'
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    state = stat[stat.rindex(")") + 2 :].split()[0]
    return None if state in ("Z", "X") else comm


def _daemon_pid(lay: Layout, daemon: str) -> int | None:
    """Pid of our running ``daemon`` according to its pid file, verified against /proc."""
    try:
        pid = int(lay.pid(daemon).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _proc_comm(pid) in COMMS[daemon] else None


def _our_stray_pids(lay: Layout) -> list[int]:
    """Daemon processes that belong to this state dir (path in argv or marker in environ).

    The pid-file-less fallback for `down`, equivalent to ``pkill -f <state dir>`` but restricted
    to daemon names so it can never hit the caller's shell or Python process.
    """
    marker = f"{MARKER_VAR}={lay.root}".encode()
    root = str(lay.root).encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        if _proc_comm(pid) not in ALL_COMMS:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if root in cmdline or marker in environ.split(b"\0"):
            found.append(pid)
    return found


def _kill_and_wait(pids: Sequence[int], timeout: float) -> list[int]:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left; returns killed-hard pids."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _proc_comm(p) is not None]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _spawn_detached(argv: Sequence[str], lay: Layout, log: Path) -> None:
    """Start a non-forking daemon re-parented away from us (``setsid -f``).

    Keeping it as our child would leave a zombie that still "exists" once it is stopped from
    another process, and would tie its lifetime to e.g. the pytest session.
    """
    with open(log, "ab") as out:
        subprocess.run(
            [_bin("setsid"), "-f", *argv],
            env=_daemon_env(lay),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            check=True,
            cwd=lay.root,
        )


# --------------------------------------------------------------------------- install / configs


def ensure_installed() -> None:
    """apt-get install the SLURM/munge/MariaDB packages if any of their programs is missing."""
    missing = sorted({pkg for b, pkg in PACKAGES.items() if _which(b) is None})
    if "mariadb-server" in missing and _which("mysqld"):
        missing.remove("mariadb-server")
    if not missing:
        return
    _say(f"installing {' '.join(missing)} with apt-get")
    if os.geteuid() != 0:
        raise ClusterError(f"packages {missing} are missing and installing them needs root")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], env=apt_env, check=True)
    subprocess.run(["apt-get", "install", "-y", *missing], env=apt_env, check=True)


def _real_memory_mb() -> int:
    """MemTotal minus a margin, so slurmd never drains the node for 'Low RealMemory'."""
    total_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total_kb = int(line.split()[1])
    total_mb = total_kb // 1024
    return max(256, total_mb - max(512, total_mb // 20))


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write only when content changed, so restarts see stable mtimes; then fix the mode."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(mode)


def write_configs(lay: Layout) -> None:
    """Create the state-dir tree, munge key, fake GPU device files and all config files."""
    for d in (
        lay.etc,
        lay.run,
        lay.log,
        lay.munge_dir,
        lay.mysql_dir,
        lay.ctld_spool,
        lay.slurmd_spool,
        lay.dev,
    ):
        d.mkdir(parents=True, exist_ok=True)
    # munged rejects group/other-writable dirs and a key readable by others; the dir stays
    # world-searchable so non-root clients can reach the socket.
    lay.munge_dir.chmod(0o755)
    if not lay.munge_key.exists():
        lay.munge_key.write_bytes(os.urandom(1024))
    lay.munge_key.chmod(0o600)
    if len(str(lay.munge_socket).encode()) >= 100 or len(str(lay.mysql_socket).encode()) >= 100:
        raise ClusterError(
            f"state dir {lay.root} is too long for unix socket paths (max ~100 bytes); "
            f"set {MARKER_VAR} to a shorter directory"
        )
    # slurmd insists gres File= entries are char/block devices; a symlink to /dev/null passes
    # its stat() without mknod privileges, and the trailing digit sets CUDA_VISIBLE_DEVICES.
    gpus, shards = gpu_count(), shard_count()
    for i in range(gpus):
        fake = lay.dev / f"nvidia{i}"
        if fake.is_symlink() and os.readlink(fake) == os.devnull:
            continue
        fake.unlink(missing_ok=True)
        fake.symlink_to(os.devnull)

    # More CPUs than the host has is allowed (SlurmdParameters=config_overrides).
    cpus = int(os.environ.get("DECONFLOW_SLURM_CPUS", "0")) or os.cpu_count() or 1
    slurm_conf = f"""\
# Generated by deconflow_dev.slurm_cluster - edits are overwritten on `deconflow slurm up`.
{CONFIG_MARK}
ClusterName={CLUSTER_NAME}
SlurmctldHost={NODE_NAME}(127.0.0.1)
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={lay.munge_socket}
StateSaveLocation={lay.ctld_spool}
SlurmdSpoolDir={lay.slurmd_spool}
SlurmctldPidFile={lay.pid("slurmctld")}
SlurmdPidFile={lay.pid("slurmd")}
SlurmctldLogFile={lay.logfile("slurmctld")}
SlurmdLogFile={lay.logfile("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={lay.etc / "plugstack.conf"}
# No cgroups in containers: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={SLURMDBD_PORT}
# For slurmdbd connections clients take the munge socket from here, not from AuthInfo.
AccountingStoragePass={lay.munge_socket}
AccountingStorageTRES=gres/gpu,gres/shard
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
GresTypes=gpu,shard
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=60
KillWait=5
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
Waittime=0
Licenses={SERIAL_LICENSE}:1
NodeName={NODE_NAME} NodeHostname={NODE_NAME} NodeAddr=127.0.0.1 CPUs={cpus} Boards=1 \
SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={_real_memory_mb()} \
Gres=gpu:{gpus},shard:{shards} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=FORCE:4
"""
    gres_conf = f"""\
# Fake GPUs: symlinks to /dev/null pass as /dev/nvidiaN; CUDA_VISIBLE_DEVICES is set per job.
AutoDetect=off
NodeName={NODE_NAME} Name=gpu File={lay.dev}/nvidia[0-{gpus - 1}]
NodeName={NODE_NAME} Name=shard Count={shards}
"""
    cgroup_conf = """\
# Unused (proctrack/linuxproc + task/none) but read by slurmd; keep it from touching cgroups.
CgroupAutomount=no
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=no
ConstrainSwapSpace=no
"""
    slurmdbd_conf = f"""\
# Generated by deconflow_dev.slurm_cluster
AuthType=auth/munge
AuthInfo=socket={lay.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={SLURMDBD_PORT}
SlurmUser=root
LogFile={lay.logfile("slurmdbd")}
PidFile={lay.pid("slurmdbd")}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={MARIADB_PORT}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""
    _write(lay.slurm_conf, slurm_conf)
    _write(lay.gres_conf, gres_conf)
    _write(lay.cgroup_conf, cgroup_conf)
    _write(lay.etc / "plugstack.conf", "")
    # slurmdbd refuses a config that is not 0600 and owned by SlurmUser (root, i.e. us).
    _write(lay.slurmdbd_conf, slurmdbd_conf, mode=0o600)


# --------------------------------------------------------------------------- daemon starters


def _munge_ok(lay: Layout) -> bool:
    cred = _run([_bin("munge"), "-n", "-S", str(lay.munge_socket)], lay, check=False, timeout=10)
    if cred.returncode != 0:
        return False
    back = _run(
        [_bin("unmunge"), "-S", str(lay.munge_socket)],
        lay,
        check=False,
        timeout=10,
        input=cred.stdout,
    )
    return back.returncode == 0


def _start_munged(lay: Layout) -> None:
    _run(
        [
            _bin("munged"),
            "--force",
            f"--socket={lay.munge_socket}",
            f"--key-file={lay.munge_key}",
            f"--pid-file={lay.pid('munged')}",
            f"--log-file={lay.logfile('munged')}",
            f"--seed-file={lay.munge_dir / 'munged.seed'}",
            "--num-threads=4",
        ],
        lay,
    )
    _wait("munged credential round-trip", lambda: _munge_ok(lay), lay.logfile("munged"))


def _mysql(lay: Layout, sql: str) -> subprocess.CompletedProcess[str]:
    argv = [_bin("mariadb"), "--no-defaults", f"--socket={lay.mysql_socket}", "-uroot", "-e", sql]
    return _run(argv, lay)


def _start_mariadb(lay: Layout) -> None:
    log = lay.logfile("mariadbd")
    if not (lay.mysql_data / "mysql").is_dir():
        _say(f"initialising MariaDB datadir {lay.mysql_data}")
        lay.mysql_data.mkdir(parents=True, exist_ok=True)
        with open(lay.log / "mariadb-install-db.log", "ab") as out:
            rc = subprocess.run(
                [
                    _bin("mariadb-install-db"),
                    "--no-defaults",
                    f"--datadir={lay.mysql_data}",
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                stdout=out,
                stderr=out,
                cwd=lay.root,
            ).returncode
        if rc != 0:
            raise ClusterError(
                "mariadb-install-db failed\n" + _tail(lay.log / "mariadb-install-db.log")
            )
    _spawn_detached(
        [
            _bin("mariadbd"),
            "--no-defaults",
            f"--datadir={lay.mysql_data}",
            f"--socket={lay.mysql_socket}",
            f"--port={MARIADB_PORT}",
            "--bind-address=127.0.0.1",
            f"--pid-file={lay.pid('mariadbd')}",
            f"--log-error={log}",
            "--user=root",
            "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=64M",
            "--innodb-lock-wait-timeout=900",
            "--max-allowed-packet=16M",
        ],
        lay,
        log,
    )

    def ping() -> bool:
        argv = [
            _bin("mariadb-admin"),
            "--no-defaults",
            f"--socket={lay.mysql_socket}",
            "-uroot",
            "ping",
        ]
        return _run(argv, lay, check=False, timeout=10).returncode == 0

    _wait("MariaDB to answer ping", ping, log)
    grants = [f"CREATE DATABASE IF NOT EXISTS {DB_NAME};"]
    for host in ("localhost", "127.0.0.1"):
        grants.append(f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{DB_PASS}';")
        grants.append(f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'{host}';")
    _mysql(lay, " ".join(grants))


def _start_slurmdbd(lay: Layout) -> None:
    _run([_bin("slurmdbd")], lay)

    def ready() -> bool:
        if not _port_open(SLURMDBD_PORT):
            return False
        return (
            _run([_bin("sacctmgr"), "-n", "-P", "list", "cluster"], lay, check=False).returncode
            == 0
        )

    _wait("slurmdbd to accept sacctmgr", ready, lay.logfile("slurmdbd"))
    clusters = _run([_bin("sacctmgr"), "-n", "-P", "list", "cluster", "format=cluster"], lay)
    if CLUSTER_NAME not in clusters.stdout.split():
        _say(f"registering cluster {CLUSTER_NAME!r} in accounting")
        _run([_bin("sacctmgr"), "-i", "add", "cluster", CLUSTER_NAME], lay)


def _start_slurmctld(lay: Layout) -> None:
    _run([_bin("slurmctld"), "-f", str(lay.slurm_conf)], lay)

    def ready() -> bool:
        out = _run([_bin("scontrol"), "ping"], lay, check=False, timeout=10).stdout
        return "UP" in out

    _wait("slurmctld to answer `scontrol ping`", ready, lay.logfile("slurmctld"))


def _start_slurmd(lay: Layout) -> None:
    _run([_bin("slurmd"), "-f", str(lay.slurm_conf), "-N", NODE_NAME], lay)


def node_state(lay: Layout) -> str | None:
    """Node state as sinfo prints it (e.g. ``idle``, ``down*``, ``drained``), None if unknown."""
    proc = _run(
        [_bin("sinfo"), "-h", "-N", "-n", NODE_NAME, "-o", "%T"], lay, check=False, timeout=10
    )
    lines = proc.stdout.split()
    return lines[0] if proc.returncode == 0 and lines else None


def _wait_node_ready(lay: Layout, timeout: float = STEP_TIMEOUT_S) -> None:
    """Wait for the node to be schedulable; resume it if it came back down/drained."""
    last_resume = 0.0

    def ready() -> bool:
        nonlocal last_resume
        state = node_state(lay) or ""
        if state in NODE_OK_STATES:
            return True
        responding = not state.endswith("*")
        bad = any(s in state for s in ("down", "drain", "fail"))
        if bad and responding and time.monotonic() - last_resume > 2:
            _say(f"node is {state}; resuming it")
            last_resume = time.monotonic()
            _run(
                [_bin("scontrol"), "update", f"nodename={NODE_NAME}", "state=resume"],
                lay,
                check=False,
            )
        return False

    try:
        _wait(f"node {NODE_NAME} to become idle in sinfo", ready, lay.logfile("slurmd"), timeout)
    except ClusterError as exc:
        raise ClusterError(f"{exc}\n{_tail(lay.logfile('slurmctld'), 20)}") from None


STARTERS: dict[str, Callable[[Layout], None]] = {
    "munged": _start_munged,
    "mariadbd": _start_mariadb,
    "slurmdbd": _start_slurmdbd,
    "slurmctld": _start_slurmctld,
    "slurmd": _start_slurmd,
}


# --------------------------------------------------------------------------- public API


def up(state_dir: Path | None = None) -> ClusterInfo:
    """Bring the cluster up (installing packages if needed); a no-op when it already runs.
    Callers in parallel (test workers) wait for one another."""
    with ports.service_lock("slurm"):
        return _up(state_dir)


def _up(state_dir: Path | None) -> ClusterInfo:
    t0 = time.monotonic()
    lay = _layout(state_dir)
    started: list[str] = []
    running = {d: _daemon_pid(lay, d) for d in DAEMONS}
    if any(running.values()) and not _config_current(lay):
        _say("its configs are from an older deconflow_dev: restarting with new ones")
        _down(lay.root)
        running = {d: _daemon_pid(lay, d) for d in DAEMONS}
    if all(running.values()) and node_state(lay) in NODE_OK_STATES:
        _say(f"already up (state dir {lay.root})")
    else:
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterError("the local SLURM cluster runs its daemons as root; run as root")
        _say(f"writing configs under {lay.root}")
        write_configs(lay)
        for daemon in DAEMONS:
            pid = _daemon_pid(lay, daemon)
            if pid:
                _say(f"{daemon} already running (pid {pid})")
                continue
            _say(f"starting {daemon}")
            STARTERS[daemon](lay)
            started.append(daemon)
        _say(f"waiting for node {NODE_NAME} to be idle")
        _wait_node_ready(lay)
        _say(f"cluster {CLUSTER_NAME!r} up in {time.monotonic() - t0:.1f}s")
    return ClusterInfo(
        state_dir=lay.root,
        slurm_conf=lay.slurm_conf,
        cluster_name=CLUSTER_NAME,
        node_name=NODE_NAME,
        partition=PARTITION,
        gpus=gpu_count(),
        shards=shard_count(),
        ports={
            "slurmctld": SLURMCTLD_PORT,
            "slurmd": SLURMD_PORT,
            "slurmdbd": SLURMDBD_PORT,
            "mariadb": MARIADB_PORT,
        },
        env=env(lay.root),
        started=started,
        elapsed_s=round(time.monotonic() - t0, 2),
    )


def _config_current(lay: Layout) -> bool:
    try:
        return CONFIG_MARK in lay.slurm_conf.read_text().splitlines()
    except OSError:
        return False


def _cancel_all_jobs(lay: Layout) -> None:
    """Cancel queued/running jobs so no slurmstepd outlives slurmd."""
    proc = _run([_bin("squeue"), "-h", "-o", "%A"], lay, check=False, timeout=10)
    ids = proc.stdout.split() if proc.returncode == 0 else []
    if not ids:
        return
    _say(f"cancelling {len(ids)} job(s)")
    _run([_bin("scancel"), *ids], lay, check=False, timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = _run([_bin("squeue"), "-h", "-t", "R,CG", "-o", "%A"], lay, check=False).stdout
        if not left.strip():
            break
        time.sleep(0.5)


def down(state_dir: Path | None = None) -> None:
    """Stop every daemon of this state dir (pid files first, then a /proc sweep); idempotent."""
    with ports.service_lock("slurm"):
        _down(state_dir)


def _down(state_dir: Path | None) -> None:
    lay = _layout(state_dir)
    if _daemon_pid(lay, "slurmctld"):
        _cancel_all_jobs(lay)
    for daemon in reversed(DAEMONS):
        pid = _daemon_pid(lay, daemon)
        if pid is None:
            continue
        _say(f"stopping {daemon} (pid {pid})")
        hard = _kill_and_wait([pid], timeout=30 if daemon == "mariadbd" else 15)
        if hard:
            _say(f"{daemon} ignored SIGTERM; killed")
        lay.pid(daemon).unlink(missing_ok=True)
    strays = _our_stray_pids(lay)
    if strays:
        _say(f"killing leftover processes {strays}")
        _kill_and_wait(strays, timeout=5)
    left = _our_stray_pids(lay)
    if left:
        raise ClusterError(f"processes still running after down: {left}")
    _say("cluster down")


def status(state_dir: Path | None = None) -> dict:
    """Which daemons run (pid per daemon), the node state and the ``sinfo`` table."""
    lay = _layout(state_dir)
    daemons = {d: _daemon_pid(lay, d) for d in DAEMONS}
    sinfo = None
    state = None
    if daemons["slurmctld"]:
        proc = _run([_bin("sinfo")], lay, check=False, timeout=10)
        sinfo = (proc.stdout + proc.stderr).rstrip()
        state = node_state(lay)
    return {
        "state_dir": str(lay.root),
        "slurm_conf": str(lay.slurm_conf),
        "daemons": daemons,
        "all_up": all(daemons.values()),
        "node_state": state,
        "up": all(daemons.values()) and state in NODE_OK_STATES,
        "sinfo": sinfo,
    }


# --------------------------------------------------------------------------- CLI


def _print_status(st: dict) -> None:
    print(f"state dir:  {st['state_dir']}")
    print(f"SLURM_CONF: {st['slurm_conf']}")
    for daemon, pid in st["daemons"].items():
        print(f"  {daemon:<10} {'running (pid ' + str(pid) + ')' if pid else 'stopped'}")
    print(f"node {NODE_NAME}: {st['node_state'] or 'unknown'}")
    if st["sinfo"]:
        print(st["sinfo"])


def main(argv: list[str] | None = None) -> int:
    """``deconflow slurm up|down|status|env``; returns a process exit code."""
    parser = argparse.ArgumentParser(
        prog="deconflow slurm", description="One-node SLURM cluster on localhost for dev/CI."
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"default: ${MARKER_VAR} or $DECONFLOW_DATA/slurm (data/slurm)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            info = up(args.state_dir)
            if args.json:
                print(json.dumps(asdict(info), default=str, indent=2))
            else:
                _print_status(status(args.state_dir))
                print(f"export SLURM_CONF={info.slurm_conf}")
        elif args.command == "down":
            down(args.state_dir)
        elif args.command == "status":
            st = status(args.state_dir)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
            return 0 if st["up"] else 3
        else:
            for key, value in env(args.state_dir).items():
                print(f"export {key}={value}")
    except ClusterError as exc:
        print(f"[deconflow slurm] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
