"""Output side: shard planning by size, a streaming safetensors writer, the index, the atomic staging dir.

A shard's header is written first (every size is known from the plan), then each tensor's bytes
in order: copied from a source file (runs of adjacent bytes merged; sendfile(2) when source and
destination offsets agree within a page, else read+write through a 1 MB buffer), written from a
buffer, or, for casts, written at their offsets by the caster threads (write_at, then advance).
Nothing is held beyond fixed buffers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from moge_cli.errors import MogeError, UsageError
from moge_cli.safetensors_format import build_header

from moge_converters.plan import OutTensor

INDEX_NAME = "model.safetensors.index.json"
LOCK_NAME = ".moge-staging.lock"  # in a staging directory, flocked by the run writing it
PAGE = 4096
METADATA = {"format": "pt"}
SEND_BYTES = 64 * 1024 * 1024  # one sendfile call: bounded so progress and Ctrl-C stay responsive
COPY_BUFFER = 1024 * 1024  # read+write copies: small enough to stay in cache between the two
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class WriteError(MogeError):
    """Writing the output failed (disk full, not writable...); the partial output has been removed."""


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, '1000' -> 1000 (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).upper() not in _UNITS:
            raise UsageError(f"size {text!r}: expected a number with an optional unit (KB, MB, GB, KiB, MiB, GiB), e.g. 5GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return value


@dataclass
class Shard:
    file: str  # name inside the output directory
    tensors: list[OutTensor]

    def header(self) -> bytes:
        head, _ = build_header([(t.name, t.dtype, t.shape) for t in self.tensors], METADATA)
        return head

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header()) + self.data_bytes


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[Shard]:
    """Fill shards in order with up to max_bytes of tensor data; a tensor is never split (a bigger one gets its own)."""
    groups: list[list[OutTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def index_json(shards: list[Shard]) -> bytes:
    weight_map = {t.name: s.file for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.data_bytes for s in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode()


# Low-level writes, module functions so tests can inject failures.
def _write(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    return os.sendfile(out_fd, in_fd, offset, count)


_BUFFER: memoryview | None = None


def _copy_buffer() -> memoryview:
    """The 1 MB buffer that misaligned copies go through (shared: shards are written one at a time)."""
    global _BUFFER
    if _BUFFER is None:
        _BUFFER = memoryview(bytearray(COPY_BUFFER))
    return _BUFFER


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    return os.pwrite(fd, data, offset)


def _fallocate(fd: int, size: int) -> None:
    """Reserve a new file's blocks before writing it (Linux fallocate(2)): conversions measured 10-25%
    faster on ext4 here (the filesystem allocates once, not as the page cache fills), and a full disk
    fails here, before anything is written. Not glibc's posix_fallocate: where a filesystem cannot
    allocate ahead, that writes every block. Where it cannot, nothing happens."""
    fallocate = _libc_fallocate()
    if fallocate is not None and fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))


@functools.cache
def _libc_fallocate():
    try:
        f = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    f.restype = ctypes.c_int
    return f


class ShardFile:
    """One output shard being streamed: header on open, then tensor bytes in header order.

    `pos` is where the next tensor starts. Bytes get there three ways, each at its own explicit
    offset, so they need no ordering among themselves: write() (now), send() (a copy from a source
    file, deferred so adjacent ranges merge) and reserve() + write_at() (a range handed to other
    threads, which pwrite it while the caller goes on). `barrier`, when set, is called before the
    file is closed: the owner of reserved ranges waits for them there. `on_abort` is called before
    the file is closed after an error.
    """

    def __init__(self, path: Path, shard: Shard, progress: Callable[[int], None] | None = None):
        self.path, self.shard, self.progress = path, shard, progress
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _fallocate(self.fd, shard.file_bytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.pos = 0
        self.barrier: Callable[[], None] | None = None
        self.on_abort: Callable[[], None] | None = None
        self._fd_pos = 0  # the descriptor's own offset (write and sendfile write there)
        self._sendfile_ok = True
        self._run: list[int] | None = None  # pending copy: [source fd, source offset, count, output offset]
        self._buf = _copy_buffer()
        self._write_lock = threading.Lock()
        self.write(memoryview(shard.header()), count=False)

    def write(self, data: memoryview | bytes, count: bool = True) -> None:
        self.flush()
        data = memoryview(data).cast("B")
        self._seek(self.pos)
        _write(self.fd, data)
        self.pos += len(data)
        self._fd_pos = self.pos
        if count and self.progress:
            self.progress(len(data))

    def reserve(self, n: int) -> int:
        """Claim the next n bytes for write_at; returns their offset. Their progress is the caller's to report."""
        at, self.pos = self.pos, self.pos + n
        return at

    def write_at(self, data: memoryview | bytes, offset: int) -> None:
        """pwrite `data` at `offset` inside a reserved range (any thread).

        One thread at a time: writes to one file take its inode lock, and a second writer spun on it
        in the kernel (17% of a float16 conversion's CPU); waiting here, it sleeps, and the threads
        settle into casting while the other writes."""
        data = memoryview(data).cast("B")
        with self._write_lock:
            while data:
                n = _pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n

    def send(self, in_fd: int, offset: int, count: int) -> None:
        """Copy `count` bytes at `offset` of an open source file, in the kernel where it can.

        Lazy: a range that continues the previous one in the same file extends it, so runs of
        adjacent source bytes go out in one copy (each call has a fixed cost, inode update
        included, that per-tensor calls would pay thousands of times). `pos` counts it at once.
        """
        if self._run and self._run[0] == in_fd and self._run[1] + self._run[2] == offset:
            self._run[2] += count
        else:
            self.flush()
            self._run = [in_fd, offset, count, self.pos]
        self.pos += count

    def flush(self) -> None:
        """Copy the pending run of source bytes (see send).

        sendfile when the run sits at the same offset within a page in both files; otherwise the
        kernel would split every page, and a read into a cache-sized buffer plus a write is cheaper.
        """
        if not self._run:
            return
        in_fd, offset, count, at = self._run
        self._run = None
        self._seek(at)
        end = offset + count
        kernel = self._sendfile_ok and (offset - at) % PAGE == 0
        while offset < end:
            n = min(SEND_BYTES if kernel else len(self._buf), end - offset)
            if kernel:
                try:
                    sent = _sendfile(self.fd, in_fd, offset, n)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    self._sendfile_ok = kernel = False  # a filesystem without sendfile: read and write instead
                    continue
            else:
                sent = os.preadv(in_fd, [self._buf[:n]], offset)
                _write(self.fd, self._buf[:sent])
            if sent == 0:
                raise WriteError(f"{self.path}: source file ended early while copying (was it truncated?)")
            offset += sent
            self._fd_pos += sent
            if self.progress:
                self.progress(sent)

    def _seek(self, where: int) -> None:
        if self._fd_pos != where:
            os.lseek(self.fd, where, os.SEEK_SET)
            self._fd_pos = where

    def close(self) -> None:
        try:
            if self.barrier is not None:
                barrier, self.barrier = self.barrier, None
                barrier()
            self.flush()
        finally:
            os.close(self.fd)
        want = self.shard.file_bytes
        if self.pos != want:  # a recipe that wrote too little or too much: the header would lie
            raise WriteError(f"{self.path}: wrote {self.pos} bytes, the header promises {want}")

    def abort(self) -> None:
        """Close after an error, once threads writing reserved ranges have stopped."""
        try:
            if self.on_abort is not None:
                self.on_abort()
        finally:
            os.close(self.fd)


