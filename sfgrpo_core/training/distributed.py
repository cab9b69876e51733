"""Several processes training one LoRA (``accelerate launch --num_processes N -m sfgrpo_core.cli train CONFIG``).

The batch of an iteration is the same whatever the number of processes: every process draws the same prompts,
initial noise and per-member seeds, and takes its own contiguous rows (whole prompt groups). Rewards are gathered so
that advantages are computed on the whole batch exactly as one process computes them; the update walks the same
shuffled minibatches of the whole batch, each process back-propagating its own transitions, and the LoRA gradients
are summed across processes before clipping and the optimizer step. So N processes give the LoRA of one process
with the same total batch and seed (up to float summation order). Every collective runs on every process; only the
main process writes files. A process that dies makes the others fail in their next collective (gloo notices the
closed connection; otherwise after ``train.distributed_timeout`` seconds) instead of hanging.

The process group comes from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: accelerate
launch, torchrun): gloo for CPU models, nccl for CUDA ones.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


class TeamError(RuntimeError):
    """A collective failed: another process stopped (crashed, killed) or did not answer within the timeout."""


def _collective(team: Team, what: str, call) -> None:
    try:
        call()
    except RuntimeError as error:  # gloo/nccl: connection closed by peer, timeout, ...
        raise TeamError(f"process {team.rank} of {team.size}: {what} failed: another process stopped or did not "
                        f"answer within train.distributed_timeout ({type(error).__name__}: {str(error)[:300]}); "
                        f"resume the run from its last checkpoint") from None


@dataclass(frozen=True)
class Team:
    """This process's place among ``size`` processes (rank 0 is the main one); size 1 does no communication."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"  # where tensors go for collectives: cuda for nccl

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> slice:
        """This process's contiguous share of ``count`` rows (``count`` must divide evenly)."""
        if count % self.size:
            raise ValueError(f"{count} rows cannot be split evenly over {self.size} processes")
        share = count // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (equal shapes) concatenated along dim 0 in rank order, on every process."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        _collective(self, "gathering rows", lambda: dist.all_gather(parts, local))
        return torch.cat(parts).to(tensor.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (a new tensor, on ``tensor``'s device)."""
        if self.size == 1:
            return tensor.clone()
        import torch.distributed as dist

        total = tensor.detach().to(self.device).clone()
        _collective(self, "summing across processes", lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM))
        return total.to(tensor.device)

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over all processes (a process with no gradient adds 0)."""
        if self.size == 1:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.copy_(self.sum(parameter.grad))

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (each process learns the same answer)."""
        return bool(self.sum(torch.tensor([0.0 if flag else 1.0])).item() == 0)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            _collective(self, "waiting for the other processes", dist.barrier)


SINGLE = Team()


def join(device: str, timeout_seconds: float) -> Team:
    """The team this process belongs to: size 1 unless a launcher started several processes (WORLD_SIZE > 1), in
    which case the process group is created here (once) with ``timeout_seconds`` for every collective."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Team()
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    collective_device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    return Team(rank=dist.get_rank(), size=dist.get_world_size(), device=collective_device)
