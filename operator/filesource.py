"""Manifests from files, with the last good version of each object kept through bad edits.

An object is known by its kind, namespace and name. When a reload finds a document
for an object that no longer validates (or a file that no longer parses), the object's
last good version keeps serving and the error is reported; everything else is taken as
edited. An object whose document is gone from files that still parse is deleted.

The same kind, namespace and name in two documents is refused, as `kanal validate`
refuses it: the copy that served before keeps serving (or, for an object new to this
reload, the first in reading order), and each other copy is reported with both files.
A Secret whose certificate and key do not load together (or whose `ca.crt` does not
load) is invalid like any other object, so its last good version keeps serving.
Descriptor set files that Routes name (`descriptorFile`) are read on every reload;
a change to one in a watched folder is a reason to reload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kanal.contract.snapshot import Snapshot
from kanal.operator import descriptorfiles, manifests
from kanal.operator.compiler import CompileResult, compile_snapshot
from kanal.operator.models import Secret

ObjectKey = tuple[str, str, str]


@dataclass
class ReloadResult:
    snapshot: Snapshot | None
    errors: list[str] = field(default_factory=list)
    compiled: CompileResult | None = None
    kept: list[ObjectKey] = field(default_factory=list)


def _identity(raw: Any) -> ObjectKey | None:
    """kind, namespace and name of a raw document, if it says them."""
    if not isinstance(raw, dict):
        return None
    metadata = raw.get("metadata")
    kind = raw.get("kind")
    if not isinstance(metadata, dict) or not isinstance(kind, str):
        return None
    name = metadata.get("name")
    namespace = metadata.get("namespace") or "default"
    if not isinstance(name, str) or not isinstance(namespace, str):
        return None
    return (kind, namespace, name)


class FileSource:
    """Reads the given files and folders; remembers the last good version of each object."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(path) for path in paths]
        self.last_good: dict[ObjectKey, tuple[Any, str]] = {}
        self.descriptor_files: set[Path] = set()  # named by Routes at the last reload

    def watch_roots(self) -> list[Path]:
        """Folders to watch: the folders given, and the folders of the files given.

        Watching a file's folder, not the file, survives editors that save by renaming.
        """
        roots: list[Path] = []
        for path in self.paths:
            root = path if path.is_dir() else path.parent
            if root not in roots:
                roots.append(root)
        return roots

    def is_relevant(self, changed: str) -> bool:
        path = Path(changed)
        if path.resolve() in self.descriptor_files:
            return True  # a Route's descriptor set file, in a watched folder
        for given in self.paths:
            if given.is_dir():
                if path.suffix in (".yaml", ".yml") and _inside(path, given):
                    return True
            elif path.resolve() == given.resolve() or path.name == given.name:
                return True
        return False

    def reload(self) -> ReloadResult:
        documents, load_errors = manifests.load_documents([str(path) for path in self.paths])
        errors = [str(error) for error in load_errors]
        broken_files = {error.source.path for error in load_errors if error.source is not None}
        # Every valid document of each object, in reading order; and the objects with an
        # invalid document (their last good version keeps serving, unless a valid copy is found).
        found: dict[ObjectKey, list[tuple[Any, manifests.Source]]] = {}
        invalid: dict[ObjectKey, manifests.Source] = {}
        for document in documents:
            parsed = manifests.parse_document(document)
            if isinstance(parsed, Secret):
                problems = manifests.secret_problems(document, parsed)
                if problems:
                    parsed = problems
            if isinstance(parsed, list):
                errors.extend(str(error) for error in parsed)
                identity = _identity(document.body)
                if identity is not None:
                    invalid.setdefault(identity, document.source)
                continue
            if parsed is None:
                continue
            identity = (str(parsed.kind), parsed.metadata.namespace, parsed.metadata.name)
            found.setdefault(identity, []).append((parsed, document.source))
        current: dict[ObjectKey, tuple[Any, str]] = {}
        kept: list[ObjectKey] = []
        for identity, candidates in found.items():
            served = self.last_good.get(identity)
            if served is not None and served[1] in broken_files:
                # Its file does not parse now: it keeps serving, and copies elsewhere are
                # duplicates of it.
                first: manifests.Source | str = served[1]
                current[identity] = served
                kept.append(identity)
                refused = [source for _, source in candidates]
            else:
                chosen = self._choose(identity, candidates)
                resource, first = candidates[chosen]
                current[identity] = (resource, first.path)
                refused = [source for i, (_, source) in enumerate(candidates) if i != chosen]
            for other in refused:
                errors.append(
                    f"{other} ({_subject(identity)}): refused: a duplicate of {first}, "
                    f"the same kind, namespace and name; the one in {current[identity][1]} "
                    f"keeps serving"
                )
        for identity, source in invalid.items():
            if identity in current or identity not in self.last_good:
                continue
            current[identity] = self.last_good[identity]
            kept.append(identity)
            errors.append(f"{source}: keeping the last good version of {_subject(identity)}")
        # Objects from files that failed to load as a whole keep their last good version.
        for key, (resource, file) in self.last_good.items():
            if key not in current and file in broken_files:
                current[key] = (resource, file)
                kept.append(key)
        resources: list[Any] = []
        files: dict[str, bytes | str] = {}
        for resource, path in current.values():
            resource, read = descriptorfiles.resolve(resource, path)
            resources.append(resource)
            files.update(read)
        self.descriptor_files = {Path(path) for path in files}
        result = compile_snapshot(resources, descriptor_files=files)
        compile_errors = [
            f"{current[key][1]}: {message}" if key in current else message
            for key, message in _rejections(result)
        ]
        errors.extend(compile_errors)
        self.last_good = current
        return ReloadResult(snapshot=result.snapshot, errors=errors, compiled=result, kept=kept)

    def _choose(self, identity: ObjectKey, candidates: list[tuple[Any, manifests.Source]]) -> int:
        """Which of an object's documents serves: the file that served it before, else
        the first in reading order (as `kanal validate` keeps the first and calls the
        others errors)."""
        if len(candidates) > 1 and identity in self.last_good:
            served_from = self.last_good[identity][1]
            for position, (_, source) in enumerate(candidates):
                if source.path == served_from:
                    return position
        return 0


def _subject(identity: ObjectKey) -> str:
    return f"{identity[0]} {identity[1]}/{identity[2]}"


def _rejections(result: CompileResult) -> list[tuple[ObjectKey, str]]:
    """Objects the compiler did not accept, or whose references do not resolve."""
    found: list[tuple[ObjectKey, str]] = []
    for status in result.statuses:
        for condition in status.conditions:
            if condition.status == "False":
                key = (status.kind, status.namespace, status.name)
                found.append(
                    (key, f"{status.kind} {status.namespace}/{status.name}: "
                          f"{condition.type} False ({condition.reason}): {condition.message}")
                )
    return found


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
