"""Model backends behind the VelocityModel protocol."""

from . import diffusers_backend, toy  # noqa: F401  (register the 'diffusers' and 'toy' backends)
from .base import VelocityModel, available, build, register_backend

__all__ = ["VelocityModel", "available", "build", "register_backend"]
