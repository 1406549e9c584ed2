"""CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, rule by rule (shared/reference/cuda-visible-devices.md),
observed from outside through all three commands: `status --json` (visible, cuda_ordinal),
`device` (the CUDA ordinal of the best visible GPU, or cpu) and `pick` (an NVML index inside the
visible set, or exit 1).

The visibility layer follows PyTorch's two-pass model of the driver's parser (see the comment at
the top of src/visibility/cuda_visible_devices.cpp): pass 1 reads the text up to the first token
of the wrong kind and empties the list on any repeat among the tokens taken; pass 2 maps them to
devices and stops at the first that names none (out of range, unknown or ambiguous UUID).
"""
import json
import subprocess

import pytest

from conftest import read_host

MiB = 1 << 20

# examples/hosts/8x4090.json, by free memory: 1 > 4 > 6 > 5 > 2 > 7 > 0 > 3. Its UUIDs:
#   0 GPU-7eaa2404…  1 GPU-8e020f34…  2 GPU-24eac802…  3 GPU-4661b792…
#   4 GPU-4cd5dd1f…  5 GPU-a98f6e00…  6 GPU-2fbaa38b…  7 GPU-35d010fd…
# (visible list in CUDA ordinal order, substring of the note or None)
RULES = {
    "unset": (None, list(range(8)), None),
    "empty": ("", [], "empty"),
    "single": ("5", [5], None),
    "order_is_cuda_order": ("2,1", [2, 1], None),
    "reverse": ("7,6,5,4,3,2,1,0", [7, 6, 5, 4, 3, 2, 1, 0], None),
    "stop_at_out_of_range": ("0,9,1", [0], "'9'"),
    "out_of_range_first": ("8", [], "'8'"),
    "stop_at_negative": ("0,-1,2", [0], "negative"),
    "minus_one_hides_all": ("-1", [], "negative"),
    "stop_at_word": ("4,x,1", [4], "'x'"),
    "stop_at_empty_entry": ("3,,1", [3], "empty entry"),
    "duplicate_empties": ("1,1", [], "twice"),
    "duplicate_later_empties": ("3,1,3", [], "twice"),
    "duplicate_after_out_of_range_empties": ("0,9,1,1", [], "twice"),
    "duplicate_after_stop_is_not_read": ("0,x,0", [0], "'x'"),
    "nodevfiles": ("NoDevFiles", [], "NoDevFiles"),
    "strtoul_suffix": ("1abc", [1], "1abc"),
    "strtoul_space_and_plus": (" 3,+2", [3, 2], None),
    "minus_zero_is_zero": ("-0", [0], None),
    "no_ranges": ("0-2", [0], "read as 0"),
    "integers_then_uuid": ("2,GPU-8e020f34", [2], "cannot be mixed"),
    "full_uuid": ("GPU-8e020f34-b8b1-2969-bffa-d4aa74407353", [1], None),
    "uuid_prefixes_in_order": ("GPU-24eac802,GPU-8e02", [2, 1], None),
    "shortest_unique_prefixes": ("GPU-46,GPU-4c", [3, 4], None),
    "ambiguous_prefix": ("GPU-4", [], "matches 2 GPUs"),
    "bare_prefix_matches_all": ("GPU-", [], "matches 8 GPUs"),
    "stop_at_ambiguous_prefix": ("GPU-2fb,GPU-4,GPU-8e0", [6], "matches 2 GPUs"),
    "stop_at_unknown_uuid": ("GPU-2fb,GPU-ffff,GPU-8e0", [6], "no GPU has that UUID"),
    "same_gpu_by_two_prefixes_empties": ("GPU-8e02,GPU-8e020f34", [], "twice"),
    "uuid_then_integer": ("GPU-2fb,1", [6], "cannot be mixed"),
    "uuid_upper_case_and_spaces": (" GPU-24EAC802 , GPU-8e02", [2, 1], "letter case"),
    "mig_is_not_a_whole_gpu": ("MIG-5c89b4d0-7b1e-5a43-9f1c-3b5d64f8c2a1", [], "MIG"),
}