def write_shards(out_dir: Path, shards: list[Shard], emit: Callable[[ShardFile, OutTensor], None], progress=None) -> list[Path]:
    """Write every shard (emit(shard_file, tensor) writes one tensor's bytes) and the index; return the files."""
    paths = []
    for shard in shards:
        sf = ShardFile(out_dir / shard.file, shard, progress)
        try:
            for t in shard.tensors:
                before = sf.pos
                emit(sf, t)
                if sf.pos - before != t.nbytes:
                    raise WriteError(f"{t.name}: wrote {sf.pos - before} bytes, expected {t.nbytes}")
        except BaseException:
            sf.abort()
            raise
        sf.close()
        paths.append(out_dir / shard.file)
    (out_dir / INDEX_NAME).write_bytes(index_json(shards))
    return paths


# ---- destination: checks and the atomic staging directory ---------------------------------------
def check_destination(src_root: Path, dst: Path, force: bool) -> Path:
    """Refuse dst equal to / inside the source (or holding it), and an existing dst without force."""
    src, out = src_root.resolve(), dst.resolve()
    if out == src or out.is_relative_to(src):
        raise UsageError(f"{dst}: the destination is inside the source checkpoint {src_root}; write somewhere else")
    if src.is_relative_to(out):
        raise UsageError(f"{dst}: the destination contains the source checkpoint {src_root}; write somewhere else")
    if os.path.lexists(dst) and not force:
        raise UsageError(f"{dst}: already exists; pass --force to replace it")
    return out


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_free_space(where: Path, need: int) -> None:
    free = free_bytes(where)
    if free < need:
        raise UsageError(f"{where}: not enough free disk space: the output needs {need:,} bytes, {free:,} are free")


