"""File helpers shared by every stage: atomic writes, output directories we own, locks, safe
names, content hashes, and JSON read with one-line errors.

The rules they enforce:
- Nothing is left half-written: outputs are written to a temporary sibling and renamed.
- Only a directory we wrote (it carries our marker) is ever replaced; never an input, nor a
  parent of one.
- One writer per directory: an exclusive lock (readers take a shared one), refused at once
  when held elsewhere. Holding the exclusive lock, the staging leftovers of a killed run are
  removed.
- Names read from a manifest resolve inside their directory.
- A file the user names (`--report`) is never replaced unless it is a regular file: devices and
  pipes are written through, symbolic links refused.
- A write that fails names its file, a full disk's ENOSPC (which write() raises nameless) too.
- Only regular files are opened for reading records: a FIFO or a device would block or never end.
- Files and directories honour the umask, like any other tool's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mvlm_compile.errors import ArtifactError, MvlmError

MARKER = ".mvlm-compile.json"  # in every directory we write as a whole: {"kind": ...}
LOCK = ".mvlm-compile.lock"
STAGING_SUFFIXES = (".tmp", ".partial", ".old")  # our temporary names: ".<name>.<random><suffix>"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_graph(path: Path) -> str:
    """Content hash of an ONNX graph with its external weights: `<graph>.onnx.data` beside it
    (onnx_io.save_model's convention) changes the hash too. A graph without one hashes as its
    .onnx alone, so records of inline graphs keep their values."""
    data = Path(f"{path}.data")
    if not data.exists():
        return sha256_file(path)
    return hashlib.sha256(f"{sha256_file(path)} {sha256_file(data)}".encode()).hexdigest()


def digest(*parts: object) -> str:
    """SHA-256 of JSON-serialisable parts: the identity of a stage's inputs and parameters."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def make_temp_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """tempfile.mkdtemp, but with the mode any other new directory gets (mkdtemp's is 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(path, 0o777 & ~_umask())
    return path


@contextlib.contextmanager
def naming_errors(path: Path) -> Iterator[None]:
    """An OSError raised while writing `path` names it: write() on a full disk raises ENOSPC with
    no file name, and the one-line error must still say which output did not fit."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    with naming_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def check_user_file(path: Path, option: str) -> None:
    """A file the user named for us to write (`--report`): new, a regular file (replaced
    atomically), a character device or a pipe (written through, never replaced: /dev/null stays
    a device). A symbolic link is refused, neither followed nor replaced (a link planted in a
    shared directory must not redirect a root's write); so are directories and block devices."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise MvlmError(f"{option} {path}: is a symbolic link; give the file it points to")
    if stat.S_ISDIR(mode):
        raise MvlmError(f"{option} {path}: is a directory; give a file name")
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        raise MvlmError(f"{option} {path}: is not a regular file, a character device or a pipe")


def is_regular_or_new(path: Path) -> bool:
    """`path` does not exist, or is a regular file (not a link, device or pipe)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def write_user_file(path: Path, data: bytes, option: str) -> None:
    """Write a file the user named (check_user_file says which): atomically when it is new or
    regular, else written through (a device or a pipe, which a rename would replace)."""
    path = Path(path)
    check_user_file(path, option)
    if is_regular_or_new(path):
        write_bytes(path, data)
        return
    with naming_errors(path):
        try:
            # No O_CREAT: it exists. O_NOFOLLOW: a link swapped in since is not followed.
            # O_NONBLOCK: a pipe nobody reads is an error, not a hang.
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise MvlmError(f"{option} {path}: a pipe that no process reads") from None
            if e.errno == errno.ELOOP:
                raise MvlmError(f"{option} {path}: is a symbolic link; give the file it points to") from None
            raise
        with os.fdopen(fd, "wb") as f:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # replaced by a regular file since: no partial write there
                raise MvlmError(f"{option} {path}: changed while being written; try again")
            os.set_blocking(fd, True)
            f.write(data)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def check_regular_file(path: Path, what: str) -> Path:
    """`path`, once it is a regular file (symbolic links followed): a FIFO or a device is never
    opened, since reading one blocks or never ends."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing ({what})") from None
    except OSError as e:  # permission denied on a folder, a symlink loop...
        raise ArtifactError(f"{path}: unreadable ({e.strerror or e}) ({what})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ArtifactError(f"{path}: unreadable ({kind}) ({what})")
    return path


def read_json(path: Path, what: str) -> Any:
    """Parsed JSON of `path`; one-line errors that tell a missing, an unreadable and a corrupt file apart."""
    path = check_regular_file(path, what)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({e.strerror or e}) ({what})") from None
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt, not valid JSON ({e}) ({what})") from None


def read_json_object(path: Path, what: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """read_json, checked to be an object holding the `required` keys."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: corrupt, expected a JSON object, found a {type(data).__name__} ({what})")
    missing = [key for key in required if key not in data]
    if missing:
        raise ArtifactError(f"{path}: corrupt, lacks {', '.join(missing)} ({what})")
    return data


def safe_join(directory: Path, name: object, source: Path) -> Path:
    """`directory / name` for a file name read from `source`, refused unless it stays inside
    `directory` (no absolute path, no '..', no symbolic link out): a bundle made elsewhere must
    not make us read, rewrite or delete files outside it."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ArtifactError(f"{source}: file name {name!r} is not a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ArtifactError(f"{source}: file name {name!r} points outside {directory}")
    path = Path(directory) / relative
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise ArtifactError(f"{source}: file name {name!r} resolves outside {directory} (a symbolic link)")
    return path


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends: for the few renames and the manifest save
    that commit a stage, so an interrupt never leaves the manifest and the disk out of step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Locks ----------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # real path of the lock file -> [fd, count]: re-entrant in a process


@contextlib.contextmanager
def directory_lock(directory: Path, exclusive: bool = True) -> Iterator[None]:
    """Hold `directory/.mvlm-compile.lock` (flock) for the block: exclusive for writers, shared for
    readers. Held by another process: MvlmError at once (exit 2), never a wait. A reader of a
    directory it cannot write (a read-only copy) goes without the lock."""
    directory = Path(directory)
    path = directory / LOCK
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        if exclusive or e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd) if exclusive else "writing"  # a shared lock waits only on a writer
            os.close(fd)
            raise MvlmError(
                f"{directory}: in use by another mvlm-compile ({holder}); "
                "wait for it to finish (the lock is released when that process ends)"
            ) from None
        _held[key] = [fd, 1]
    try:
        if exclusive:
            remove_staging_leftovers(directory)
        yield
    finally:
        if fd is not None:
            del _held[key]
            os.close(fd)


def _lock_holder(fd: int) -> str:
    """What the process holding the lock file `fd` does: "reading" when a shared lock can be had
    (readers hold shared locks: verify, run, eval, bench), else "writing"."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "writing"
    fcntl.flock(fd, fcntl.LOCK_UN)
    return "reading"


def remove_staging_leftovers(directory: Path, name: str | None = None) -> list[Path]:
    """Remove our temporary entries (".<x>.<random>.tmp|.partial|.old") in `directory`, or only
    those named after `name`. Called with the lock held, so no live process owns them: they are
    what a killed run left (gigabytes for a real model)."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for entry in Path(directory).iterdir():
        if not entry.name.startswith(".") or not entry.name.endswith(STAGING_SUFFIXES):
            continue
        if name is not None and not entry.name.startswith(f".{name}."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# Output directories ---------------------------------------------------------------------------


def _legacy_kind(directory: Path) -> str | None:
    """The kind of a directory written before markers existed, from its own records."""
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((directory / "manifest.json").read_text())
        if isinstance(manifest, dict) and manifest.get("format") == "mvlm-compile-artifacts":
            return "artifacts"
        if isinstance(manifest, dict) and "components" in manifest and "generation" in manifest:
            return "golden"
    if (directory / "bundle.json").is_file() or (directory / ".host-stages.json").is_file():
        return "bundle"
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((directory / "config.json").read_text())
        if isinstance(config, dict) and "mvlm_compile_synthetic" in config:
            return "checkpoint"
    return None


def directory_kind(directory: Path) -> str | None:
    """What we wrote into `directory` ("artifacts", "golden", "checkpoint", "bundle"...), or None."""
    directory = Path(directory)
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((directory / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("kind"), str):
            return marker["kind"]
    return _legacy_kind(directory)


def write_marker(directory: Path, kind: str) -> None:
    write_json(Path(directory) / MARKER, {"kind": kind, "written_by": "mvlm-compile"})


def check_output_dir(final: Path, kind: str, inputs: Iterable[Path | None] = (), option: str = "--out") -> None:
    """Refuse (exit 2) an output path we may not write: a file, an input or a parent of one, or a
    non-empty directory that is not a `kind` directory we wrote."""
    final = Path(final)
    here = final.resolve()
    for source in inputs:
        if source is None:
            continue
        there = Path(source).resolve()
        if there == here or there.is_relative_to(here):
            raise MvlmError(f"{option} {final}: is the input {source} or contains it; choose another directory")
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise MvlmError(f"{option} {final}: exists and is not a directory")
    if final.is_dir():
        entries = [p for p in final.iterdir() if p.name != LOCK]
        if entries and directory_kind(final) != kind:
            raise MvlmError(
                f"{option} {final}: exists and is not an mvlm-compile {kind} directory; "
                "refusing to replace it (remove it yourself or choose another directory)"
            )


@contextlib.contextmanager
def atomic_output_dir(
    final: Path, kind: str, inputs: Iterable[Path | None] = (), option: str = "--out"
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    `final` must be new, empty, or a `kind` directory we wrote (check_output_dir); it is locked
    for the duration and replaced as a whole. On any error (or Ctrl-C/SIGTERM) the temporary
    directory is removed and `final` is left as it was.
    """
    final = Path(final).absolute()
    inputs = list(inputs)
    check_output_dir(final, kind, inputs, option)
    created = not final.exists()
    final.mkdir(parents=True, exist_ok=True)
    try:
        with directory_lock(final):
            check_output_dir(final, kind, inputs, option)  # again, now that no one else writes
            remove_staging_leftovers(final.parent, name=final.name)
            tmp = make_temp_dir(final.parent, prefix=f".{final.name}.", suffix=".partial")
            try:
                yield tmp
                write_marker(tmp, kind)
                old = final.with_name(f".{final.name}.{os.getpid()}.old")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        if created and final.is_dir() and [p.name for p in final.iterdir()] in ([], [LOCK]):
            shutil.rmtree(final, ignore_errors=True)
        raise
