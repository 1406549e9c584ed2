"""The Python examples of the README run as documented, on the fake NVML: a service resolving
its device at start (examples/python/asr_service.py) and a pipeline with one worker per GPU
(examples/python/chunked_asr_pipeline.py)."""
import subprocess

from conftest import PYTHON, wait_until


def _example(source_dir, name):
    return str(source_dir / "examples" / "python" / name)


def test_services_started_together_spread_over_the_gpus(source_dir, python_env, host, tmp_path):
    host_path = host("4x24g")
    env = python_env(host_path, ASR_DEVICE="auto", ASR_MODEL_GIB="16", ASR_SERVE_SECONDS="30")
    services = [subprocess.Popen([PYTHON, _example(source_dir, "asr_service.py")], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        devices = sorted(service.stdout.readline().strip() for service in services)
    finally:
        for service in services:
            service.kill()
            service.communicate()
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_service_with_no_room_and_with_a_bad_setting(source_dir, python_env, host):
    host_path = host("4x24g")
    full = subprocess.run([PYTHON, _example(source_dir, "asr_service.py")], capture_output=True, text=True,
                          env=python_env(host_path, ASR_DEVICE="auto", ASR_MODEL_GIB="30"))
    assert full.returncode == 1 and "asr_service: no GPU fits" in full.stderr
    bad = subprocess.run([PYTHON, _example(source_dir, "asr_service.py")], capture_output=True, text=True,
                         env=python_env(host_path, ASR_DEVICE="cuda:7"))
    assert bad.returncode == 2 and "cuda:7 does not exist" in bad.stderr
    cpu = subprocess.run([PYTHON, _example(source_dir, "asr_service.py")], capture_output=True, text=True,
                         env=python_env(None, ASR_DEVICE="auto"))
    assert cpu.returncode == 0 and cpu.stdout.strip() == "cpu" and "auto: using cpu" in cpu.stderr


def test_chunked_pipeline_transcript_is_complete_and_in_order(source_dir, python_env, host):
    out = subprocess.run([PYTHON, _example(source_dir, "chunked_asr_pipeline.py"), "40", "4"], capture_output=True,
                         text=True, env=python_env(host("4x24g")), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["chunk %d" % k for k in range(40)]
    assert "workers on cuda:0, cuda:1, cuda:2, cuda:3" in out.stderr
