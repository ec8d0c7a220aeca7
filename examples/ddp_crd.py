"""CRD distillation in your own torchrun + DistributedDataParallel script, the banks sharded
over the ranks (the code the README shows; python_tests/test_examples.py runs it at small sizes).

    torchrun --standalone --nproc_per_node=4 examples/ddp_crd.py                 # ImageNet size
    torchrun --standalone --nproc_per_node=2 examples/ddp_crd.py --memory-mode replicated

At ImageNet size (N = 1,281,167 rows, feat_dim 128) each bank is 656 MB in fp32; sharded over W
ranks every rank holds ceil(N/W) rows of each (164 MB per bank at W = 4). The stand-in backbones
below are linear layers on random features: replace them with your student and teacher.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcdkernels import CRDLoss


class Distiller(nn.Module):
    """Student + frozen teacher + the CRD loss (its heads train with the student)."""

    def __init__(self, student, teacher, criterion):
        super().__init__()
        self.student, self.teacher, self.criterion = student, teacher, criterion
        self.teacher.requires_grad_(False)

    def forward(self, x, idx):
        f_s = self.student(x)
        with torch.no_grad():
            f_t = self.teacher(x)
        return self.criterion(f_s, f_t, idx)  # scores, then updates both banks at idx


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n-data", type=int, default=1_281_167)  # ImageNet's training set
    p.add_argument("--nce-k", type=int, default=16384)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256, help="per rank")
    p.add_argument("--in-dim", type=int, default=64)
    p.add_argument("--s-dim", type=int, default=512)
    p.add_argument("--t-dim", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--memory-mode", default="sharded", choices=("local", "replicated", "sharded"))
    p.add_argument("--save", help="write each rank's final state to SAVE.rank<r>.pt")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # before building a distributed memory
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    student = nn.Sequential(nn.Linear(args.in_dim, args.s_dim), nn.ReLU())
    teacher = nn.Sequential(nn.Linear(args.in_dim, args.t_dim), nn.ReLU())
    crd = CRDLoss(
        args.s_dim, args.t_dim, args.n_data, args.feat_dim, args.nce_k, memory_mode=args.memory_mode
    )  # process_group=... for a subgroup
    model = DDP(
        Distiller(student, teacher, crd).to(device), device_ids=[device.index] if cuda else None
    )  # plain DDP: the banks are no buffers
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.05, momentum=0.9)

    mem = crd.memory
    per_rank = mem.bank_s.nbytes + mem.bank_t.nbytes
    print(
        f"rank {rank}/{world}: memory_mode={args.memory_mode}, rows [{mem.row_start}, {mem.row_end}) of "
        f"{args.n_data}, banks {per_rank / 1e6:.1f} MB on this rank",
        flush=True,
    )

    for step in range(args.steps):
        # your DataLoader + DistributedSampler here: inputs and their dataset rows idx (B,)
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(args.batch_size, args.in_dim, generator=g).to(device)
        idx = torch.randint(0, args.n_data, (args.batch_size,), generator=g).to(device)
        loss = model(x, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}, log Z {mem.log_z.tolist()}", flush=True)

    if args.save:
        torch.save(model.module.state_dict(), f"{args.save}.rank{rank}.pt")  # one file per rank (sharded)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
