"""The instance store: one ``<id>.gadget`` file per gadget instance (docs/gadget-service.md §6.3).

Layout: ``<state_dir>/gadgets/`` (mode 0700; created with its parents), one file per instance
named after its 32-hex id, mode 0644, holding the whole ``CreateGadgetInstanceRequest`` as
protobuf JSON (lowerCamelCase names as in the proto, zero values omitted, ``int64`` as strings),
so a file written by upstream's ``ig daemon`` loads here and the other way round.

Contracts:

* :meth:`InstanceStore.save` is atomic: the content goes to a temporary file in the same
  directory, is fsynced, renamed over ``<id>.gadget`` and the directory is fsynced, so after a
  crash a file is either the old or the new content, never a torn one.
* :meth:`InstanceStore.load_all` never fails because of one bad file: a file that cannot be
  read or parsed, or whose content names another id, is moved aside to ``<name>.corrupt``,
  logged at error level and recorded in :meth:`InstanceStore.problems`; the others load.
* Leftover temporary files (a crash between write and rename) are removed at :meth:`start`.

The store is synchronous and small (one file per instance, written on create and removed on
remove); callers on the event loop run it in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from pipeline._gen import gadget_service_pb2 as pb

__all__ = ["GADGETS_DIR", "SUFFIX", "InstanceStore", "StoreError", "StoreProblem"]

_logger = logging.getLogger(__name__)

GADGETS_DIR = "gadgets"
SUFFIX = ".gadget"
CORRUPT_SUFFIX = ".corrupt"
_TMP_PREFIX = ".tmp-"
_ID = re.compile(r"^[a-f0-9]{32}$")


class StoreError(OSError):
    """Writing or deleting an instance file failed; the message names the file."""


@dataclass(frozen=True, slots=True)
class StoreProblem:
    """A file the store could not load, and where it was moved.

    Args:
        path: the file as found.
        reason: why it could not be loaded.
        moved_to: where it now lives (``<name>.corrupt``), or None if moving failed too.
        time: UNIX seconds when it was found.
    """

    path: Path
    reason: str
    moved_to: Path | None
    time: float


class InstanceStore:
    """The file store under ``<state_dir>/gadgets``.

    Args:
        state_dir: the daemon's state directory; the store uses its ``gadgets`` folder.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / GADGETS_DIR
        self._problems: list[StoreProblem] = []

    def start(self) -> None:
        """Creates the directory (0700, parents 0755) and removes stale temporary files."""
        self.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.directory.mkdir(exist_ok=True, mode=0o700)
        # mkdir's mode is filtered by the umask and ignored for an existing directory.
        os.chmod(self.directory, 0o700)
        for tmp in self.directory.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def stop(self) -> None:
        """Nothing stays open between calls; present for the component lifecycle."""

    def path(self, instance_id: str) -> Path:
        """Where the instance ``instance_id`` lives (whether or not it exists)."""
        return self.directory / f"{instance_id}{SUFFIX}"

    def exists(self, instance_id: str) -> bool:
        return self.path(instance_id).is_file()

    def problems(self) -> list[StoreProblem]:
        """Files that failed to load since this store was created, oldest first."""
        return list(self._problems)

    def save(self, request: pb.CreateGadgetInstanceRequest) -> Path:
        """Writes the request atomically under its instance id; returns the path.

        Raises:
            ValueError: the request carries no valid id.
            StoreError: the write failed (nothing was replaced).
        """
        instance_id = request.gadgetInstance.id
        if not _ID.match(instance_id):
            raise ValueError(f"invalid gadget instance id: {instance_id}")
        target = self.path(instance_id)
        data = json_format.MessageToJson(request, indent=None).encode()
        try:
            # Inside the try: on a read-only or full file system creating the temporary file
            # is what fails, and the error must name the instance's file, not the temporary.
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=SUFFIX,
                                            dir=self.directory)
        except OSError as e:
            raise StoreError(f"writing {target}: {e.strerror or e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp_name, target)
            self._sync_dir()
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise StoreError(f"writing {target}: {e}") from e
        return target

    def delete(self, instance_id: str) -> bool:
        """Removes the instance's file; False if there was none.

        Raises:
            StoreError: the file exists but could not be removed.
        """
        target = self.path(instance_id)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"removing {target}: {e}") from e
        self._sync_dir()
        return True

    def load(self, instance_id: str) -> pb.CreateGadgetInstanceRequest:
        """One instance's request.

        Raises:
            FileNotFoundError: no such instance.
            ValueError: the file is not a valid instance (it is left in place).
        """
        return self._parse(self.path(instance_id))

    def load_all(self) -> list[pb.CreateGadgetInstanceRequest]:
        """Every valid instance, in file-name (= id) order; bad files are moved aside."""
        out = []
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            try:
                out.append(self._parse(path))
            except (OSError, ValueError) as e:
                self._set_aside(path, str(e))
        return out

    def _parse(self, path: Path) -> pb.CreateGadgetInstanceRequest:
        text = path.read_bytes()
        req = pb.CreateGadgetInstanceRequest()
        try:
            # Unknown fields are refused, as upstream's reader does: a file from a newer
            # schema must not silently lose what it says.
            json_format.Parse(text, req, ignore_unknown_fields=False)
        except (json_format.ParseError, UnicodeDecodeError) as e:
            raise ValueError(f"not a CreateGadgetInstanceRequest in protobuf JSON: {e}") from e
        stem = path.name[: -len(SUFFIX)]
        if req.gadgetInstance.id != stem:
            raise ValueError(f"file name says id {stem!r} but the content says "
                             f"{req.gadgetInstance.id!r}")
        return req

    def _set_aside(self, path: Path, reason: str) -> None:
        moved: Path | None = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, moved)  # type: ignore[arg-type]
            self._sync_dir()
        except OSError as e:
            _logger.error("cannot move unreadable instance file %s aside: %s", path, e)
            moved = None
        problem = StoreProblem(path, reason, moved, time.time())
        self._problems.append(problem)
        _logger.error("instance file %s is unreadable and was skipped (moved to %s): %s",
                      path, moved, reason)

    def _sync_dir(self) -> None:
        # The rename is durable only once the directory entry itself reached the disk.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
