"""Writes that leave either the complete result or nothing: build beside, then rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def new_file(path, suffix: str = "", prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory to write; when the block ends normally it
    replaces ``path`` (mode 644), on any error it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(os.fspath(path)) or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def new_directory(target, prefix: str = ".saving-") -> Iterator[str]:
    """Yield a temporary directory beside ``target`` to fill; when the block ends normally it
    becomes ``target`` (an existing ``target`` is moved aside first, then deleted), on any
    error it is removed. The parent directory must exist."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.rename(target, os.path.join(old, "x"))
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move(src, dst) -> None:
    """One rename on one file system (atomic); the single place ``OwnedSave`` moves files."""
    os.replace(src, dst)


MANIFEST_FORMAT = "npu-gemma3 save manifest"
JOURNAL_FORMAT = "npu-gemma3 save in progress"


class OwnedSave:
    """Save a set of files into a directory that may hold other files, as transformers'
    ``save_pretrained`` does: the directory (and its parents) is made if needed, files of
    ours from an earlier save are replaced, every other file is left untouched, and a file we
    must write that exists and is not ours is refused.

        with OwnedSave(directory, "manifest.json") as save:
            write the files under save.path (relative paths as in ``directory``)
            save.check(also=[names written later])   # optional: refuse early, before big writes

    Ownership: ``manifest`` (written by every save, last) lists each file the save wrote, by
    path relative to ``directory``, with its size and SHA-256. A file is ours when a manifest
    of ours lists it with the hash it still has: a file someone changed after our save is no
    longer ours. A manifest (or journal) that is not ours makes its own name a collision.

    Steps (after each, the directory holds the earlier save or the new one, complete):
      1. stage: the caller writes every file under ``path``, a hidden directory inside
         ``directory`` (so that each later move is one rename on one file system). An error
         removes it, and the directories this save made: nothing changed.
      2. check: every file to write, the manifest and the journal must be absent or ours,
         else ``FileExistsError`` naming them, and nothing changed.
      3. commit: the journal ``<manifest>.pending`` is written (every file either save owns);
         each file is renamed into place, the one it replaces moved aside first; files of the
         earlier save that this one does not write are moved aside; the new manifest goes in
         last; the journal is removed, then what was moved aside. An error during the commit
         moves every file back: the earlier save as it was. A process killed during the commit
         leaves the journal: ``check_complete`` (run by every load) refuses the directory, a mix
         of two saves, and the next save owns the files of both.
    """

    def __init__(self, directory, manifest: str):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manifest, self.journal = manifest, manifest + ".pending"
        self._verdicts: dict[str, bool] = {}

    # ------------------------------------------------------------------ staging

    def __enter__(self) -> OwnedSave:
        d = self.directory
        if os.path.exists(d) and not os.path.isdir(d):
            raise NotADirectoryError(f"save directory {d} is an existing file, not a directory")
        missing, up = [], d
        while not os.path.exists(up):
            missing.append(up)
            up = os.path.dirname(up)
        if not os.path.isdir(up):
            raise NotADirectoryError(f"save directory {d}: {up} is an existing file, not a directory")
        self.made = []
        try:
            for m in reversed(missing):
                os.mkdir(m)
                self.made.append(m)
            self.owned, self.foreign_records = self._read_records()
            self.work = tempfile.mkdtemp(prefix=".npu-saving-", dir=d)
        except BaseException:
            self._remove_made()
            raise
        self.path = os.path.join(self.work, "new")
        self.aside = os.path.join(self.work, "old")
        os.mkdir(self.path)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abandon()
            return False
        try:
            self.check()
            self._commit()
        except BaseException:
            self._abandon()
            raise
        return False

    def _abandon(self):
        shutil.rmtree(self.work, ignore_errors=True)
        self._remove_made()

    def _remove_made(self):
        for m in reversed(self.made):
            try:
                os.rmdir(m)
            except OSError:
                break

    # ------------------------------------------------------------------ ownership

    def _read_records(self) -> tuple[dict[str, set[str]], list[str]]:
        """Path -> the SHA-256 values of it that are ours (from the manifest and a journal an
        interrupted save left); and the names of a manifest or journal that is not ours."""
        owned: dict[str, set[str]] = {}
        foreign = []
        self.leftover_work = None
        for name, fmt in ((self.manifest, MANIFEST_FORMAT), (self.journal, JOURNAL_FORMAT)):
            path = os.path.join(self.directory, name)
            if not os.path.lexists(path):
                continue
            doc = _read_record(path, fmt)
            if doc is None:
                foreign.append(name)
                continue
            for rel, entry in doc["files"].items():
                hashes = entry["sha256"] if isinstance(entry["sha256"], list) else [entry["sha256"]]
                owned.setdefault(rel, set()).update(hashes)
            if fmt == JOURNAL_FORMAT and isinstance(doc.get("staging"), str):
                self.leftover_work = os.path.join(self.directory, os.path.basename(doc["staging"]))
        return owned, foreign

    def _is_ours_or_absent(self, rel: str) -> bool:
        path = os.path.join(self.directory, rel)
        if not os.path.lexists(path):
            return True
        if rel not in self._verdicts:
            self._verdicts[rel] = (
                rel in self.owned
                and os.path.isfile(path)
                and not os.path.islink(path)
                and sha256_of(path) in self.owned[rel]
            )
        return self._verdicts[rel]

    def staged(self) -> list[str]:
        """Paths (relative, '/'-separated) of the files staged so far."""
        out = []
        for root, _, files in os.walk(self.path):
            rel_root = os.path.relpath(root, self.path)
            for f in files:
                out.append(f if rel_root == "." else f"{rel_root.replace(os.sep, '/')}/{f}")
        return sorted(out)

    def check(self, also=()) -> None:
        """Refuse (``FileExistsError``, nothing changed) when a staged file, one of ``also``, or
        the manifest or journal exists in the directory and is not ours."""
        names = sorted({*self.staged(), *also})
        collisions = [n for n in names if not self._is_ours_or_absent(n)] + self.foreign_records
        for rel in names:  # a parent that is a file where our directory must go
            parts = rel.split("/")[:-1]
            for i in range(len(parts)):
                p = os.path.join(self.directory, *parts[: i + 1])
                if os.path.lexists(p) and not os.path.isdir(p):
                    collisions.append("/".join(parts[: i + 1]))
        if collisions:
            raise FileExistsError(
                f"{self.directory}: will not overwrite {sorted(set(collisions))}: they exist and an earlier "
                f"save_pretrained did not write them (or they changed since; {self.manifest} lists what a "
                "save wrote); save into another directory, or remove them"
            )

    # ------------------------------------------------------------------ commit

    def _commit(self) -> None:
        d = self.directory
        new = {rel: _entry(os.path.join(self.path, rel)) for rel in self.staged()}
        stale = [
            rel
            for rel in self.owned
            if rel not in new and rel not in (self.manifest, self.journal) and self._ours_to_remove(rel)
        ]
        owned = {rel: sorted(h) for rel, h in self.owned.items()}
        for rel, entry in new.items():
            owned[rel] = sorted({*owned.get(rel, ()), entry["sha256"]})
        with new_file(os.path.join(d, self.journal), suffix=".json") as tmp, open(tmp, "w") as f:
            json.dump(
                {
                    "format": JOURNAL_FORMAT,
                    "staging": os.path.basename(self.work),
                    "files": {rel: {"sha256": h} for rel, h in sorted(owned.items())},
                },
                f,
                indent=2,
            )
        manifest = os.path.join(self.work, "manifest.json")
        with open(manifest, "w") as f:
            json.dump({"format": MANIFEST_FORMAT, "files": new}, f, indent=2)
        moves: list[tuple[str, str]] = []  # (from, to), in the order done
        made: list[str] = []
        try:
            for rel in [*new, *stale, self.manifest]:
                dest = os.path.join(d, *rel.split("/"))
                if os.path.lexists(dest):
                    backup = os.path.join(self.aside, *rel.split("/"))
                    os.makedirs(os.path.dirname(backup), exist_ok=True)
                    _move(dest, backup)
                    moves.append((dest, backup))
                if rel in stale:
                    continue
                src = manifest if rel == self.manifest else os.path.join(self.path, *rel.split("/"))
                parent = os.path.dirname(dest)
                if not os.path.isdir(parent):
                    os.makedirs(parent)
                    made.append(parent)
                _move(src, dest)
                moves.append((src, dest))
        except BaseException:
            self._rollback(moves, made)
            raise
        os.unlink(os.path.join(d, self.journal))
        shutil.rmtree(self.work, ignore_errors=True)
        if self.leftover_work and os.path.basename(self.leftover_work).startswith(".npu-saving-"):
            shutil.rmtree(self.leftover_work, ignore_errors=True)  # an interrupted save's staging

    def _ours_to_remove(self, rel: str) -> bool:
        path = os.path.join(self.directory, rel)
        return os.path.lexists(path) and self._is_ours_or_absent(rel)

    def _rollback(self, moves, made) -> None:
        """Undo the commit's moves, newest first: the earlier save back in place."""
        for src, dst in reversed(moves):
            _move(dst, src)
        for m in reversed(made):
            try:
                os.rmdir(m)
            except OSError:
                pass
        os.unlink(os.path.join(self.directory, self.journal))


def _entry(path) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}


def _read_record(path, fmt) -> dict | None:
    """A manifest or journal of ours (``format`` is ``fmt``, ``files`` maps paths to entries
    with a ``sha256``), or None."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != fmt or not isinstance(doc.get("files"), dict):
        return None
    files = doc["files"]
    if not all(isinstance(e, dict) and "sha256" in e for e in files.values()):
        return None
    return doc


def check_complete(directory, manifest: str) -> None:
    """Refuse a directory an interrupted ``OwnedSave`` left mid-commit (its journal is there):
    its files may be a mix of two saves."""
    journal = os.path.join(os.fspath(directory), manifest + ".pending")
    if os.path.exists(journal):
        raise ValueError(
            f"{directory}: a save_pretrained into it was interrupted while moving its files into place "
            f"({os.path.basename(journal)} is still there), so its files may be a mix of two saves; "
            "save the model into it again"
        )
