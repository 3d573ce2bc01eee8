"""Checkpoints: `WORK_DIR/checkpoints/step_N`, written aside, renamed into place, `latest` last.

Layout of one checkpoint::

    step_N/
      model.safetensors     weights (fp32 master copy)           -- engine.save (local, ddp)
      optimizer.pt          optimizer state (tensors only)       -- engine.save (local, ddp)
      trainer_state.pt      the run's states by name (CheckpointManager.states): trainer
                            counters, sampler, scheduler, per-source token counts
      rng_rank{R}.pt        every rank's RNG states (torch, CUDA, numpy, python; checkpoint/rng.py)
      config.json           the resolved config of the run
      COMPLETE              written last inside the folder: step, world size, and the
                            size and CRC-32 of every other file (the manifest)

A checkpoint is written to ``.step_N.partial`` by all ranks (a shared file system is
assumed, as for any multi-node checkpoint), then rank 0 renames it to ``step_N`` and
atomically rewrites the ``latest`` file (one line: ``step_N``). A crash at any moment
leaves either the previous checkpoint as latest or the new one complete. Loading uses
safetensors and ``torch.load(weights_only=True)``: nothing is unpickled as code.

`--resume auto` takes `latest` if it names a complete checkpoint, else the newest complete
``step_*`` folder, else (none written) starts fresh; a checkpoint whose files no longer match
its manifest (truncated, corrupted) is skipped with a warning naming the file, and the next
older intact one is used; when none is intact the resume is refused, naming each and what
of it is intact (a fresh start would prune them). `--resume PATH` takes a step folder (refused, naming the file,
if damaged), or a work dir. A failed write (no space left, ...) removes the partial
folder and raises a one-line `CheckpointError`; `latest` still names the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokentrain.checkpoint.rng import rng_state
from tokentrain.checkpoint.safety import refused_as_unsafe
from tokentrain.errors import CheckpointError, ConfigError, SaidByMainRank, TokentrainError, UnsafeCheckpointError
from tokentrain.utils import faults
from tokentrain.utils.atomic import atomic_file, with_umask
from tokentrain.utils.disk import disk_full, free_bytes

if TYPE_CHECKING:
    from torch.distributed.checkpoint.stateful import Stateful

    from tokentrain.engines.base import Engine

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
STEP_RE = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------ finding checkpoints


def step_of(path: Path) -> int | None:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step_N folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := step_of(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found, key=lambda sp: sp[0])]


def _crc32(path: Path, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def manifest(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file in a checkpoint folder (COMPLETE aside)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            out[p.relative_to(folder).as_posix()] = [p.stat().st_size, _crc32(p)]
    return out


def damage(folder: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted (naming the file), or None when every file
    matches the size and CRC-32 recorded in its COMPLETE manifest. Checkpoints written
    before manifests existed have none and are accepted as they are."""
    try:
        info = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return f"{folder / COMPLETE}: unreadable ({e})"
    if not isinstance(info, dict) or "step" not in info:
        return f"{folder / COMPLETE}: not a checkpoint manifest (no step); the checkpoint cannot be trusted"
    files = info.get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
        return f"{folder / COMPLETE}: not a checkpoint manifest (bad file list); the checkpoint cannot be trusted"
    for rel, (size, crc) in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p}: missing"
        got = p.stat().st_size
        if got != size:
            return f"{p}: {got} bytes, {size} when written (truncated?)"
        if _crc32(p) != crc:
            return f"{p}: contents changed since it was written (CRC-32 mismatch: corrupted)"
    return None


def unsafe(folder: Path) -> str | None:
    """Why a checkpoint's `.pt` files must not be loaded (a pickle outside its engine's
    allow-list, naming the file), or None."""
    from tokentrain.checkpoint.safety import unsafe_file
    from tokentrain.engines.fsdp2_checkpoint import FSDP_DIR, is_fsdp_checkpoint, read_metadata
    from tokentrain.engines.registry import safe_globals

    if faults.value("skip_checkpoint_scan"):  # tests: the weights-only loading must refuse alone
        return None
    try:
        allowed = safe_globals(folder)
    except TokentrainError as e:
        return str(e)
    why = unsafe_file(folder, allowed)
    if why is None and is_fsdp_checkpoint(folder):  # DCP's index is a plain pickle: read restricted
        try:
            read_metadata(folder / FSDP_DIR)
        except TokentrainError as e:
            return str(e)
    return why