FREE_ORDER = [1, 4, 6, 5, 2, 7, 0, 3]


def env_for(value):
    return {"CUDA_VISIBLE_DEVICES": value}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_in_status_json(gpuslot, rule):
    value, visible, note = RULES[rule]
    status = json.loads(gpuslot("status", "--json", host="8x4090", env=env_for(value), check=0).stdout)
    shown = sorted((g["cuda_ordinal"], g["index"]) for g in status["gpus"] if g["visible"])
    assert [index for _, index in shown] == visible
    assert [ordinal for ordinal, _ in shown] == list(range(len(visible)))
    assert all(g["cuda_ordinal"] is None for g in status["gpus"] if not g["visible"])
    assert status["ambiguity"] is None
    if note is None:
        assert status["visibility_note"] is None
    else:
        assert note in status["visibility_note"]
        assert "\n" not in status["visibility_note"]
    best = next((index for index in FREE_ORDER if index in visible), None)
    assert status["recommended"] == best


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_in_device_and_pick(gpuslot, rule):
    value, visible, _ = RULES[rule]
    best = next((index for index in FREE_ORDER if index in visible), None)
    device = gpuslot("device", host="8x4090", env=env_for(value), check=0)
    pick = gpuslot("pick", host="8x4090", env=env_for(value))
    if best is None:
        assert device.stdout == "cpu\n" and "auto: using cpu" in device.stderr
        assert pick.returncode == 1 and pick.stdout == ""
    else:
        assert device.stdout == "cuda:%d\n" % visible.index(best)
        assert pick.returncode == 0 and pick.stdout == "%d\n" % best


def test_cuda_ordinals_follow_the_list_order(gpuslot):
    env = env_for("2,1")
    # physical 2 is cuda:0, physical 1 is cuda:1
    assert gpuslot("device", "cuda:0", host="8x4090", env=env, check=0).stdout == "cuda:0\n"
    chosen = gpuslot("device", "cuda:0", host="8x4090", env=env, check=0).stderr.splitlines()[-1]
    assert chosen.startswith("chosen: cuda:0 = GPU 2 ")
    assert gpuslot("device", host="8x4090", env=env, check=0).stdout == "cuda:1\n"
    assert gpuslot("device", "cuda:2", host="8x4090", env=env, check=2).stdout == ""
    assert gpuslot("pick", "--device", "cuda:0", host="8x4090", env=env, check=0).stdout == "2\n"
    assert gpuslot("pick", "--gpus", "2", host="8x4090", env=env, check=0).stdout == "1,2\n"
    assert gpuslot("pick", "--gpus", "3", host="8x4090", env=env, check=1).stdout == ""


def test_child_gets_a_subset_of_the_parent_gpus(gpuslot, host, fake_gpu_job, fake_env):
    """`pick --format env` inside a restricted parent names NVML indices with PCI_BUS_ID: a job
    started with that environment lands on the GPU pick chose, which the parent may use."""
    path = host("8x4090")
    uuids = [gpu["uuid"] for gpu in read_host(path)["gpus"]]
    for parent in ("3,5", "7,0", "GPU-24eac802,GPU-2fb"):
        line = gpuslot("pick", "--format", "env", host=path, env=env_for(parent), check=0).stdout.strip()
        assigned = dict(word.split("=", 1) for word in line.split()[1:])
        assert assigned["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        job = subprocess.run([str(fake_gpu_job), "--mem", "1M", "--seconds", "0"],
                             env=fake_env(path, **assigned), capture_output=True, text=True, timeout=60)
        assert job.returncode == 0, job.stderr
        landed = next(i for i, uuid in enumerate(uuids) if uuid in job.stdout)
        status = json.loads(gpuslot("status", "--json", host=path, env=env_for(parent), check=0).stdout)
        assert status["gpus"][landed]["visible"], (parent, line)
        assert assigned["GPUSLOT_GPU_UUIDS"] == uuids[landed]


