"""The installed package: `cmake --install` into a temporary prefix, then everything a consumer
does with it — find_package(gpuslot) + gpuslot::gpuslot, pkg-config gpuslot, the gpuslot
command, `import gpuslot` from the prefix — against the fake NVML.

Run by CTest (package.test_installed_package), which sets the variables read below.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUILD = Path(os.environ.get("GPUSLOT_BUILD_DIR", "")).resolve() if os.environ.get("GPUSLOT_BUILD_DIR") else None
SOURCE = Path(os.environ.get("GPUSLOT_SOURCE_DIR", Path(__file__).resolve().parents[2]))
CMAKE = os.environ.get("GPUSLOT_CMAKE", "cmake")
GENERATOR = os.environ.get("GPUSLOT_CMAKE_GENERATOR", "Ninja")
CXX = os.environ.get("GPUSLOT_CXX", "c++")
SANITIZE = os.environ.get("GPUSLOT_SANITIZE_FLAGS", "")
ASAN_RUNTIME = os.environ.get("GPUSLOT_ASAN_RUNTIME", "")


def run(argv, env=None, cwd=None, check=True, timeout=300):
    completed = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        pytest.fail("%s exited %d\n--- stdout\n%s--- stderr\n%s" % (
            " ".join(map(str, argv)), completed.returncode, completed.stdout, completed.stderr))
    return completed


def tool_env():
    """The environment for compilers and CMake: no preloaded sanitizer runtime."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    if BUILD is None:
        pytest.skip("GPUSLOT_BUILD_DIR is not set: run through ctest")
    root = tmp_path_factory.mktemp("installed")
    run([CMAKE, "--install", BUILD, "--prefix", root], env=tool_env())
    return root


@pytest.fixture
def fake_gpus(prefix, tmp_path):
    """Environment for a program using the installed fake NVML on a 4-GPU host."""
    host = tmp_path / "4x24g.json"
    shutil.copyfile(SOURCE / "tests" / "hosts" / "4x24g.json", host)
    env = tool_env()
    for name in list(env):
        if name.startswith(("GPUSLOT_", "CUDA_")):
            del env[name]
    env.update(GPUSLOT_NVML_LIBRARY=str(prefix / "libexec" / "gpuslot" / "libnvidia-ml.so.1"),
               GPUSLOT_FAKE_NVML_HOST=str(host), GPUSLOT_STATE_DIR=str(tmp_path / "state"), TMPDIR=str(tmp_path))
    return env


def libdir(prefix):
    found = sorted(prefix.glob("lib*/**/libgpuslot.so")) + sorted(prefix.glob("lib*/libgpuslot.so"))
    assert found, "libgpuslot.so is not installed under %s" % prefix
    return found[0].parent


def test_the_install_has_library_headers_package_files_and_command(prefix):
    lib = libdir(prefix)
    assert (lib / "libgpuslot.so").is_symlink() and list(lib.glob("libgpuslot.so.0*"))
    for header in ("gpuslot.hpp", "pool.hpp", "error.hpp", "units.hpp", "lease.hpp", "visibility.hpp"):
        assert (prefix / "include" / "gpuslot" / header).exists(), header
    assert (lib / "cmake" / "gpuslot" / "gpuslotConfig.cmake").exists()
    assert (lib / "cmake" / "gpuslot" / "gpuslotConfigVersion.cmake").exists()
    assert (lib / "pkgconfig" / "gpuslot.pc").exists()
    assert os.access(prefix / "bin" / "gpuslot", os.X_OK)
    assert (prefix / "libexec" / "gpuslot" / "libnvidia-ml.so.1").exists()
    # Only gpuslot's own symbols are exported (nothing of nlohmann, CLI11 or SQLite).
    symbols = run(["nm", "-DC", "--defined-only", lib / "libgpuslot.so"]).stdout.splitlines()
    assert any("gpuslot::acquire_lease" in line for line in symbols)
    assert not [line for line in symbols if "nlohmann" in line and "gpuslot" not in line]
    needed = run(["readelf", "-d", lib / "libgpuslot.so"]).stdout
    assert "libsqlite3" not in needed and "libnvidia-ml" not in needed