def find_latest(root: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under `root` whose files are intact (`latest` first);
    a damaged one is skipped with a warning naming it and the one used instead."""
    return _search(root, verify)[0]


def _search(root: Path, verify: bool) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the checkpoint `find_latest` picks, the damaged ones skipped on the way: (folder, why))."""
    candidates = list(reversed(list_checkpoints(root)))
    pointer = root / LATEST
    if pointer.is_file():
        name = _pointer(pointer)
        target = root / name
        if name and is_complete(target):
            candidates = [target] + [c for c in candidates if c != target]
        else:
            log.warning(
                "%s names %s, which is not a complete checkpoint; looking for the newest complete one",
                pointer,
                name or "no step_N folder (garbage)",
            )
    skipped: list[tuple[Path, str]] = []
    for c in candidates:
        why = (damage(c) or unsafe(c)) if verify else None
        if why is None:
            if skipped:
                log.warning(
                    "checkpoint %s is damaged (%s); falling back to %s", skipped[0][0].name, skipped[0][1], c.name
                )
            return c, skipped
        skipped.append((c, why))
        log.warning("checkpoint %s is damaged and is not used: %s", c, why)
    return None, skipped


def none_intact(resume: str, root: Path, skipped: list[tuple[Path, str]]) -> CheckpointError:
    """Every checkpoint was rejected: a refusal naming each and why, and which files of each are
    intact -- never a fresh start over them (it would prune them and overwrite metrics and hf/)."""
    parts = []
    for folder, why in skipped:
        good = intact_files(folder)
        parts.append(f"{folder.name}: {why}" + (f" (intact: {', '.join(good)})" if good else ""))
    cls = UnsafeCheckpointError if all(": refused" in why for _, why in skipped) else CheckpointError
    return cls(
        f"--resume {resume}: no intact checkpoint under {root}, nothing was changed; "
        + "; ".join(parts)
        + ". Restore the damaged files or use an intact copy; to train anew instead: --overwrite or another --work-dir"
    )


def intact_files(folder: Path) -> list[str]:
    """The files of a checkpoint that still match its manifest (what could be salvaged)."""
    try:
        files = json.loads((folder / COMPLETE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, dict):
        return []
    good = []
    for rel, entry in sorted(files.items()):
        p = folder / rel
        try:
            if isinstance(entry, list) and p.is_file() and [p.stat().st_size, _crc32(p)] == entry:
                good.append(rel)
        except OSError:
            continue
    return good


def _pointer(pointer: Path) -> str:
    """The `step_N` that `latest` names, or "" when it holds anything else (garbage, a path
    elsewhere, unreadable): then the newest complete checkpoint is used, logged."""
    try:
        text = pointer.read_bytes()[:64].decode("ascii", errors="replace").strip()
    except OSError:
        return ""
    return text if re.fullmatch(r"step_\d+", text) else ""


def resolve_resume(resume: str | None, ckpt_root: Path, verify: bool = True) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh (`auto` with none written).

    An explicit step folder that is damaged is refused (CheckpointError naming the file);
    `auto` and a work dir fall back to the newest intact checkpoint, and are refused when
    there are checkpoints but none is intact."""
    if not resume:
        return None
    if resume == "auto":
        found, skipped = _search(ckpt_root, verify)
        if found is None and skipped:
            raise none_intact(resume, ckpt_root, skipped)
        if found is None:
            log.info("--resume auto: no checkpoint under %s; starting from scratch", ckpt_root)
        return found
    p = Path(resume)
    if is_complete(p):
        why = damage(p) if verify else None
        if why:
            raise CheckpointError(f"--resume {resume}: checkpoint is damaged: {why}; use another one or --resume auto")
        why = unsafe(p) if verify else None
        if why:
            raise UnsafeCheckpointError(f"--resume {resume}: {why}")
        return p
    for root in (p / "checkpoints", p):
        found, skipped = _search(root, verify) if root.is_dir() else (None, [])
        if found is not None:
            return found
        if skipped:
            raise none_intact(resume, root, skipped)
    if p.is_dir() and step_of(p) is not None:
        raise ConfigError(
            f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker); use another one or --resume auto"
        )
    raise ConfigError(f"--resume {resume}: no checkpoint found there; give a step_N folder, a work dir, or 'auto'")


# ------------------------------------------------------------------ saving


class CheckpointManager:
    """Saves and restores one run's checkpoints. What a checkpoint holds is listed once, in
    `states` (name -> an object with ``state_dict``/``load_state_dict``: the trainer's counters,
    the sampler, the lr schedule, the per-source token counts), plus the engine's model and
    optimizer and every rank's RNG; `fingerprint` (checkpoint/fingerprint.py) is saved with
    each and compared on resume (`ignore`: the differences the user lets go on)."""

    def __init__(
        self,
        root: Path,
        env,
        engine: Engine,
        keep: int,
        every: int = 1,
        *,
        states: dict[str, Stateful] | None = None,
        fingerprint: dict | None = None,
        ignore: list[str] | tuple[str, ...] = (),
    ):
        self.root = Path(root)
        self.env = env
        self.engine = engine
        self.keep = keep  # -1: keep all
        self.every = every  # save_steps
        # Set by the trainer once they all exist (the resume is checked before the model is built).
        self.states: dict[str, Stateful] = states or {}
        self.fingerprint = fingerprint
        self.ignore = list(ignore)
        self.written: list[str] = []  # this run's checkpoints, in the order written (pruning keeps the newest)
        self._checked: tuple[str | None, Path | None] | None = None  # (--resume, the folder check chose)

    def check(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from (`--resume`), chosen and checked by the main rank before
        the model is built (its files verified, the run's fingerprint and the engine's format and
        world size matched: a refused resume costs no model load) and sent to every other rank
        (they do not read every file again, and could otherwise see a newer damaged one). A
        refusal is the main rank's one line; the other ranks stop quietly with its exit code."""
        if self._checked is not None and self._checked[0] == resume:
            return self._checked[1]
        if self.env.world_size == 1:
            folder = self._choose(resume)
        else:
            choice: str | None = None
            error: TokentrainError | None = None
            if self.env.is_main:
                try:
                    found = self._choose(resume)
                    choice = None if found is None else str(found)
                except TokentrainError as e:
                    error = e
            code, choice = self.engine.broadcast_object((error.exit_code if error else 0, choice))
            if error:
                raise error
            if code:
                raise SaidByMainRank(code)
            folder = None if choice is None else Path(choice)
        self._checked = (resume, folder)
        return folder

    def _choose(self, resume: str | None) -> Path | None:
        from tokentrain.checkpoint.fingerprint import check_resume
        from tokentrain.engines.registry import check_resumable

        folder = resolve_resume(resume, self.root)
        if folder is not None:
            if self.fingerprint is not None:
                check_resume(folder, self.fingerprint, self.ignore)  # a changed run is refused in one line
            check_resumable(folder, self.engine, self.env.world_size)
        return folder

    def restore(self, resume: str | None) -> tuple[Path, dict | None] | None:
        """Resume (`--resume`): the checkpoint `check` chose, loaded into the engine and every
        state; (its folder, this rank's RNG state), or None when there is nothing to resume. The
        caller applies the RNG state (`set_rng_state`) as the very last thing before training
        continues, so nothing in between draws from it."""
        folder = self.check(resume)
        if folder is None:
            return None
        with refused_as_unsafe(folder):
            self.engine.load(folder)
        saved = _parts(torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True))
        for name, part in self.states.items():
            part.load_state_dict(saved.get(name) or {})  # (source_tokens: not in the oldest checkpoints)
        rng = folder / f"rng_rank{self.env.rank}.pt"
        if rng.is_file():
            return folder, torch.load(rng, map_location="cpu", weights_only=True)
        log.warning(
            "%s has no RNG state for rank %d (different world size); RNG streams restart", folder, self.env.rank
        )
        return folder, None

    def due(self, step: int, *, last: bool, stop: bool) -> bool:
        """Whether to checkpoint after step `step`: every `save_steps`, at the end, on preemption."""
        return step % self.every == 0 or last or stop

    def save(self, step: int, config: dict) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.partial"
        try:
            if self.env.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            self.engine.barrier()
            self.engine.save(tmp)
            if faults.at_step("save_enospc_at_step", step, self.env.rank):
                raise OSError(28, os.strerror(28), str(tmp / "optimizer.pt"))
            torch.save(rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
            if self.env.is_main:
                torch.save({name: part.state_dict() for name, part in self.states.items()}, tmp / TRAINER_STATE)
                (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
                if self.fingerprint is not None:
                    from tokentrain.checkpoint.fingerprint import save as save_fingerprint

                    save_fingerprint(tmp, self.fingerprint)
            delay = faults.value("save_sleep")
            if delay:
                time.sleep(float(delay))
            self.engine.barrier()
            if self.env.is_main:
                # The manifest (size + CRC-32 of every file) lets a resume refuse a file that
                # was truncated or corrupted after this point.
                for p in tmp.rglob("*"):  # safetensors writes 0600; checkpoints are shared outputs too
                    with_umask(p, folder=p.is_dir())
                info = {"step": step, "world_size": self.env.world_size, **self.engine_record(), "files": manifest(tmp)}
                (tmp / COMPLETE).write_text(json.dumps(info))
                _fsync_tree(tmp)
        except Exception as e:
            raise self._write_failed(tmp, e) from e
        if self.env.is_main:
            old = None
            if final.exists():  # the same step saved again (a resumed run that re-reached it)
                old = self.root / f".{final.name}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            with atomic_file(self.root / LATEST, "w") as f:
                f.write(final.name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.written = [w for w in self.written if w != final.name] + [final.name]
            self.prune(final)
        self.engine.barrier()
        return final

    def engine_record(self) -> dict:
        """Which engine wrote the checkpoint, in what format: a resume with another engine is
        refused naming it (engines.registry.check_resumable)."""
        e = self.engine
        from tokentrain.engines.specs import SPECS

        record: dict[str, str | int] = {"engine": e.name, "format": SPECS[e.name].checkpoint_format}
        if e.stage is not None:
            record["zero_stage"] = e.stage
        return record

    def _write_failed(self, tmp: Path, e: Exception) -> CheckpointError:
        """Remove the partial folder; a one-line error naming it, the cause and what is still usable."""
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = find_latest(self.root, verify=False)
        need = sum(p.stat().st_size for p in prev.rglob("*") if p.is_file()) if prev else 0
        nospace = disk_full(e, self.root, max(need, 1))  # less left than one checkpoint: full
        free = free_bytes(self.root)
        cause = "no space left on device" if nospace else f"{type(e).__name__}: {e}"
        keep = (
            f"the previous checkpoint {prev} is intact; free space, then resume with --resume auto"
            if prev
            else "no earlier checkpoint exists"
        )
        room = (
            f" ({free / 2**20:.1f} MiB free there" + (f", a checkpoint takes {need / 2**20:.1f} MiB)" if need else ")")
            if free is not None
            else ""
        )
        return CheckpointError(f"cannot write checkpoint {tmp}: {cause}{room}; {keep}")

    def prune(self, just_written: Path) -> None:
        """Keep the `keep` most recent checkpoints: by recency, not step number, so that a run
        resumed from an earlier step never deletes what it has just written (another run's
        higher steps go first), and `latest` (the one just written) always exists."""
        if self.keep < 0:
            return

        def recency(p: Path):
            mine = self.written.index(p.name) if p.name in self.written else -1
            try:
                when = (p / COMPLETE).stat().st_mtime_ns
            except OSError:
                when = 0
            return (mine, when, step_of(p))

        found = sorted(list_checkpoints(self.root), key=recency)
        for old in found[: max(0, len(found) - self.keep)]:
            if old.name == just_written.name:
                continue
            shutil.rmtree(old, ignore_errors=True)
            log.debug("removed old checkpoint %s", old)


def _parts(saved: dict) -> dict:
    """The saved states by name; a checkpoint of an earlier version kept the trainer's counters
    at the top level beside the others."""
    if "trainer" in saved:
        return saved
    parts = ("scheduler", "sampler", "source_tokens")
    return {"trainer": {k: v for k, v in saved.items() if k not in parts}, **{k: saved.get(k) for k in parts}}


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
