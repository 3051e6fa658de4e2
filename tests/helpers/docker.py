"""A private Docker engine for tests: `dockerd` with host networking only (no bridge, no iptables
changes), its own data root (cached between runs under .tandem/docker) and its own socket; a
Debian base image made locally with mmdebstrap (Docker Hub is not reachable); image builds with
the classic builder. Needs root, dockerd, docker, docker-compose and mmdebstrap (CI installs them).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.procs import REPO_ROOT

CACHE = REPO_ROOT / ".tandem" / "docker"
BASE_IMAGE = "tandem-local/base:bookworm"
# python3-venv: the images build their virtual environment with `python3 -m venv`
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
TOOLS = ("dockerd", "docker", "docker-compose", "mmdebstrap")


def missing_tools() -> str | None:
    """Why the engine cannot start here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root (CI runs as root)"
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (CI installs docker.io docker-compose mmdebstrap)"
    return None


class DockerEngine:
    def __init__(self, data_root: Path = CACHE / "data"):
        data_root.mkdir(parents=True, exist_ok=True)
        # two engines on one data root corrupt it: a second test run fails here, saying why
        self.lock = open(data_root.parent / "data.lock", "w")  # noqa: SIM115  # closed in stop()
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise AssertionError(f"another test run's dockerd uses {data_root}; wait for it to end") from None
        # exec root and socket in a short path: unix socket paths are limited to 108 bytes
        self.run_dir = Path(tempfile.mkdtemp(prefix="tdk-"))
        self.socket = self.run_dir / "docker.sock"
        self.log_path = self.run_dir / "dockerd.log"
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "0",  # the classic builder: no buildx plugin here
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }
        self.log = open(self.log_path, "wb")  # noqa: SIM115  # closed in stop()
        self.process = subprocess.Popen(
            [
                "dockerd",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                f"--data-root={data_root}",
                f"--exec-root={self.run_dir / 'exec'}",
                f"--pidfile={self.run_dir / 'docker.pid'}",
                f"--host=unix://{self.socket}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._wait_ready(60.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.socket.exists() and self.run("version", check=False).returncode == 0:
                return
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise AssertionError(f"dockerd did not come up within {timeout:.0f} s:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, cwd: Path = REPO_ROOT
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this engine; a failure shows the command's output."""
        return self._run(["docker", *args], check, timeout, cwd)

    def compose(
        self,
        files: Sequence[Path],
        project: str,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`docker-compose ARGS` on `files`; `env` adds variables for the files' interpolation."""
        cmd = ["docker-compose", "--project-name", project]
        for f in files:
            cmd += ["--file", str(f)]
        return self._run([*cmd, *args], check, timeout, REPO_ROOT, env)

    def _run(
        self, cmd: list[str], check: bool, timeout: float, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            cmd, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
            )
        return r

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def image_size_mb(self, ref: str) -> float:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", ref).stdout) / 1e6

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        self.lock.close()  # releases the data root
        # dockerd leaves its default network namespace mounted in the exec root
        netns = self.run_dir / "exec" / "netns" / "default"
        if netns.exists():
            subprocess.run(["umount", str(netns)], capture_output=True, check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def ensure_base_image(engine: DockerEngine) -> str:
    """The local Debian base image (python3 and its venv module), made once and cached: the image
    in the engine's data root, the root file system tarball next to it."""
    if engine.has_image(BASE_IMAGE):
        return BASE_IMAGE
    rootfs = CACHE / "rootfs.tar"
    if not rootfs.is_file():
        partial = rootfs.with_suffix(".partial.tar")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(partial)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        partial.rename(rootfs)
    engine.run("import", str(rootfs), BASE_IMAGE)
    return BASE_IMAGE


NODE_IMAGE = "tandem-local/node:20"
# the tag docker-compose.monitoring.yml names: made here from Debian's Prometheus of the same version
PROMETHEUS_IMAGE = "prom/prometheus:v2.42.0"


def build_from(engine: DockerEngine, tag: str, dockerfile: str, files: dict[str, Path]) -> str:
    """`docker build` of a small image whose context is `files` (name in the context -> a file or
    folder of this machine), made again only when its Dockerfile changed (a label holds its hash)."""
    recipe = hashlib.sha256(dockerfile.encode()).hexdigest()[:16]
    fmt = '{{index .Config.Labels "org.tandem.recipe"}}'
    if (
        engine.has_image(tag)
        and engine.run("image", "inspect", "--format", fmt, tag).stdout.strip() == recipe
    ):
        return tag
    dockerfile += f"LABEL org.tandem.recipe={recipe}\n"
    with tempfile.TemporaryDirectory(prefix="tandem-ctx-") as ctx:
        for name, source in files.items():
            if source.is_dir():
                shutil.copytree(source, Path(ctx) / name, symlinks=True)
            else:
                shutil.copy2(source, Path(ctx) / name)
        (Path(ctx) / "Dockerfile").write_text(dockerfile)
        engine.run("build", "--network=host", "--tag", tag, ctx)
    return tag


def node_image(engine: DockerEngine, base: str) -> str:
    """Node 20 and npm on the local base (this machine's), for the UI image's build stage, which
    otherwise starts from node:20-bookworm-slim of Docker Hub."""
    node = Path(shutil.which("node") or "/usr/bin/node").resolve()
    npm = Path(shutil.which("npm") or "/usr/bin/npm").resolve().parents[1]  # .../node_modules/npm
    # this machine reaches the npm registry through a proxy whose CA only its own bundle trusts
    dockerfile = (
        f"FROM {base}\nCOPY node /usr/local/bin/node\nCOPY npm /usr/local/lib/node_modules/npm\n"
        "COPY ca.crt /etc/ssl/certs/host-ca.crt\nENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/host-ca.crt\n"
        "RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm && node --version && npm --version\n"
    )
    files = {"node": node, "npm": npm, "ca.crt": Path("/etc/ssl/certs/ca-certificates.crt")}
    return build_from(engine, NODE_IMAGE, dockerfile, files)


def prometheus_image(engine: DockerEngine, base: str) -> str:
    """This machine's Prometheus (Debian's 2.42, a static binary) on the local base, laid out like
    Prometheus's own image (entry point /bin/prometheus, user nobody, data in /prometheus)."""
    binary = Path(shutil.which("prometheus") or "/usr/bin/prometheus")
    dockerfile = (
        f"FROM {base}\nCOPY prometheus /bin/prometheus\n"
        "RUN install -d -o 65534 -g 65534 /prometheus\nUSER 65534\nWORKDIR /prometheus\n"
        'ENTRYPOINT ["/bin/prometheus"]\n'
    )
    return build_from(engine, PROMETHEUS_IMAGE, dockerfile, {"prometheus": binary})


SOURCE_ONLY = ["openapi-ui-bundles==0.3.0"]  # requirements/serve-common.txt: Swagger UI's files


# the export image's build finds its wheels here: the same URL each run keeps its layers cached
WHEEL_PORT = 39217


def _stamp(version: str) -> str:
    """What a wheel folder was downloaded for: the requirements and the Python version."""
    files = sorted((REPO_ROOT / "requirements").glob("*.txt"))
    return hashlib.sha256(version.encode() + b"".join(f.read_bytes() for f in files)).hexdigest()


def export_wheelhouse(engine: DockerEngine, image: str) -> Path:
    """The export image's requirements (torch's CPU build among them) as wheels in
    build/wheels-export, beside the serving ones of `wheelhouse`. The export image's build finds
    them over HTTP (`wheel_index`), so they never land in a layer."""
    version = _python_version(engine, image)
    out = REPO_ROOT / "build" / "wheels-export"
    stamp = out / ".downloaded-for"
    if stamp.is_file() and stamp.read_text() == _stamp(version) and (out.parent / "wheels").is_dir():
        return out  # nothing changed since the last download (pip would take half a minute to say so)
    serving = wheelhouse(engine, image)
    # fmt: off
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
        "--python-version", version, "--requirement", str(REPO_ROOT / "requirements" / "export.txt"),
        "--find-links", str(serving), "--dest", str(out),
    ]
    # fmt: on
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"pip download (export) failed:\n{r.stderr[-3000:]}")
    for wheel in out.iterdir():  # what build/wheels holds already need not be there twice
        if (serving / wheel.name).is_file():
            wheel.unlink()
    stamp.write_text(_stamp(version))
    return out


def wheel_index(url: str) -> str:
    """PIP_ARGS for an image build finding the wheels of build/ (served at `url`) only."""
    return f"--no-index --find-links {url}wheels/ --find-links {url}wheels-export/"


def _python_version(engine: DockerEngine, image: str) -> str:
    return engine.run(
        "run",
        "--rm",
        "--network=host",
        image,
        "python3",
        "-c",
        "import sys; print('%d.%d' % sys.version_info[:2])",
    ).stdout.strip()


def wheelhouse(engine: DockerEngine, image: str) -> Path:
    """The serving requirements as wheels in build/wheels for `image`'s Python, downloaded with this
    machine's pip settings (a build inside the engine cannot see its index or find-links)."""
    version = _python_version(engine, image)
    out = REPO_ROOT / "build" / "wheels"
    # pure-Python pins published only as source: built into wheels here, found by the download below
    for pin in SOURCE_ONLY:
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", pin, "--wheel-dir", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if built.returncode != 0:
            raise AssertionError(f"pip wheel {pin} failed:\n{built.stderr[-3000:]}")
    # fmt: off
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
        "--python-version", version, "--requirement", str(REPO_ROOT / "requirements" / "serve.txt"),
        "--find-links", str(out), "--dest", str(out),
    ]
    # fmt: on
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"pip download failed:\n{r.stderr[-3000:]}")
    return out