def test_the_installed_command_runs(prefix, fake_gpus):
    out = run([prefix / "bin" / "gpuslot", "status", "--json"], env=fake_gpus).stdout
    assert len(json.loads(out)["gpus"]) == 4


@pytest.fixture(scope="module")
def examples_built(prefix, tmp_path_factory):
    build = tmp_path_factory.mktemp("examples-build")
    flags = ["-DCMAKE_CXX_FLAGS=" + SANITIZE, "-DCMAKE_EXE_LINKER_FLAGS=" + SANITIZE] if SANITIZE else []
    run([CMAKE, "-S", SOURCE / "examples" / "cpp", "-B", build, "-G", GENERATOR, "-DCMAKE_PREFIX_PATH=%s" % prefix,
         "-DCMAKE_CXX_COMPILER=%s" % CXX, *flags], env=tool_env())
    run([CMAKE, "--build", build], env=tool_env())
    return build


def test_find_package_consumer_resolves_a_device(examples_built, fake_gpus):
    env = dict(fake_gpus, ASR_DEVICE="auto")
    first = run([examples_built / "asr_service", "16"], env=env)
    assert first.stdout.strip() == "cuda:0"
    assert "chosen: cuda:0 = GPU 0" in first.stderr
    env["ASR_DEVICE"] = "cuda:9"
    bad = run([examples_built / "asr_service"], env=env, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    env["ASR_DEVICE"] = "cpu"
    assert run([examples_built / "asr_service"], env=env).stdout.strip() == "cpu"


def test_find_package_consumer_runs_the_worker_pool(examples_built, fake_gpus):
    out = run([examples_built / "chunked_pipeline", "40", "4"], env=fake_gpus, timeout=120)
    lines = out.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["chunk-%d" % k for k in range(40)]
    assert "(after a retry)" in lines[7]
    # One worker per GPU, each loading its model once. Which workers end up taking the 40 short
    # tasks depends on how fast each starts (a loaded machine may let two of them take all).
    assert out.stderr.count("model loaded on") == 4
    assert {line.split(" on ")[1].split(" ")[0] for line in lines} <= {"cuda:0", "cuda:1", "cuda:2", "cuda:3"}


def test_pkg_config_consumer(prefix, fake_gpus, tmp_path):
    env = tool_env()
    env["PKG_CONFIG_PATH"] = str(libdir(prefix) / "pkgconfig")
    flags = run(["pkg-config", "--cflags", "--libs", "gpuslot"], env=env).stdout.split()
    lib = run(["pkg-config", "--variable=libdir", "gpuslot"], env=env).stdout.strip()
    assert Path(lib).resolve() == libdir(prefix).resolve()
    program = tmp_path / "asr_service"
    # C++17 on purpose: the public headers promise it.
    run([CXX, "-std=c++17", *shlex.split(SANITIZE), SOURCE / "examples" / "cpp" / "asr_service.cpp", "-o", program,
         *flags, "-Wl,-rpath," + lib], env=env)
    out = run([program, "20"], env=dict(fake_gpus, ASR_DEVICE="cuda"))
    assert out.stdout.strip() == "cuda:0"


def test_installed_python_module(prefix, fake_gpus):
    if os.environ.get("GPUSLOT_BUILD_PYTHON", "1") in ("0", "OFF", ""):
        pytest.skip("the Python module is not built (GPUSLOT_BUILD_PYTHON=OFF)")
    site = prefix / os.environ["GPUSLOT_PYTHON_INSTALL_DIR"]
    env = dict(fake_gpus, PYTHONPATH=str(site))
    if ASAN_RUNTIME:
        env["LD_PRELOAD"] = ASAN_RUNTIME
    out = run(["/usr/bin/python3", "-c",
               "import gpuslot; print(gpuslot.__file__); print(gpuslot.select_best_gpu(8)); "
               "print(len(gpuslot.status()['gpus']))"], env=env).stdout.splitlines()
    assert out[0] == str(site / "gpuslot" / "__init__.py")
    assert out[1:] == ["0", "4"]
    typed = site / "gpuslot"
    assert (typed / "__init__.pyi").exists() and (typed / "py.typed").exists()
