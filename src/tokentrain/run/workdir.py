"""A work dir belongs to one run.

* A lock (``WORK_DIR/.tokentrain.lock``, flock through `filelock`) is held by the main rank
  for the whole run, so a second run on the same folder is refused with one line naming
  the holder (``.tokentrain.owner.json``: pid, host, start time, command). The kernel drops
  a flock when its process dies, so a killed run leaves no lock to clear by hand; its owner
  file is found on the next start and the take-over is logged.
* Starting on a work dir that holds checkpoints without ``--resume`` is refused (it would
  mix two runs' checkpoints, metrics and export); ``--overwrite`` replaces the old run -- its
  outputs are renamed aside and deleted only once the new run has written its first
  checkpoint, and put back if it fails before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from tokentrain.errors import ConfigError

log = logging.getLogger("tokentrain.train")

LOCK = ".tokentrain.lock"
OWNER = ".tokentrain.owner.json"
# What a previous run leaves that a fresh run must not mix with its own (--overwrite clears them).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "generations.jsonl", "tensorboard", "hf")
ASIDE = ".overwritten"  # where --overwrite keeps them until the new run has written a checkpoint
DOOMED = ".overwritten.deleting"  # ASIDE renamed, once the new run has a checkpoint: never restored


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another run (no owner record)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')} since {started} ({owner.get('command', '?')})"


def read_owner(work_dir: Path) -> dict | None:
    try:
        owner = json.loads((Path(work_dir) / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def check_usable(work_dir: Path) -> None:
    """--work-dir must be a folder we can write in (or creatable): a usage error otherwise."""
    p = Path(work_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--work-dir {p}: is a file, not a folder; give a folder for checkpoints and logs")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "the work dir" if probe == p else f"its parent {probe}"
        raise ConfigError(f"--work-dir {p}: {what} is not writable (read-only?); give a folder you can write in")


def has_checkpoints(work_dir: Path) -> list[str]:
    """Names of the checkpoint folders (complete or not) and pointer a previous run left."""
    root = Path(work_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_") or p.name == "latest")


def check_start(work_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a fresh start that would mix with (and prune) a previous run's checkpoints."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: --overwrite deletes what --resume reads")
    if resume or overwrite:
        return
    found = has_checkpoints(work_dir)
    if found:
        steps = [f for f in found if f != "latest"]
        raise ConfigError(
            f"--work-dir {work_dir} holds checkpoints of an earlier run ({', '.join(steps[-3:]) or 'latest'}); "
            "continue it with --resume auto, use a new --work-dir, or pass --overwrite to delete them"
        )


def set_aside_previous_run(work_dir: Path) -> Path | None:
    """--overwrite: move the earlier run's outputs into ``WORK_DIR/.overwritten/`` (renames, nothing
    deleted): `drop_set_aside` deletes them once the new run has written its first checkpoint, `restore_set_aside`
    puts them back if it fails to. None when there was nothing to move."""
    aside = Path(work_dir) / ASIDE
    moved = []
    for name in RUN_OUTPUTS:
        p = Path(work_dir) / name
        if p.exists() or p.is_symlink():
            aside.mkdir(exist_ok=True)
            os.rename(p, aside / name)
            moved.append(name)
    if not moved:
        return None
    log.info(
        "--overwrite: moved the earlier run's %s aside to %s until this run has written its first checkpoint",
        ", ".join(moved),
        aside,
    )
    return aside


def drop_set_aside(work_dir: Path) -> None:
    """The new run has written a checkpoint: the earlier run's outputs set aside by --overwrite go (logged)."""
    aside = Path(work_dir) / ASIDE
    if aside.is_dir():
        names = [n for n in RUN_OUTPUTS if (aside / n).exists() or (aside / n).is_symlink()]
        # Renamed first: a kill during the delete leaves a folder `restore_set_aside` never
        # puts back over the new run (it would restore half of the old one).
        doomed = Path(work_dir) / DOOMED
        os.rename(aside, doomed)
        shutil.rmtree(doomed)
        log.warning("--overwrite: deleted the earlier run's %s in %s", ", ".join(names), work_dir)


def restore_set_aside(work_dir: Path) -> None:
    """Put back what --overwrite set aside, replacing what a start that never began left in its
    place (an empty `checkpoints/`, ...); also recovers from a start killed before it began."""
    doomed = Path(work_dir) / DOOMED
    if doomed.is_dir():  # a delete by `drop_set_aside` that a kill interrupted: finish it
        shutil.rmtree(doomed)
    aside = Path(work_dir) / ASIDE
    if not aside.is_dir():
        return
    for p in sorted(aside.iterdir()):
        dest = Path(work_dir) / p.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.rename(p, dest)
    aside.rmdir()
    log.warning(
        "the earlier run's outputs set aside by --overwrite are restored in %s (the new run did not start)", work_dir
    )


def drop_stale_outputs(work_dir: Path) -> None:
    """A start with no checkpoint to continue from: metrics/samples left by an earlier run that
    never wrote one would be mixed into this run's, so they go (logged)."""
    if has_checkpoints(work_dir):
        return
    for name in ("metrics.jsonl", "generations.jsonl"):
        p = Path(work_dir) / name
        if p.is_file():
            p.unlink()
            log.info("removed %s of an earlier run that wrote no checkpoint", p)


class WorkDirLock:
    """The main rank's hold on a work dir for the life of the run."""

    def __init__(self, work_dir: Path):
        from filelock import FileLock

        self.work_dir = Path(work_dir)
        self._lock = FileLock(str(self.work_dir / LOCK), timeout=0, thread_local=False)

    def _take(self, previous: dict | None = None) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise ConfigError(
                f"--work-dir {self.work_dir} is in use by {_describe(read_owner(self.work_dir) or previous)}; "
                "wait for that run to end, stop it, or use another --work-dir"
            ) from None

    def _check_files(self) -> None:
        """The lock and owner files must be plain files: opening a symlinked lock would create
        or truncate its target; a folder there is no lock at all (and a traceback)."""
        for name in (LOCK, OWNER):
            p = self.work_dir / name
            what = "a symlink" if p.is_symlink() else "a folder" if p.is_dir() else None
            if what:
                raise ConfigError(
                    f"--work-dir {self.work_dir}: {p} is {what}, not tokentrain's {'lock' if name == LOCK else 'owner'}"
                    " file; remove it (no run holds it) and start again"
                )

    def acquire(self) -> WorkDirLock:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._check_files()
        previous = read_owner(self.work_dir)
        self._take(previous)
        if previous and not _is_me(previous):
            log.warning(
                "work dir %s: taking over from a run that ended without releasing it (%s; it no longer holds the lock)",
                self.work_dir,
                _describe(previous),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command()}
        from tokentrain.utils.atomic import atomic_file

        with atomic_file(self.work_dir / OWNER, "w") as f:
            json.dump(me, f)
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            if _is_me(read_owner(self.work_dir)):
                (self.work_dir / OWNER).unlink()
        except OSError:
            pass
        self._lock.release()

    def probe(self) -> None:
        """Refuse now (one line) if another run holds the lock; holds nothing afterwards
        (the launcher's parent process checks before starting the ranks)."""
        self._check_files()
        if (self.work_dir / LOCK).exists():
            self._take()
            self._lock.release()


def _is_me(owner: dict | None) -> bool:
    if not owner:
        return False
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _command() -> str:
    args = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    text = " ".join(args)
    return text if len(text) <= 200 else text[:197] + "..."
