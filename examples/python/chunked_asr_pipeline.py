#!/usr/bin/env python3
"""A video pipeline's chunked ASR: one persistent worker per GPU, fed from one queue.

    python3 examples/python/chunked_asr_pipeline.py [CHUNKS] [GIB_PER_WORKER]

Each worker process loads the model once, on its GPU (``init``), then transcribes chunk after
chunk (``work``). Before a worker starts, the memory its model needs is reserved on its GPU
through the host-wide ledger, so other programs on the server see it taken; when no GPU has the
room the pool waits for it. A chunk whose worker runs out of GPU memory (here: chunk 7, once) or
dies is retried on another GPU; the transcript comes back in chunk order, with nothing lost.

The short, single-GPU path of the same pipeline uses the seed's call instead:

    index = gpuslot.select_best_gpu(min_free_memory_gb=8.0)   # reserved for this process's life
    model = load_model(f"cuda:{index}")

Try it without a GPU: see examples/python/asr_service.py for the environment to set.
"""
import logging
import os
import sys
import tempfile

import gpuslot

model = None  # one per worker process


def load_model(device):
    """Runs once in each worker. With PyTorch:
    torch.cuda.set_device(device); model = whisper.load_model("large-v3", device=device)."""
    global model
    model = {"device": device, "pid": os.getpid()}


def transcribe(chunk):
    """Runs for each chunk, in a worker whose model is loaded."""
    index, marker = chunk
    if index == 7 and not os.path.exists(marker):
        open(marker, "w").close()
        # What PyTorch raises when the GPU is full; the pool retries the chunk on another GPU.
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return "chunk %d: transcribed on %s" % (index, model["device"])


def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    chunks = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    gib = sys.argv[2] if len(sys.argv) > 2 else "4"
    with tempfile.TemporaryDirectory() as scratch:
        marker = os.path.join(scratch, "chunk-7-ran-out-of-memory")
        with gpuslot.WorkerPool(load_model, transcribe, mem=gib + "G", retries=3) as pool:
            transcript = pool.map([(index, marker) for index in range(chunks)])
            used = sorted({worker["device"] for worker in pool.workers()})
    for line in transcript:
        print(line)
    print("workers on %s" % ", ".join(used), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
