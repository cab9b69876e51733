"""Where a NaN or inf is born: the first module whose forward output or backward gradient stops being finite.

A diverged run (trainer.NonFiniteError) says that the loss or the LoRA went non-finite, not where. ``watch`` hooks
every submodule of a model for one forward and backward pass and keeps the places in the order they happen:

- forward: a module whose output is not finite although its inputs are (it made the value, it did not pass it on);
  children finish before their parents, so the first such module is the innermost one;
- backward: a module whose inputs' gradient is not finite although the gradient reaching its output is (its own
  backward made it; with a tensor read by several modules, the gradient is their sum, so the place is one of them);
- gradient_to: the first gradient at a module's output that is not finite (the fallback when the value was made
  between modules, in a functional op).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class NonFiniteSite:
    kind: str  # "forward", "backward" or "gradient_to"
    module: str  # the submodule's qualified name ("" for the model itself)

    def describe(self) -> str:
        name = self.module or "the model"
        return {"forward": f"forward output of {name} (its inputs finite)",
                "backward": f"backward of {name} (the gradient at its output finite, at its input not)",
                "gradient_to": f"gradient arriving at the output of {name}"}[self.kind]


@dataclass
class NonFiniteWatch:
    """The places found so far, in the order they happened; ``first`` is the one to look at."""

    sites: list[NonFiniteSite] = field(default_factory=list)

    @property
    def first(self) -> NonFiniteSite | None:
        for kind in ("forward", "backward", "gradient_to"):  # a born value before one passed along
            found = [site for site in self.sites if site.kind == kind]
            if found:
                return found[0]
        return None

    def add(self, site: NonFiniteSite) -> None:
        if site not in self.sites:
            self.sites.append(site)


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    return []


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(tensor.detach()).all()) for tensor in tensors if tensor.is_floating_point())


@contextmanager
def watch(model: torch.nn.Module) -> Iterator[NonFiniteWatch]:
    """Hook every submodule of ``model`` while the block runs (one forward and backward pass; it synchronises the
    device at each module, so it is for diagnosis, not for training)."""
    found = NonFiniteWatch()
    output_grad_finite: dict[str, bool] = {}
    handles = []

    def on_forward(name: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            inputs = [t for t in _tensors((args, kwargs)) if t.is_floating_point()]
            outputs = [t for t in _tensors(output) if t.is_floating_point()]
            if not _finite(outputs) and _finite(inputs):
                found.add(NonFiniteSite("forward", name))
            if not torch.is_grad_enabled():
                return
            for tensor in outputs:
                if tensor.requires_grad:
                    tensor.register_hook(on_output_grad(name))
            for tensor in inputs:
                if tensor.requires_grad:
                    tensor.register_hook(on_input_grad(name))
        return hook

    def on_output_grad(name: str):
        def hook(grad: torch.Tensor) -> None:
            finite = _finite([grad])
            output_grad_finite[name] = output_grad_finite.get(name, True) and finite
            if not finite:
                found.add(NonFiniteSite("gradient_to", name))
        return hook

    def on_input_grad(name: str):
        def hook(grad: torch.Tensor) -> None:
            if not _finite([grad]) and output_grad_finite.get(name, False):
                found.add(NonFiniteSite("backward", name))
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(on_forward(name), with_kwargs=True))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def non_finite_gradients(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters whose gradient holds a NaN or inf."""
    return [name for name, parameter in model.named_parameters()
            if parameter.grad is not None and not _finite([parameter.grad])]
