"""A real one-node Slurm for the tests: slurmctld, slurmd and munged from Debian's packages, on
127.0.0.1, with fake GPUs that Slurm manages as GRES.

The recipe is ../shared/reference/slurm-single-node.md (Slurm 22.05.8 on Debian 12, node idle in
about half a second). What this module adds to it, and why:

* Everything lives in a private directory (tempfile.mkdtemp under /tmp: unix socket paths must
  stay under 108 bytes) with two free ports and a node name of its own, so two test processes
  can each run a cluster at once (ctest -j) and nothing is left in a fixed place.
* The GPUs are character devices made with mknod, major 195 (NVIDIA's) and minor N, named
  nvidiaN, exactly what gres.conf names on a real node: slurmd accepts only character or block
  devices, and without them it sets no CUDA_VISIBLE_DEVICES or SLURM_*_GPUS. Nothing opens them
  (there is no driver); the fake NVML (GPUSLOT_FAKE_NVML_HOST) describes the GPUs.
* The daemons are this process's children, each in its own session (a Ctrl-C of the test run must
  not kill them before the orderly stop) and with PR_SET_PDEATHSIG, so they die with the test
  process even if it is SIGKILLed (a ctest time-out). stop() cancels every job of this cluster,
  waits for its slurmstepd processes (found by this cluster's SLURM_CONF in their environment),
  and terminates exactly the daemons it started, by pid, after checking /proc/PID/comm. Never
  pkill or killall: other Slurm clusters, or another test's, may be running.
* Jobs inherit the submitting environment (sbatch/srun --export=ALL, Slurm's default), which is
  how GPUSLOT_NVML_LIBRARY, GPUSLOT_FAKE_NVML_HOST and GPUSLOT_STATE_DIR reach gpuslot inside a job.

Use it through the `slurm_cluster` fixture (tests/slurm/conftest.py), or directly:

    cluster = SlurmCluster(base_dir)
    cluster.start()            # raises SlurmStartError with the daemons' last log lines
    job = cluster.sbatch("--gres=gpu:2", script=path, env=environment)
    state = cluster.wait_job(job)            # "COMPLETED", "FAILED", ... (raises on time-out)
    cluster.stop()
"""
import ctypes
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

# The programs the cluster needs, by package (scripts/packages.txt installs them).
REQUIRED_PROGRAMS = {
    "slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge", "munge": "munge", "unmunge": "munge",
    "sbatch": "slurm-client", "srun": "slurm-client", "squeue": "slurm-client", "scontrol": "slurm-client",
    "scancel": "slurm-client", "sinfo": "slurm-client",
}

# Final job states (squeue/scontrol JobState); a job in one of these will not run again.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}

NVIDIA_MAJOR = 195


class SlurmStartError(RuntimeError):
    """The cluster did not come up; the message ends with the relevant log lines."""