# Mixed models: CUDA numbers them fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and only CUDA
# knows that order exactly, so integer ordinals must not be guessed silently (reference,
# "CUDA_DEVICE_ORDER and the three numberings"). tests/hosts/mixed.json: 0 RTX 4090, 1 RTX A2000,
# 2 H100 (the fastest, and the one with the most free memory).

@pytest.mark.parametrize("order", [None, "FASTEST_FIRST", "fastest_first", ""])
def test_mixed_host_without_pci_order_refuses_ordinals(gpuslot, order):
    env = {"CUDA_DEVICE_ORDER": order}
    device = gpuslot("device", host="mixed", env=env, check=2)
    assert device.stdout == "" and device.stderr.count("\n") == 1
    assert device.stderr.startswith("gpuslot: ") and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in device.stderr
    assert gpuslot("device", "cuda:0", host="mixed", env=env, check=2).stdout == ""
    status = json.loads(gpuslot("status", "--json", host="mixed", env=env, check=0).stdout)
    assert "CUDA_DEVICE_ORDER" in status["ambiguity"]
    assert [(g["visible"], g["cuda_ordinal"]) for g in status["gpus"]] == [(True, None)] * 3
    # An NVML index exported with CUDA_DEVICE_ORDER=PCI_BUS_ID is exact whatever the parent's order.
    assert gpuslot("pick", host="mixed", env=env, check=0).stdout == "2\n"


def test_mixed_host_with_pci_order(gpuslot):
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpuslot("device", host="mixed", env=env, check=0).stdout == "cuda:2\n"
    status = json.loads(gpuslot("status", "--json", host="mixed", env=env, check=0).stdout)
    assert status["ambiguity"] is None
    assert [g["cuda_ordinal"] for g in status["gpus"]] == [0, 1, 2]
    restricted = dict(env, CUDA_VISIBLE_DEVICES="1,0")
    assert gpuslot("device", host="mixed", env=restricted, check=0).stdout == "cuda:1\n"
    assert gpuslot("pick", host="mixed", env=restricted, check=0).stdout == "0\n"


def test_mixed_host_uuid_list_is_never_ambiguous(gpuslot, host):
    path = host("mixed")
    uuids = [gpu["uuid"] for gpu in read_host(path)["gpus"]]
    env = env_for("%s,%s" % (uuids[1][:10], uuids[0][:10]))  # A2000, then the 4090
    assert gpuslot("device", host=path, env=env, check=0).stdout == "cuda:1\n"
    status = json.loads(gpuslot("status", "--json", host=path, env=env, check=0).stdout)
    assert status["ambiguity"] is None
    assert [g["cuda_ordinal"] for g in status["gpus"]] == [1, 0, None]


def test_mixed_host_integer_list_is_not_guessed_silently_by_pick(gpuslot):
    """CUDA_VISIBLE_DEVICES=0 under FASTEST_FIRST on this host is the H100 (NVML 2), not the
    RTX 4090 (NVML 0). pick cannot know which, so it must refuse like `device` does or at least
    say so; handing out NVML 0 silently gives the child a GPU outside the parent's set."""
    result = gpuslot("pick", host="mixed", env=env_for("0"))
    if result.returncode == 2:
        assert "CUDA_DEVICE_ORDER" in result.stderr and result.stdout == ""
    else:
        assert result.returncode == 0
        assert "CUDA_DEVICE_ORDER" in result.stderr, "pick chose %s silently" % result.stdout.strip()


def test_unknown_device_order_reads_as_fastest_first_and_says_so(gpuslot):
    status = json.loads(gpuslot("status", "--json", host="8x4090", env={"CUDA_DEVICE_ORDER": "pci_bus_id"},
                                check=0).stdout)
    assert "'pci_bus_id'" in status["visibility_note"] and "FASTEST_FIRST" in status["visibility_note"]
    assert status["ambiguity"] is None  # identical GPUs: both orders agree
    assert [g["cuda_ordinal"] for g in status["gpus"]] == list(range(8))
