"""The results JSONL: one line per segment, flushed as segments finish, resumable, shared safely.

Several processes may work on one results file at once: shards of one config (``dataset.shard=i/n``)
started together, on one machine or on a cluster's shared filesystem, or the same command started
twice. Three rules keep every finished segment in the file exactly once:

- Every read-modify-write happens under an exclusive POSIX record lock (``fcntl.lockf``) on a
  hidden ``.<results>.lock`` file beside it. POSIX locks are held by the kernel (and by NFS's lock manager
  on a shared filesystem) and vanish when their process dies, so a killed run never leaves a stale
  lock behind.
- Before appending, a process reads what others appended since its last look and skips a segment
  that is already there.
- Before decoding a batch, a process *claims* its segments in ``.<results>.claims``. Segments
  claimed by a live process are left to it; a claim is live while its owner holds the lock on its
  owner file in ``.<results>.owners/`` (again released by the kernel when the owner dies), so work
  claimed by a crashed run is picked up by the next one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from decoding.errors import FusemtError, os_error
from eval.jsonio import parse_jsonl_line

log = logging.getLogger(__name__)

RESUME_FIX = "fix or delete that line (a deleted segment is decoded again), then rerun to resume"


def read_rows(path: Path, start: int = 0, first_line: int = 1) -> tuple[list[dict], int, int, int]:
    """Complete JSON lines of ``path`` from byte ``start`` (line number ``first_line``):
    (rows, complete lines read, end of the last complete line, file size).

    A corrupt or non-UTF-8 line is a user-facing error naming the line.
    """
    with path.open("rb") as fh:
        fh.seek(start)
        data = fh.read()
    complete = data[: data.rfind(b"\n") + 1]
    rows = [parse_jsonl_line(line, f"{path}:{n}", RESUME_FIX, required=("id",), segment=True)
            for n, line in enumerate(complete.split(b"\n")[:-1], first_line)]
    return [row for row in rows if row is not None], complete.count(b"\n"), start + len(complete), start + len(data)


def check_rows_match(rows: list[dict], dataset: dict, path: Path, dataset_name: str) -> None:
    """Finished rows must be segments of the dataset as it is now: a row whose id the dataset lacks, or
    whose source or reference differs (the dataset was edited in place), would be resumed and scored as
    if it were current. ``dataset``: every segment by id; ``dataset_name`` names it in the message."""
    for row in rows:
        seg = dataset.get(row["id"])
        if seg is None:
            raise FusemtError(f"{path} holds segment '{row['id']}', which {dataset_name} does not have: the file was "
                              "edited or written for other data: delete that line, or pass a new run_name=...")
        for key, now in (("source", seg.source), ("reference", seg.reference)):
            if row.get(key) != now:
                raise FusemtError(f"segment '{row['id']}' has another {key} in {dataset_name} than in {path}: the "
                                  "dataset changed after these results were written: restore it, or pass a new "
                                  "run_name=... (or delete the results file) to decode it as it is now")


class ResultsFile:
    """Append-only JSONL of finished segments, shared by every process running the same config.

    Opening an existing file resumes it: complete lines are kept, a line cut off by a killed
    process is dropped (the file is truncated back to the last newline), and segments already
    present are reported as done. Lines written with another config fingerprint are refused, so
    two configs never mix in one file. The file is created with its first result.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self.rows: list[dict] = []
        self.done_ids: set[str] = set()
        self._offset = 0  # bytes of the file already read into self.rows
        self._lines = 0  # lines of the file already read
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._owner_fh = None
        with self._os_errors():
            path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._refresh()

    # --- locking -----------------------------------------------------------------------------
    @contextmanager
    def _os_errors(self):
        """A read-only folder, a full disk, a name too long: one line naming the file and the cause."""
        try:
            yield
        except OSError as err:
            raise os_error(err, self.path) from None

    @contextmanager
    def _locked(self):
        """The results lock; every file operation under it reports OS errors as one line."""
        with self._os_errors(), open(self._sidecar("lock"), "a") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(fh, fcntl.LOCK_UN)

    def _refresh(self) -> None:
        """Read what was appended since the last look (caller holds the lock)."""
        if not self.path.exists():
            return
        rows, lines, end, size = read_rows(self.path, self._offset, self._lines + 1)
        if end != size:  # only a dead process leaves a partial line: writers hold the lock
            log.warning("%s ends in a partial line (interrupted write): dropping it and resuming", self.path)
            with self.path.open("r+b") as fh:
                fh.truncate(end)
        other = {r.get("config_hash") for r in rows} - {self.fingerprint}
        if other:
            raise FusemtError(f"{self.path} holds results of another config: pass a new run_name=... "
                              "(or delete the file to start over)")
        for row in rows:
            if row["id"] not in self.done_ids:
                self.rows.append(row)
                self.done_ids.add(row["id"])
        self._lines += lines
        self._offset = end

    # --- claims ------------------------------------------------------------------------------
    def _sidecar(self, kind: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{kind}")

    @property
    def _owners_dir(self) -> Path:
        return self._sidecar("owners")

    @property
    def _claims_path(self) -> Path:
        return self._sidecar("claims")

    def _register_owner(self) -> None:
        if self._owner_fh is None:
            self._owners_dir.mkdir(exist_ok=True)
            self._owner_fh = open(self._owners_dir / self._owner, "a")
            fcntl.lockf(self._owner_fh, fcntl.LOCK_EX)

    def _live_owners(self) -> set[str]:
        live = {self._owner}
        this_process = f"{socket.gethostname()}-{os.getpid()}-"
        for owner_file in self._owners_dir.glob("*"):
            # POSIX locks never conflict within one process: owners in this process are alive until closed.
            if owner_file.name.startswith(this_process):
                live.add(owner_file.name)
                continue
            with open(owner_file, "a") as fh:
                try:
                    fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held: its process is alive
                    live.add(owner_file.name)
                    continue
                fcntl.lockf(fh, fcntl.LOCK_UN)
            owner_file.unlink(missing_ok=True)  # its process died; its claims are void
        return live

    def claim(self, ids: list[str], limit: int) -> list[str]:
        """Claim up to ``limit`` of ``ids`` (in order) that nobody has finished or claimed: ours to decode."""
        with self._locked():
            self._refresh()
            self._register_owner()
            claimed = set()
            if self._claims_path.exists():
                live = self._live_owners()
                for line in self._claims_path.read_text(encoding="utf-8").splitlines():
                    owner, _, sid = line.partition("\t")
                    if owner in live and owner != self._owner:
                        claimed.add(sid)
            mine = [i for i in ids if i not in self.done_ids and i not in claimed][:limit]
            with self._claims_path.open("a", encoding="utf-8") as fh:
                fh.write("".join(f"{self._owner}\t{sid}\n" for sid in mine))
            return mine

    # --- writing -----------------------------------------------------------------------------
    def append(self, row: dict) -> bool:
        """Append a finished segment unless another process already wrote it; True when written."""
        row = {**row, "config_hash": self.fingerprint}
        with self._locked():
            self._refresh()
            if row["id"] in self.done_ids:
                log.warning("segment %s was finished by another process meanwhile: keeping that result", row["id"])
                return False
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                unwritten = memoryview(line)
                while unwritten:
                    unwritten = unwritten[os.write(fd, unwritten):]
                os.fsync(fd)
            except OSError:  # a full disk: cut off the partial line; every finished segment stays
                with suppress(OSError):  # failing that, the next run drops the partial line
                    os.ftruncate(fd, self._offset)
                raise
            finally:
                os.close(fd)
            self._offset += len(line)
            self._lines += 1
        self.rows.append(row)
        self.done_ids.add(row["id"])
        return True

    def snapshot(self) -> list[dict]:
        """Every finished segment in the file, by whichever process (a consistent read under the lock)."""
        with self._locked():
            self._refresh()
        return list(self.rows)

    @contextmanager
    def exclusive(self):
        """Hold the results lock, e.g. while writing files derived from the results (metrics)."""
        with self._locked():
            self._refresh()
            yield list(self.rows)

    def close(self) -> None:
        if self._owner_fh is not None:
            fcntl.lockf(self._owner_fh, fcntl.LOCK_UN)
            self._owner_fh.close()
            self._owner_fh = None
            (self._owners_dir / self._owner).unlink(missing_ok=True)