def remove_stale_staging(dst: Path) -> list[str]:
    """Delete the staging directories (`.NAME.moge-tmp-PID`) beside dst that no running conversion owns;
    one line per directory removed, saying what it was and how much disk it held.

    A run holds an flock on the LOCK_NAME file in its staging directory until it renames it into
    place; the kernel drops the lock when the process dies, SIGKILL included, so a lock that can
    be taken means a dead owner, whatever process now has its PID. A staging directory without
    that file (an older moge, or the instant between mkdir and lock) is stale only when its PID is
    not running. `.moge-old-PID` directories may hold the previous output of a run killed between
    its two renames: they are left for the user.
    """
    removed = []
    for tmp in sorted(dst.parent.glob(".*.moge-tmp-*")) if dst.parent.is_dir() else ():
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and tmp.is_dir() and not tmp.is_symlink() and _owner_gone(tmp, int(pid)):
            size = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.lexists(tmp):
                removed.append(f"removed {tmp}: the staging directory of a killed run (process {pid}), {size:,} bytes freed")
    return removed


def _owner_gone(tmp: Path, pid: int) -> bool:
    try:
        fd = os.open(tmp / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return not _alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # nobody holds it: its owner is dead
    except OSError:
        return False
    finally:
        os.close(fd)


def _tree_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(root) for f in files)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _lock(tmp: Path) -> int:
    """An fd holding an exclusive flock on tmp / LOCK_NAME: this staging directory has a live owner."""
    fd = os.open(tmp / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextmanager
def staging_dir(dst: Path) -> Iterator[Path]:
    """A temporary directory beside dst, renamed to dst on success and removed on any error or Ctrl-C.

    An existing dst (only reached with --force) is moved aside first and deleted after the rename.
    Staging directories that a killed run (SIGKILL, power loss) left beside dst are removed first
    (convert and quantize call remove_stale_staging earlier still, before the free-space check, to report them).
    """
    created = [p for p in reversed(dst.parents) if not p.exists()]
    remove_stale_staging(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.moge-tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            lock = _lock(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except PermissionError as e:
        raise UsageError(f"{dst}: cannot create the output here ({e.strerror}); is the directory writable?") from None
    try:
        yield tmp
        os.unlink(tmp / LOCK_NAME)  # not part of the output; the flock stays held on the open file until the rename
        old = dst.parent / f".{dst.name}.moge-old-{os.getpid()}"
        if os.path.lexists(dst):
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            if os.path.lexists(old):
                os.replace(old, dst)
            raise
        if os.path.lexists(old):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, MogeError):
            why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}.get(
                e.errno, e.strerror or str(e)
            )
            raise WriteError(f"{dst}: writing the output failed ({why}); the partial output was removed") from e
        raise
    finally:
        os.close(lock)
