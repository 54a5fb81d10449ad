"""An actor process's set-up: threads, PATH and quiet libraries, without importing what it may not use.

Every actor calls `prepare_worker` first. It imports neither torch nor transformers nor datasets: a scorer
that calls a Python function never loads them (2 s of CPU and 300 MB less per scorer), and no actor loads
datasets only to silence it. Libraries already imported are silenced by their own calls; those imported
later read the environment set here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' own bars follow huggingface_hub's switch
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
"""What transformers, huggingface_hub and datasets read at import to start quiet. A value the user set stays:
`TRANSFORMERS_VERBOSITY=info odpo run ...` shows transformers' notices again."""


def prepare_worker(cpus: float) -> None:
    """Thread count from the actor's CPU reservation (not the machine's cores), this environment's tools
    first on PATH, and quiet library logs."""
    threads = max(1, round(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch imported later (a reward function's) starts with it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    put_this_environment_first_on_path()
    quiet_libraries()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
"""mallopt's parameter numbers (glibc's malloc.h)."""


def keep_freed_memory() -> bool:
    """Keep the memory torch frees in this process for its next tensors rather than handing it back to the kernel.

    glibc's malloc serves each block over its mmap threshold (at most 32 MB) with a mapping of its own and unmaps
    it when freed, and returns a free heap top over 128 kB to the kernel: a training step's large tensors (the
    output head's logits, the flattened gradients, the optimizer's bf16 copies) then arrive as fresh pages that
    the kernel faults in and zeroes, every step again. On the real model (SmolLM2-135M, bf16) that was 1.1 GB of
    page faults a step, and the step took 0.91 of the time without them (0.85 with the reference in the step;
    benchmarks/freed_memory.py, 2-core AMD EPYC with avx512_bf16). Both are turned
    off here, for the allocations after this call; the process's resident memory stays near its peak instead of
    falling between steps. Returns False, changing nothing, where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # -1 as the trim threshold: never trim (mallopt(3)); no mmap'ed blocks: large ones come from the heap too
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def quiet_libraries() -> None:
    """Progress bars and notices of transformers, datasets and DeepSpeed drown odpo's own progress lines."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # imported before this call, a library read the environment already: the same settings by its own calls
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(hf_logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], logging.ERROR))
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()


def put_this_environment_first_on_path() -> None:
    """This interpreter's bin directory first on PATH, as `source .venv/bin/activate` would. DeepSpeed
    compiles its CPU ops with torch's JIT, which runs the `ninja` on PATH, and caches the build
    (TORCH_EXTENSIONS_DIR). A worker started from a shell without the environment on PATH runs another ninja
    than one started with it, and two ninja versions rebuild each other's cache every time (about a minute
    on 2 cores); with the environment's own ninja (a DeepSpeed dependency) first, every worker agrees."""
    bin_dir = os.path.dirname(sys.executable)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])


def own_process_ids() -> list[int]:
    """This process's pid and its children's (for checks that nothing outlives an actor, and for fault
    injection by pid)."""
    import psutil

    me = psutil.Process()
    return [me.pid] + [c.pid for c in me.children(recursive=True)]
