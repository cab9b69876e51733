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

With ``train.sharding fsdp`` (:func:`shard`) the model is not copied whole onto every process: torch FSDP2 shards
each transformer block's weights, frozen and LoRA alike, over the processes and gathers a block only while it
runs. Its gradient reduce-scatter then replaces the all-reduce of ``Team.sum_gradients`` (which only turns FSDP's
average into the sum, so the LoRA is the same as without sharding), and the LoRA and optimizer state are gathered
whole (:func:`full_tensors`) on every process before the main one writes them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

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
    sharded: bool = False  # the model is sharded with FSDP2 (shard): its gradients arrive summed already

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
        """Replace each parameter's gradient by its sum over all processes (a process with no gradient adds 0).

        A sharded model's gradients were reduced by FSDP in the backward pass already, averaged (its default; the
        sum's PREMUL_SUM op is missing from gloo): times the number of processes they are the sum."""
        if self.size == 1:
            return
        if self.sharded:
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(self.size)
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.copy_(self.sum(parameter.grad))

    def largest(self, value: int) -> int:
        """The largest ``value`` over all processes (each process learns the same answer)."""
        if self.size == 1:
            return value
        return int(self.gather_rows(torch.tensor([value], dtype=torch.float64)).max().item())

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (each process learns the same answer)."""
        return bool(self.sum(torch.tensor([0.0 if flag else 1.0])).item() == 0)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            _collective(self, "waiting for the other processes", dist.barrier)


SINGLE = Team()


def join(device: str, timeout_seconds: float, sharding: str = "none") -> Team:
    """The team this process belongs to: size 1 unless a launcher started several processes (WORLD_SIZE > 1), in
    which case the process group is created here (once) with ``timeout_seconds`` for every collective.

    ``sharding`` is train.sharding: "fsdp", "none", or "auto" (FSDP when accelerate launched with an FSDP config,
    which sets ACCELERATE_USE_FSDP)."""
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
    accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    sharded = sharding == "fsdp" or (sharding == "auto" and accelerate_fsdp)
    return Team(rank=dist.get_rank(), size=dist.get_world_size(), device=collective_device, sharded=sharded)


def shard(module: torch.nn.Module, team: Team) -> int:
    """Shard ``module`` over the team with FSDP2 (``fully_shard``), in place: first each entry of its top-level
    ModuleLists (the transformer blocks), then the rest as one unit. Gradients are averaged across processes
    (``Team.sum_gradients`` makes the sum of them). Parameters become DTensors: build the optimizer afterwards.
    Returns the number of blocks sharded on their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(team.device).type, (team.size,))
    units = [block for child in module.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    for unit in [*units, module]:
        fully_shard(unit, mesh=mesh)
    return len(units)


def full_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every DTensor (a sharded parameter's value) gathered whole; recurses into dicts. A collective
    when anything is sharded: every process calls it."""
    from torch.distributed.tensor import DTensor

    return {key: full_tensors(value) if isinstance(value, dict) else
            value.full_tensor() if isinstance(value, DTensor) else value for key, value in state.items()}


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state (a checkpoint's) cut to fit ``optimizer``'s parameters: each tensor shaped like its
    parameter is cut the way the parameter is (:func:`shard_like`); scalars such as AdamW's step stay whole."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    return {"state": {index: {key: shard_like(value, parameters[int(index)])
                              if isinstance(value, torch.Tensor) and value.shape == parameters[int(index)].shape
                              else value for key, value in values.items()}
                      for index, values in state["state"].items()},
            "param_groups": state["param_groups"]}


def shard_like(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A whole tensor shaped like ``parameter``, cut the way ``parameter`` is (a DTensor's mesh and placements);
    returned as it is when ``parameter`` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(parameter, DTensor):
        return value
    return distribute_tensor(value.to(parameter.device_mesh.device_type), parameter.device_mesh, parameter.placements)
