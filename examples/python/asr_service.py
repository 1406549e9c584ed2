#!/usr/bin/env python3
"""An ASR service that resolves its device at start, before loading its model.

    ASR_DEVICE=auto python3 examples/python/asr_service.py

The seed situation: several such services are started together with ASR_DEVICE=auto. Each one
resolves its setting (auto | cuda | cuda:N | cpu | GPU-<uuid>) and, in the same atomic step,
reserves the memory its model needs, so they spread over the GPUs instead of all taking the
freest one and dying of "CUDA out of memory" a few seconds later. The reservation lasts as long as
the service runs; the kernel drops it when the service exits or is killed.

Try it without a GPU, on the simulated 8-GPU host of the README:

    GPUSLOT_NVML_LIBRARY=build/libexec/gpuslot/libnvidia-ml.so.1 \\
    GPUSLOT_FAKE_NVML_HOST=examples/hosts/8x4090.json GPUSLOT_STATE_DIR=/tmp/gpuslot-simulated \\
    PYTHONPATH=build/python ASR_DEVICE=auto python3 examples/python/asr_service.py
"""
import logging
import os
import sys
import time

import gpuslot

MODEL_GIB = float(os.environ.get("ASR_MODEL_GIB", "8"))


def load_model(device):
    # With PyTorch: model = whisper.load_model("large-v3", device=device), or
    #               model.to(torch.device(device)) after torch.cuda.set_device(device).
    return {"device": device}


def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        device = gpuslot.resolve_device(env="ASR_DEVICE", min_free_memory_gb=MODEL_GIB)
    except gpuslot.NoGpuAvailable as error:  # GPUs are there, but none has the room now
        print("asr_service: %s" % error, file=sys.stderr)
        return error.exit_code
    except gpuslot.BadInput as error:  # ASR_DEVICE=cuda:9 on a 4-GPU host, ASR_DEVICE=gpu, …
        print("asr_service: %s" % error, file=sys.stderr)
        return error.exit_code
    model = load_model(device)
    print(model["device"], flush=True)
    # Serve requests here. The example serves for ASR_SERVE_SECONDS (default: not at all).
    time.sleep(float(os.environ.get("ASR_SERVE_SECONDS", "0")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
