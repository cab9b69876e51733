"""Model backends behind the VelocityModel protocol."""

from . import toy  # noqa: F401  (registers the 'toy' backend)
from .base import VelocityModel, available, build, register_backend

__all__ = ["VelocityModel", "available", "build", "register_backend"]
