"""Two real Unix users share one state directory (DESIGN.md "Leases": 1777 like /tmp, each lease
file owned by its holder): each sees the other's leases, a reservation by one reduces what the
other can get, neither can release, delete or alter the other's lease, and root can release any.

Needs root (to create the users gpuslot-a and gpuslot-b and to switch to them); skipped
otherwise. Everything the users touch lives in a 0755 directory under /tmp, because pytest's
tmp_path is private to root.
"""
import json
import os
import stat
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import lease_file, wait_until

GiB = 1 << 30
USERS = ("gpuslot-a", "gpuslot-b")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


@pytest.fixture(scope="module")
def users():
    found = {}
    for name in USERS:
        try:
            found[name] = pwd.getpwnam(name)
        except KeyError:
            created = subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", name],
                                     capture_output=True, text=True)
            if created.returncode != 0:
                pytest.skip("cannot create user %s: %s" % (name, created.stderr.strip()))
            found[name] = pwd.getpwnam(name)
    return found


class Shared:
    """A host file and a root-made 1777 state directory that both users can reach."""

    def __init__(self, base, host_path, gpuslot_path, fake_env):
        self.base, self.host, self.gpuslot_path, self.fake_env = base, host_path, gpuslot_path, fake_env
        self.state = base / "state"
        self.started = []

    def env(self, **extra):
        return self.fake_env(self.host, GPUSLOT_STATE_DIR=self.state, **extra)

    def argv(self, user, args):
        switch = [] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", "--"]
        return switch + [str(self.gpuslot_path), *map(str, args)]

    def gpuslot(self, user, *args, check=None, timeout=30):
        result = subprocess.run(self.argv(user, args), env=self.env(), capture_output=True, text=True,
                                timeout=timeout)
        if check is not None and result.returncode != check:
            pytest.fail("[%s] gpuslot %s exited %d, expected %d\n%s%s" % (
                user, " ".join(map(str, args)), result.returncode, check, result.stdout, result.stderr))
        return result

    def start(self, user, *args):
        process = subprocess.Popen(self.argv(user, args), env=self.env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        self.started.append(process)
        return process

    def python_as(self, user, code, *args):
        """Runs python code as `user`; returns its stdout (JSON by convention)."""
        argv = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", "--", sys.executable, "-c", code,
                *map(str, args)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def leases(self, user):
        return json.loads(self.gpuslot(user, "leases", "--json", check=0).stdout)["leases"]

    def hold(self, user, mem):
        """`run --mem MEM -- sleep 60` as `user`; returns its lease once listed."""
        before = {lease["id"] for lease in self.leases("root")}
        self.start(user, "run", "--mem", mem, "--", "sleep", "60")
        return wait_until(lambda: next((lease for lease in self.leases("root") if lease["id"] not in before), None),
                          what="lease of %s" % user)


@pytest.fixture
def shared(users, gpuslot_path, fake_env, source_dir):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = tempfile.mkdtemp(prefix="gpuslot-multi-user-", dir="/tmp")
    os.chmod(base, 0o755)
    from pathlib import Path
    base = Path(base)
    made = Shared(base, base / "4x24g.json", gpuslot_path, fake_env)
    for name in ("4x24g.json", "1x4090.json"):
        shutil.copyfile(source_dir / "tests" / "hosts" / name, base / name)
        os.chmod(base / name, 0o644)
    made.state.mkdir()
    os.chmod(made.state, 0o1777)
    probe = subprocess.run(made.argv(USERS[0], ["--version"]), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the build tree is not readable by other users (%s): %s" % (gpuslot_path, probe.stderr.strip()))
    yield made
    for process in made.started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    shutil.rmtree(base, ignore_errors=True)


def test_each_user_sees_the_others_lease(shared, users):
    a = shared.hold("gpuslot-a", "20G")
    b = shared.hold("gpuslot-b", "20G")
    assert a["gpus"] != b["gpus"]  # 4 GiB left beside A's lease: B went elsewhere
    for viewer in USERS:
        seen = {lease["id"]: lease for lease in shared.leases(viewer)}
        assert set(seen) == {a["id"], b["id"]}, viewer
        assert (seen[a["id"]]["user"], seen[a["id"]]["uid"]) == ("gpuslot-a", users["gpuslot-a"].pw_uid)
        assert (seen[b["id"]]["user"], seen[b["id"]]["uid"]) == ("gpuslot-b", users["gpuslot-b"].pw_uid)
    for lease, owner in ((a, "gpuslot-a"), (b, "gpuslot-b")):
        info = os.stat(lease_file(shared.state, lease["id"]))
        assert info.st_uid == users[owner].pw_uid and info.st_mode & 0o777 == 0o644


def test_a_reservation_by_one_user_reduces_what_the_other_can_pick(shared):
    shared.host = shared.base / "1x4090.json"
    a = shared.hold("gpuslot-a", "20G")
    assert shared.gpuslot("gpuslot-b", "pick", "--mem", "10G").returncode == 1
    gpu = json.loads(shared.gpuslot("gpuslot-b", "status", "--json", check=0).stdout)["gpus"][0]
    assert gpu["memory"]["reserved"] == 20 * GiB and [lease["id"] for lease in gpu["leases"]] == [a["id"]]
    assert shared.gpuslot("gpuslot-b", "run", "--mem", "10G", "--wait", "0.5s", "--", "true").returncode == 124
    shared.gpuslot("root", "leases", "--release", a["id"], check=0)
    assert shared.gpuslot("gpuslot-b", "pick", "--mem", "10G", check=0).stdout.strip() == "0"


def test_a_user_cannot_release_another_users_lease_but_root_can(shared):
    b = shared.hold("gpuslot-b", "10G")
    refused = shared.gpuslot("gpuslot-a", "leases", "--release", b["id"])
    assert refused.returncode == 2, "a request this user may not make, not a broken state directory"
    assert "only its holder or root" in refused.stderr and "gpuslot-b" in refused.stderr, refused.stderr
    assert [lease["id"] for lease in shared.leases("gpuslot-a")] == [b["id"]]
    shared.gpuslot("root", "leases", "--release", b["id"], check=0)
    assert shared.leases("gpuslot-a") == []


TAMPER = r"""
import json, os, sys
path, forged = sys.argv[1], sys.argv[2]
outcome = {}
def attempt(name, action):
    try:
        action()
        outcome[name] = "succeeded"
    except OSError as error:
        outcome[name] = type(error).__name__
attempt("unlink", lambda: os.unlink(path))
attempt("open for writing", lambda: open(path, "r+").close())
attempt("truncate", lambda: os.truncate(path, 0))
attempt("chmod", lambda: os.chmod(path, 0o666))
attempt("rename away", lambda: os.rename(path, path + ".moved"))
open(forged, "w").write("{}")
attempt("replace by rename", lambda: os.replace(forged, path))
print(json.dumps(outcome))
"""


def test_a_user_cannot_delete_or_alter_another_users_lease_file(shared):
    b = shared.hold("gpuslot-b", "10G")
    path = lease_file(shared.state, b["id"])
    before = path.read_bytes()
    outcome = shared.python_as("gpuslot-a", TAMPER, path, shared.state / "forged-by-a")
    assert outcome == {name: "PermissionError" for name in outcome} and len(outcome) == 6, outcome
    assert path.read_bytes() == before
    assert [lease["id"] for lease in shared.leases("gpuslot-b")] == [b["id"]]


def test_a_lease_forged_in_another_users_name_is_not_trusted(shared, users):
    """A writes a complete, live-looking lease claiming B's uid: the owner check must refuse it."""
    shared.host = shared.base / "1x4090.json"
    gpu = json.loads(shared.host.read_text())["gpus"][0]["uuid"]
    now = int(time.time() * 1000)
    record = {"format": 1, "id": "1-forged00", "holder_pid": 1, "holder_start_ticks": 0,
              "uid": users["gpuslot-b"].pw_uid, "user": "gpuslot-b", "gpu_uuids": [gpu], "nvml_indices": [0],
              "reserved_bytes": 20 * GiB, "command": "forged", "taken_at_ms": now, "expires_at_ms": now + 600000}
    code = "import sys, os; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); " \
           "os.write(fd, sys.argv[2].encode()); print('{}')"
    shared.python_as("gpuslot-a", code, shared.state / "lease-1-forged00.json", json.dumps(record))
    listed = shared.gpuslot("gpuslot-b", "leases", "--json", check=0)
    assert json.loads(listed.stdout)["leases"] == []
    assert "lease-1-forged00.json" in listed.stderr and "uid" in listed.stderr
    assert shared.gpuslot("gpuslot-b", "pick", "--mem", "20G", check=0).stdout.strip() == "0"


def test_a_user_cannot_split_the_host_lock(shared, users):
    """Select-and-reserve is atomic only while every launch locks the same object. A lock *file*
    in a sticky directory stays deletable by the user who created it, and launches after the
    deletion would lock a new file: two could take the last room on a GPU. So the host lock is
    the state directory itself, which no user can delete while it holds leases.

    Here root stands in for a launch inside the critical section by holding the lock; user B's
    `pick --hold` must wait for it, and no lock file exists for anyone to delete."""
    shared.gpuslot("gpuslot-a", "run", "--mem", "1M", "--", "true", check=0)
    assert not (shared.state / "ledger.lock").exists()
    import fcntl
    held = os.open(shared.state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            racing = shared.gpuslot("gpuslot-b", "pick", "--mem", "1G", "--hold", "5s", timeout=2)
        except subprocess.TimeoutExpired:
            racing = None  # blocked on the lock, as it must be
    finally:
        os.close(held)
    assert racing is None, ("user B reserved while the host lock was held: "
                            "the host-wide lock can be split (rc %d, %s)" % (racing.returncode, racing.stderr.strip()))


def test_released_leases_are_kept_as_spares_each_user_for_itself(shared, users):
    # A finished `run` keeps its lease's inode in .spares-<uid>/, a directory only that user can
    # enter, for that user's next lease. A directory another user made under that name first is
    # never used (nor written): that user's launches then work without spares.
    a_uid, b_uid = users["gpuslot-a"].pw_uid, users["gpuslot-b"].pw_uid
    taken = shared.state / (".spares-%d" % b_uid)
    planted = taken / "planted"
    shared.python_as("gpuslot-a", "import os, sys, json; os.mkdir(sys.argv[1], 0o777); os.chmod(sys.argv[1], 0o777); "
                     "open(sys.argv[2], 'w').write('mine'); print(json.dumps(True))", taken, planted)
    for user in ("gpuslot-a", "gpuslot-b"):
        assert shared.gpuslot(user, "run", "--mem", "1G", "--", "true", check=0).returncode == 0
    mine = shared.state / (".spares-%d" % a_uid)
    info = os.lstat(mine)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == a_uid and stat.S_IMODE(info.st_mode) == 0o700
    assert [path.stat().st_uid for path in mine.iterdir()] == [a_uid]
    assert sorted(path.name for path in taken.iterdir()) == ["planted"], "b kept nothing in a's directory"
    assert planted.read_text() == "mine"
    assert shared.leases("root") == []

    shared.python_as("gpuslot-a", "import shutil, sys, json; shutil.rmtree(sys.argv[1]); print(json.dumps(True))", taken)
    assert shared.gpuslot("gpuslot-b", "run", "--mem", "1G", "--", "true", check=0).returncode == 0
    spares = list(taken.iterdir())
    assert len(spares) == 1 and spares[0].stat().st_uid == b_uid
    inode = spares[0].stat().st_ino
    lease = shared.hold("gpuslot-b", "1G")
    assert os.stat(lease_file(shared.state, lease["id"])).st_ino == inode, "b's next lease is its spare"


def test_roots_spares_never_go_into_a_directory_another_user_made_for_them(shared, users):
    # Root could open, and change, any directory: only one it owns is its spare directory.
    planted = shared.state / ".spares-0"
    shared.python_as("gpuslot-a", "import os, sys, json; os.mkdir(sys.argv[1]); os.chmod(sys.argv[1], 0o755); "
                     "print(json.dumps(True))", planted)
    assert shared.gpuslot("root", "run", "--mem", "1G", "--", "true", check=0).returncode == 0
    assert list(planted.iterdir()) == [], "root kept nothing in a's directory"
    assert stat.S_IMODE(os.lstat(planted).st_mode) == 0o755, "nor changed it"
    assert shared.leases("root") == []


def test_a_spare_directory_made_under_a_umask_that_takes_the_owners_bits_is_usable(shared, users):
    b_uid = users["gpuslot-b"].pw_uid
    argv = ["setpriv", "--reuid", "gpuslot-b", "--regid", "gpuslot-b", "--clear-groups", "--",
            "sh", "-c", 'umask 477 && exec "$0" "$@"', str(shared.gpuslot_path), "run", "--mem", "1G", "--", "true"]
    for _ in range(2):
        result = subprocess.run(argv, env=shared.env(), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    mine = shared.state / (".spares-%d" % b_uid)
    assert stat.S_IMODE(os.lstat(mine).st_mode) == 0o700
    assert len(list(mine.iterdir())) == 1, "the first run's file was kept, and the second run reused it"
