"""The process a run lives in: device, distributed rank/world and process group, logging, seeding,
BatchNorm synchronisation, peak memory, and the environment the report records."""

import os
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist


class Runtime:
    """Device, distributed rank/world and whether this process talks to the user."""

    def __init__(self, cfg):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            dev = torch.device(want if ":" in want else f"cuda:{self.local_rank if self.world_size > 1 else 0}")
            torch.cuda.set_device(dev)
        else:
            dev = torch.device(want)
        self.device = dev
        self.owns_group = False
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            self.owns_group = True
        self.distributed = self.world_size > 1
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            if self.device.type == "cuda":
                t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def log(rt, *msg):
    if rt is None or rt.main:
        print(*msg, flush=True)


def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of a phase: on CUDA ``torch.cuda.max_memory_allocated`` (after a reset); on CPU
    the peak resident set size minus the RSS at the start (Linux: the high-water mark is reset
    through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, which cannot be reset, so later
    phases may read 0)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            self.kind = "peak RSS delta"
            self.start_rss = _proc_status_kb("VmRSS")
            self.linux = self.start_rss is not None
            if self.linux:
                try:
                    with open("/proc/self/clear_refs", "w") as fh:
                        fh.write("5")
                except OSError:
                    self.linux = False
            if not self.linux:
                import resource

                self.start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def read(self):
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.linux:
            return max(0, (_proc_status_kb("VmHWM") or 0) - self.start_rss) * 1024
        import resource

        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start_rss) * 1024

    def __exit__(self, *exc):
        self.peak = self.read()
        return False


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def broadcast_bn_buffers(model):
    """BatchNorm running statistics from rank 0 (once per epoch, before evaluation and saving)."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)


def resolved_backend(backend, device, op="dual_sampled_contrast"):
    """What ``backend`` means on ``device`` for ``op`` (for the report)."""
    try:
        from .. import backends

        r = backends.resolve(backend, device, op)
        return r if backend != "auto" else f"auto->{r}"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{backend} (unavailable: {exc})"


def environment(rt):
    """Versions, device, threads and backend availability (recorded in results.json)."""
    env = dict(
        torch=torch.__version__,
        device=str(rt.device),
        threads=torch.get_num_threads(),
        world_size=rt.world_size,
        python=sys.version.split()[0],
    )
    try:
        from .. import backends

        env["backends"] = {k: dict(available=v[0], detail=v[1]) for k, v in backends.availability().items()}
    except Exception as exc:  # noqa: BLE001
        env["backends"] = str(exc)
    if rt.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(rt.device)
    return env
