"""Bad input (DESIGN.md "Rules of behaviour"): exit status 2, nothing on stdout, and exactly one line
on stderr, starting `gpuslot: `, that names the bad value — so a script's log shows what to fix.
"""
import re

import pytest


NO_DRIVER = {"GPUSLOT_NVML_LIBRARY": "/nonexistent/libnvidia-ml.so.1"}

# (id, arguments, extra environment, the bad value the message must name)
CASES = [
    ("size_unit", ["pick", "--mem", "8X"], {}, "8X"),
    ("size_negative", ["pick", "--mem", "-1G"], {}, "-1G"),
    ("size_petabytes", ["pick", "--mem", "2P"], {}, "2P"),
    ("size_empty", ["pick", "--mem", ""], {}, "''"),
    ("gpus_zero", ["pick", "--gpus", "0"], {}, "0"),
    ("gpus_negative", ["pick", "--gpus", "-1"], {}, "-1"),
    ("gpus_word", ["pick", "--gpus", "two"], {}, "two"),
    ("strategy", ["pick", "--strategy", "fastest"], {}, "fastest"),
    ("exclude_out_of_range", ["pick", "--exclude", "99"], {}, "99"),
    ("exclude_word", ["pick", "--exclude", "gpu0"], {}, "gpu0"),
    ("exclude_unknown_uuid", ["pick", "--exclude", "GPU-ffff"], {}, "GPU-ffff"),
    ("exclude_ambiguous_uuid", ["pick", "--exclude", "GPU-4"], {}, "GPU-4"),
    ("format", ["pick", "--format", "xml"], {}, "xml"),
    ("max_util", ["pick", "--max-util", "150"], {}, "150"),
    ("max_util_word", ["pick", "--max-util", "high"], {}, "high"),
    ("hold_duration", ["pick", "--hold", "5x"], {}, "5x"),
    ("hold_empty", ["pick", "--hold", ""], {}, "''"),
    ("hold_zero", ["pick", "--mem", "1G", "--hold", "0"], {}, "0"),
    ("gpus_too_many", ["pick", "--gpus", "2000"], {}, "2000"),
    ("gpus_huge", ["pick", "--gpus", "99999999999"], {}, "99999999999"),
    ("max_util_negative", ["pick", "--max-util", "-1"], {}, "-1"),
    ("default_mem_env", ["run", "--", "true"], {"GPUSLOT_DEFAULT_MEM": "abc"}, "abc"),
    ("release_empty_id", ["leases", "--release", ""], {}, "''"),
    ("pick_device_spec", ["pick", "--device", "gpu1"], {}, "gpu1"),
    ("pick_device_ordinal", ["pick", "--device", "cuda:9"], {}, "cuda:9"),
    ("pick_device_ambiguous_uuid", ["pick", "--device", "GPU-4"], {}, "GPU-4"),
    ("device_spec", ["device", "cuda:x"], {}, "cuda:x"),
    ("device_word", ["device", "gpu"], {}, "gpu"),
    ("device_spec_from_env", ["device"], {"GPUSLOT_DEVICE": "cuda:x"}, "cuda:x"),
    ("device_size", ["device", "--mem", "8X"], {}, "8X"),
    ("device_strategy", ["device", "--strategy", "fastest"], {}, "fastest"),
    ("device_ordinal_out_of_range", ["device", "cuda:9"], {}, "cuda:9"),
    ("device_uuid_hidden", ["device", "GPU-8e02"], {"CUDA_VISIBLE_DEVICES": "3"}, "GPU-8e02"),
    ("unknown_subcommand", ["frobnicate"], {}, "frobnicate"),
    ("unknown_flag", ["pick", "--frob"], {}, "--frob"),
    ("unknown_status_flag", ["status", "--verbose"], {}, "--verbose"),
    ("extra_argument", ["device", "cuda:1", "cuda:2"], {}, "cuda:2"),
    ("missing_value", ["pick", "--mem"], {}, "--mem"),
    ("watch_zero", ["status", "--watch", "0"], {}, "0"),
    ("watch_negative", ["status", "--watch", "-1"], {}, "-1"),
    ("watch_word", ["status", "--watch", "often"], {}, "often"),
]


