"""Failures an operator can act on: the exit codes, and one line naming the cause and the fix.

Every failure to start ends as one line on stderr (`fedmq: ...`) and one of these exit codes,
never a traceback: a service raises `FatalError`, a missing optional package surfaces as
ImportError and is named here with the pip command that installs it.

    0  done (the demo: reached its target; an agent: the job is done)
    1  unexpected failure (a bug: the traceback is in the log)
    2  bad configuration or usage (a setting, flag, TOML table or FEDMQ_* variable)
    3  the demo ran but missed its accuracy target
    4  no broker could be reached (within connect_timeout_s) or started
    5  this host is not ready: a missing optional package, an unusable state directory,
       a port already in use
    6  another process holds this identity: an agent with the same device id (or an
       aggregator of the same job) is connected to the broker
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_TARGET_MISSED, EXIT_NO_BROKER = 0, 1, 2, 3, 4
EXIT_NOT_READY, EXIT_IDENTITY_IN_USE = 5, 6

EXIT_CODES_HELP = (
    "Exit codes: 0 done, 1 unexpected failure, 2 bad configuration or usage, 3 demo missed "
    "its target, 4 no broker reached or started, 5 host not ready (missing package, unusable "
    "state directory, port in use), 6 device id (or aggregator) already connected elsewhere."
)

# the top-level module a feature imports -> (the pip distribution, the fedmq extra with it)
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "train"),
    "onnxruntime": ("onnxruntime", "infer"),
    "onnx": ("onnx", "server"),
    "matplotlib": ("matplotlib", "server"),
    "tqdm": ("tqdm", "server"),
    "psutil": ("psutil", "server"),
    "dp_accounting": ("dp-accounting", "server"),
    "prometheus_client": ("prometheus-client", "server"),
    "rich": ("rich", "ops"),
    "sklearn": ("scikit-learn", "data"),
    "mlxtend": ("mlxtend", "data"),
    "sktime": ("sktime", "sensors"),
    "amqtt": ("amqtt", "demo"),
    "PIL": ("pillow", "images"),
}
_CHECKOUT = Path(__file__).resolve().parent.parent  # the source tree, when run from one


class FatalError(Exception):
    """A failure the operator can act on: its one line (without the `fedmq: ` prefix) and
    the exit code it ends the command with."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def install_command(extra: str, root: Path = _CHECKOUT) -> str:
    """The pip command that installs an extra, from the checkout fedmq runs from, if any."""
    constraints = " -c constraints.txt" if extra in ("train", "server", "demo") else ""
    if (root / "pyproject.toml").exists():
        c = f" -c {root / 'constraints.txt'}" if constraints else ""
        return f"pip install{c} -e '{root}[{extra}]'"
    from fedmq import __version__

    wheel = f"fedmq-{__version__}-py3-none-any.whl"
    return (f"pip install{constraints} '{wheel}[{extra}]' (the wheel fedmq was installed "
            "from, README 'Running a real fleet')")  # fmt: skip


def missing_package(err: BaseException) -> FatalError | None:
    """The one line for an ImportError of an optional package (anywhere in err's chain of
    causes), or None when it is something else (a bug: let it surface)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ModuleNotFoundError) and cur.name:
            top = cur.name.split(".")[0]
            if top in EXTRAS:
                dist, extra = EXTRAS[top]
                return FatalError(
                    f"{dist} is not installed (it comes with fedmq's '{extra}' extra): "
                    f"{install_command(extra)}",
                    exit_code=EXIT_NOT_READY,
                )
        cur = cur.__cause__ or cur.__context__
    return None


def require(*modules: str) -> None:
    """FatalError naming the first of modules that cannot be imported and how to install it."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            fatal = missing_package(err)
            if fatal is None:
                raise
            raise fatal from err


def check_writable_dir(path: Path, *, what: str, flag: str) -> None:
    """FatalError unless path is (or can be made as) a directory this user can write;
    creates nothing. `what` says whose directory it is, `flag` how to choose another."""
    path = Path(path).expanduser()
    fix = f"or choose another with {flag}"
    probe = path
    while not probe.exists():  # the nearest part of the path that exists decides
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise FatalError(
            f"cannot use {path} as {what}: {probe} is a file, not a directory; move it "
            f"away {fix}",
            exit_code=EXIT_NOT_READY,
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "write to" if probe == path else f"create {path} in"
        raise FatalError(
            f"cannot use {path} as {what}: no permission to {verb} {probe}; create it for "
            f"this user (sudo install -d -o $(id -un) {path}) {fix}",
            exit_code=EXIT_NOT_READY,
        )


def check_state_dir(path: Path, *, what: str, flag: str = "--state-dir") -> None:
    """check_writable_dir, then make the directory and write a file in it: a read-only
    file system or a full disk shows here, as one line, not mid-run as a traceback."""
    check_writable_dir(path, what=what, flag=flag)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise FatalError(
            f"cannot use {path} as {what}: {err.strerror or err}; choose another with {flag}",
            exit_code=EXIT_NOT_READY,
        ) from err
