"""gpuslot.resolve_device has the semantics of `gpuslot device`, case by case.

Each case runs the command and the function on the same host and environment and compares what
they resolve to, how they fail, and the per-GPU lines (the command's stderr, the function's
`gpuslot` log records).
"""
import pytest

from conftest import read_host, write_host

# Runs resolve_device and prints: the device (or "!<exception> <exit code>"), then every log
# line, then the error message.
_RESOLVE = """
    import logging, os, sys
    import gpuslot
    lines = []
    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage())
    logging.getLogger("gpuslot").addHandler(Keep())
    logging.getLogger("gpuslot").setLevel(logging.INFO)
    spec = os.environ.get("SPEC") or None
    gib = float(os.environ["GIB"]) if os.environ.get("GIB") else None
    try:
        print(gpuslot.resolve_device(spec, env=os.environ.get("ENV_NAME", "GPUSLOT_DEVICE"), min_free_memory_gb=gib))
        error = None
    except gpuslot.GpuslotError as caught:
        print("!%s %d" % (type(caught).__name__, caught.exit_code))
        error = caught
    for line in lines:
        print(line)
    if error is not None:
        print("gpuslot: " + str(error))
"""

CASES = {
    # name: (host, spec, env_name, gib, extra environment)
    "auto": ("4x24g", None, None, None, {}),
    "auto_no_driver": (None, None, None, None, {}),
    "cuda_no_driver": (None, "cuda", None, None, {}),
    "cpu": ("4x24g", "cpu", None, None, {}),
    "cuda": ("4x24g", "cuda", None, 8, {}),
    "ordinal": ("4x24g", "cuda:2", None, None, {}),
    "ordinal_too_big": ("4x24g", "cuda:9", None, None, {}),
    "uuid_prefix": ("4x24g", "GPU-78fb", None, None, {}),
    "unknown_uuid": ("4x24g", "GPU-ffff", None, None, {}),
    "bad_spec": ("4x24g", "gpu:1", None, None, {}),
    "from_service_variable": ("4x24g", None, "ASR_DEVICE", None, {"ASR_DEVICE": "cuda:1"}),
    "bad_service_variable": ("4x24g", None, "ASR_DEVICE", None, {"ASR_DEVICE": "cuda:x"}),
    "nothing_fits": ("full", "auto", None, 8, {}),
    "too_big_ever": ("4x24g", "auto", None, 100, {}),
    "visible_subset": ("4x24g", "cuda:1", None, None, {"CUDA_VISIBLE_DEVICES": "2,3"}),
    "hidden_auto": ("4x24g", "auto", None, None, {"CUDA_VISIBLE_DEVICES": ""}),
    "hidden_cuda": ("4x24g", "cuda", None, None, {"CUDA_VISIBLE_DEVICES": "-1"}),
    "uuid_hidden": ("4x24g", "GPU-e95d", None, None, {"CUDA_VISIBLE_DEVICES": "1"}),
    "mixed_ambiguous": ("mixed", "auto", None, None, {}),
    "mixed_pci_bus_id": ("mixed", "auto", None, 4, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
    # Inside a Slurm job only the granted GPUs are candidates (the visibility layer reads the grant).
    "slurm_granted": ("4x24g", "auto", None, 8,
                      {"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "1,2", "CUDA_VISIBLE_DEVICES": "1,2"}),
    "slurm_granted_none": ("4x24g", "auto", None, None, {"SLURM_JOB_ID": "12"}),
    "slurm_cuda_needs_a_grant": ("4x24g", "cuda", None, None, {"SLURM_JOB_ID": "12"}),
    "slurm_not_granted": ("4x24g", "cuda:0", None, None,
                          {"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "1,2", "CUDA_VISIBLE_DEVICES": "0,1,2"}),
    "slurm_unreadable_grant": ("4x24g", "auto", None, None,
                               {"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "x", "CUDA_VISIBLE_DEVICES": "2"}),
}


def _host_file(host, name):
    if name is None:
        return None
    if name != "full":
        return host(name)
    path = host("4x24g")
    data = read_host(path)
    for gpu in data["gpus"]:
        gpu["memory_used_mib"] = 20 * 1024
    write_host(path, data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_answer_as_gpuslot_device(case, host, gpuslot, python_run):
    host_name, spec, env_name, gib, extra = CASES[case]
    host_path = _host_file(host, host_name)
    args = ["device"] + ([spec] if spec else []) + (["--env", env_name] if env_name else []) + (
        ["--mem", "%gG" % gib] if gib else [])
    command = gpuslot(*args, host=host_path, env=extra)
    env = dict(extra, SPEC=spec or "", GIB="" if gib is None else gib)
    if env_name:
        env["ENV_NAME"] = env_name
    function = python_run(_RESOLVE, host=host_path, env=env).stdout.splitlines()

    answer, function_lines = function[0], function[1:]
    if command.returncode == 0:
        assert answer == command.stdout.strip()
    else:
        kind, exit_code = answer[1:].split()
        assert answer.startswith("!"), function
        assert int(exit_code) == command.returncode, (kind, command.stderr)
    # The same lines, in the same order: the command's stderr is the function's log.
    command_lines = [line.replace("gpuslot: warning: ", "warning: ") for line in command.stderr.splitlines()]
    assert function_lines == command_lines


def test_memory_request_is_held_for_the_process_life(python_spawn, host, gpuslot):
    # The one deliberate difference from the command: in-process, the choice is also reserved,
    # so two services starting together spread out.
    host_path = host("4x24g")
    code = """
        import time, gpuslot
        print(gpuslot.resolve_device(env="ASR_DEVICE", min_free_memory_gb=16), flush=True)
        time.sleep(60)
    """
    first = python_spawn(code, host_path, env={"ASR_DEVICE": "auto"})
    from conftest import wait_until
    wait_until(lambda: first.stdout_text().strip(), what="the first service's device")
    second = python_spawn(code, host_path, env={"ASR_DEVICE": "auto"})
    wait_until(lambda: second.stdout_text().strip(), what="the second service's device")
    assert first.stdout_text().strip() == "cuda:0"
    assert second.stdout_text().strip() == "cuda:1"
    held = gpuslot("leases", "--json", host=host_path, check=0).stdout
    assert "resolve_device: " in held