def unavailable_reason():
    """Why a cluster cannot be started here (a skip reason), or None."""
    if os.geteuid() != 0:
        return ("needs root: the test cluster runs slurmctld/slurmd as SlurmUser=root and makes its fake "
                "GPU device files with mknod")
    missing = sorted(name for name in REQUIRED_PROGRAMS if shutil.which(name) is None)
    if missing:
        packages = sorted({REQUIRED_PROGRAMS[name] for name in missing})
        return "Slurm is not installed (missing %s; apt-get install %s, see scripts/packages.txt)" % (
            ", ".join(missing), " ".join(packages))
    return None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent():
    """preexec_fn: SIGTERM this daemon when the test process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _alive(pid):
    try:
        with open("/proc/%d/status" % pid) as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1:2] for line in status)
    except OSError:
        return False


def _read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _tail(path, lines=15):
    return "\n".join(_read(path).splitlines()[-lines:])


class SlurmCluster:
    """One slurmctld + one slurmd (node with `gpus` fake GPUs, `shards_per_gpu` gres/shard each)
    and a munged, all under `base`. `cgroup=True` adds task/cgroup with ConstrainDevices=yes (jobs
    then see only their own device files and CUDA_VISIBLE_DEVICES restarts at 0)."""

    def __init__(self, base, gpus=4, shards_per_gpu=2, cgroup=False):
        self.base = Path(base)
        self.gpus = gpus
        self.shards_per_gpu = shards_per_gpu
        self.cgroup = cgroup
        # Unique per cluster: with cgroups slurmd names its cgroup directories after the node.
        self.node = "gs%d" % os.getpid()
        self.conf = self.base / "etc" / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        self._daemons = []  # (name, Popen), in start order

    # --- set-up ---------------------------------------------------------------------------------

    def device(self, minor):
        """Path of fake GPU `minor` (/dev/nvidia<minor> of this node)."""
        return self.base / "dev" / ("nvidia%d" % minor)

    def _write_config(self):
        for sub in ("etc", "state", "spool", "log", "run", "dev", "munge", "jobs"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.base / "munge", 0o755)  # munged warns about a socket directory others cannot search
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for minor in range(self.gpus):
            os.mknod(self.device(minor), 0o600 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, minor))

        ctld_port, slurmd_port = free_port(), free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        cpus = max(os.cpu_count() or 1, 8)  # a job takes a core; advertise enough for the tests' jobs
        try:
            own_address = socket.gethostbyname(socket.gethostname())
        except OSError:
            own_address = ""
        lines = [
            "ClusterName=gpuslot",
            "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmctldPort=%d" % ctld_port,
            "SlurmdPort=%d" % slurmd_port,
            # Listen on the address gethostname() resolves to instead of 0.0.0.0 — only safe when
            # that is loopback (the reference's finding 3); otherwise clients still use 127.0.0.1.
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" if own_address.startswith("127.") else "",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=socket=%s" % self.munge_socket,
            "StateSaveLocation=%s" % (self.base / "state"),
            "SlurmdSpoolDir=%s" % (self.base / "spool"),
            "SlurmctldPidFile=%s" % (self.base / "run" / "slurmctld.pid"),
            "SlurmdPidFile=%s" % (self.base / "run" / "slurmd.pid"),
            "SlurmctldLogFile=%s" % (self.base / "log" / "slurmctld.log"),
            "SlurmdLogFile=%s" % (self.base / "log" / "slurmd.log"),
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "PlugStackConfig=%s" % (self.base / "etc" / "plugstack.conf"),
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/cgroup" if self.cgroup else "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/cgroup" if self.cgroup else "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",  # batch jobs start at once, not ~3 s late
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu,shard",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",  # finished jobs stay visible to scontrol for wait_job
            "NodeName=%s NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=%d Boards=1 SocketsPerBoard=1 "
            "CoresPerSocket=%d ThreadsPerCore=1 Gres=gpu:%d,shard:%d State=UNKNOWN"
            % (self.node, cpus, cpus, self.gpus, self.gpus * self.shards_per_gpu),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")
        # What an administrator writes for NVIDIA GPUs: one File per GPU, /dev/nvidia0.. in order.
        gres = ["Name=gpu File=%s/nvidia[0-%d]" % (self.base / "dev", self.gpus - 1)]
        gres += ["Name=shard Count=%d File=%s" % (self.shards_per_gpu, self.device(m)) for m in range(self.gpus)]
        (self.base / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
        cgroup = ["CgroupPlugin=autodetect"]
        if self.cgroup:
            cgroup += ["ConstrainDevices=yes", "ConstrainCores=no", "ConstrainRAMSpace=no"]
            if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2 without systemd: slurmd builds it
                cgroup.append("IgnoreSystemd=yes")
        (self.base / "etc" / "cgroup.conf").write_text("\n".join(cgroup) + "\n")
        (self.base / "etc" / "plugstack.conf").write_text("")

    def _start_daemon(self, name, argv):
        log = open(self.base / "log" / (name + ".stdout"), "w")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   start_new_session=True, preexec_fn=_die_with_parent, close_fds=True)
        log.close()
        self._daemons.append((name, process))
        return process

    def _wait_for(self, what, ready, process, timeout, log):
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                raise SlurmStartError("%s exited with status %d while starting:\n%s" % (what, process.returncode,
                                                                                       _tail(log)))
            if time.monotonic() > deadline:
                raise SlurmStartError("timed out after %d s waiting for %s:\n%s" % (timeout, what, _tail(log)))
            time.sleep(0.05)

    def _quiet(self, *argv, timeout=10):
        try:
            return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", "timed out")

    def start(self):
        """Writes the configuration, starts munged, slurmctld and slurmd, and returns once the node
        is idle (about half a second). On failure everything started is stopped again."""
        try:
            self._write_config()
            log = self.base / "log"
            munged = self._start_daemon("munged", [
                "munged", "--foreground", "--force", "--key-file=%s" % (self.base / "munge" / "munge.key"),
                "--socket=%s" % self.munge_socket, "--pid-file=%s" % (self.base / "run" / "munged.pid"),
                "--seed-file=%s" % (self.base / "munge" / "munged.seed"), "--origin=127.0.0.1"])

            def munge_works():
                credential = self._quiet("munge", "-n", "-S", str(self.munge_socket))
                return credential.returncode == 0 and subprocess.run(
                    ["unmunge", "-S", str(self.munge_socket)], input=credential.stdout, capture_output=True,
                    text=True, timeout=10).returncode == 0

            self._wait_for("munged", munge_works, munged, 20, log / "munged.stdout")
            slurmctld = self._start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for("slurmctld", lambda: self._quiet("scontrol", "ping").returncode == 0, slurmctld, 30,
                           log / "slurmctld.log")
            slurmd = self._start_daemon("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait_for("the node to become idle",
                           lambda: self._quiet("sinfo", "-h", "-n", self.node, "-o", "%t").stdout.strip() == "idle",
                           slurmd, 60, log / "slurmd.log")
        except BaseException:
            self.stop(remove=False)
            raise

    # --- jobs -----------------------------------------------------------------------------------

    def run(self, *argv, env=None, timeout=60, input=None):
        """Runs a Slurm client (or any program) against this cluster; `env` replaces the
        environment (SLURM_CONF is added)."""
        environment = dict(env if env is not None else self.env)
        environment["SLURM_CONF"] = str(self.conf)
        return subprocess.run([str(a) for a in argv], env=environment, capture_output=True, text=True,
                              timeout=timeout, input=input)

    def sbatch(self, *options, script=None, wrap=None, env=None):
        """Submits a batch job; returns its id. Its stdout and stderr go to output(job_id)."""
        argv = ["sbatch", "--parsable", "-o", str(self.base / "jobs" / "%j.out"), *options]
        argv += ["--wrap", wrap] if wrap is not None else [str(script)]
        result = self.run(*argv, env=env)
        if result.returncode != 0:
            raise RuntimeError("sbatch %s failed (%d): %s" % (" ".join(map(str, options)), result.returncode,
                                                              result.stderr.strip()))
        return result.stdout.strip().split(";")[0]

    def output(self, job_id):
        return _read(self.base / "jobs" / ("%s.out" % job_id))

    def job_state(self, job_id):
        shown = self.run("scontrol", "show", "job", "-o", job_id).stdout
        for field in shown.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def wait_job(self, job_id, timeout=60, states=FINAL_STATES):
        """Waits until the job's state is one of `states` (by default: ended) and returns it."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError("job %s still %s after %d s; output:\n%s" % (job_id, state, timeout,
                                                                              self.output(job_id)))
            time.sleep(0.1)

    def cancel_all(self, timeout=20):
        """Cancels every job of this cluster and waits until none is left in the queue."""
        jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if jobs:
            self.run("scancel", *jobs)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.1)

    # --- tear-down ------------------------------------------------------------------------------

    def _our_stepds(self):
        """slurmstepd processes of this cluster: they inherit slurmd's SLURM_CONF."""
        mine = ("SLURM_CONF=%s" % self.conf).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() != "slurmstepd":
                    continue
                if mine in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self, remove=True):
        """Cancels the jobs, lets their slurmstepd processes finish, stops the three daemons by pid
        and (remove=True) deletes the directory. Safe to call twice."""
        by_name = dict(self._daemons)
        slurmctld = by_name.get("slurmctld")
        if slurmctld is not None and slurmctld.poll() is None:
            self.cancel_all()
        deadline = time.monotonic() + 10
        while self._our_stepds() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._our_stepds():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name, process in reversed(self._daemons):
            if process.poll() is None:
                comm = _read("/proc/%d/comm" % process.pid).strip()
                if comm == name:  # our child, not yet reaped: the pid cannot have been reused
                    process.terminate()
                    try:
                        process.wait(10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        self._daemons = []
        if self.cgroup:  # slurmd leaves its (empty) top-level cgroup directories behind
            for directory in Path("/sys/fs/cgroup").glob("*/slurm_%s" % self.node):
                try:
                    directory.rmdir()
                except OSError:
                    pass
        if remove and not os.environ.get("GPUSLOT_KEEP_SLURM_DIR"):
            shutil.rmtree(self.base, ignore_errors=True)
