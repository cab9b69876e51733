"""Model backends behind the VelocityModel protocol: 'toy', 'diffusers' and 'miniworld'."""

from ..miniworld import world  # noqa: F401  (registers the 'miniworld' backend)
from . import diffusers_backend, toy  # noqa: F401  (register the 'diffusers' and 'toy' backends)
from .base import VelocityModel, available, build, register_backend

__all__ = ["VelocityModel", "available", "build", "register_backend"]