def names_value(line, value):
    """`value` appears in `line` as a whole token, as typed (not re-formatted, not part of a word)."""
    return re.search(r"(?<![\w.+-])%s(?![\w.])" % re.escape(value), line) is not None


def assert_bad_input(result, value):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), "expected one line, got:\n" + result.stderr
    assert lines[0].startswith("gpuslot: ")
    assert names_value(lines[0], value), "%r does not name %r" % (lines[0], value)


def test_names_value_helper():
    assert names_value("gpuslot: invalid size '8X': expected …", "8X")
    assert names_value("gpuslot: invalid --gpus 0: expected 1 or more", "0")
    assert not names_value("gpuslot: invalid --watch 0.000000: expected …", "0")
    assert not names_value("gpuslot: A subcommand is required", "frobnicate")
    assert not names_value("gpuslot: invalid size '18X'", "8X")


@pytest.mark.parametrize("args,env,value", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(gpuslot, args, env, value):
    assert_bad_input(gpuslot(*args, host="8x4090", env=env), value)


@pytest.mark.parametrize("args,value", [(["pick", "--mem", "8X"], "8X"), (["pick", "--strategy", "fastest"], "fastest"),
                                        (["pick", "--format", "xml"], "xml"), (["device", "cuda:x"], "cuda:x"),
                                        (["status", "--watch", "often"], "often")])
def test_bad_input_is_reported_before_nvml_is_needed(gpuslot, args, value):
    assert_bad_input(gpuslot(*args, host=None, env=NO_DRIVER), value)


def test_simulate_missing_host_file(gpuslot, tmp_path):
    missing = tmp_path / "missing.json"
    for args in (["--simulate", missing, "status"], ["status", "--simulate", missing]):
        assert_bad_input(gpuslot(*args, host=None), str(missing))


@pytest.mark.parametrize("text,field", [('{"driver_version": "550.54.15", "gpus": [', None),
                                        ('{"driver_version": "550.54.15", "gpus": [{"name": "x"}]}', "uuid")],
                         ids=["syntax_error", "missing_uuid"])
def test_simulate_corrupt_host_file(gpuslot, tmp_path, text, field):
    """A corrupt host file is bad input like a missing one (DESIGN.md lists "corrupt … host file"):
    one line that names the file and what is wrong in it."""
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(text)
    result = gpuslot("--simulate", corrupt, "status", host=None)
    assert_bad_input(result, str(corrupt))
    if field:
        assert field in result.stderr


def test_rejected_hold_leaves_no_lease(gpuslot, state_dir):
    for args in (["--mem", "8X"], ["--exclude", "99"], ["--device", "cuda:9"], ["--mem", "30G"]):
        result = gpuslot("pick", "--hold", "60s", *args, host="8x4090")
        assert result.returncode in (1, 2) and result.stdout == ""
        assert not state_dir.exists() or not list(state_dir.glob("lease-*")), args


@pytest.mark.parametrize("args,env,accepted", [
    (["pick", "--gpus", "-1"], {}, "expected a whole number from 1 to 1024"),
    (["pick", "--gpus", "2000"], {}, "expected a whole number from 1 to 1024"),
    (["run", "--gpus", "lots", "--", "true"], {}, "expected a whole number from 1 to 1024"),
    (["pick", "--max-util", "-1"], {}, "expected a percent, 0 to 100"),
    (["run", "--", "true"], {"GPUSLOT_DEFAULT_MEM": "abc"}, "GPUSLOT_DEFAULT_MEM: invalid size 'abc'"),
    (["pick", "--hold", "0"], {}, "expected a duration above zero"),
])
def test_the_message_says_what_is_accepted(gpuslot, args, env, accepted):
    result = gpuslot(*args, host="8x4090", env=env)
    assert result.returncode == 2 and accepted in result.stderr, result.stderr
