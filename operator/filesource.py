"""Manifests from files, with the last good version of each object kept through bad edits.

An object is known by its kind, namespace and name. When a reload finds a document
for an object that no longer validates (or a file that no longer parses), the object's
last good version keeps serving and the error is reported; everything else is taken as
edited. An object whose document is gone from files that still parse is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kanal.contract.snapshot import Snapshot
from kanal.operator import manifests
from kanal.operator.compiler import CompileResult, compile_snapshot

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
        current: dict[ObjectKey, tuple[Any, str]] = {}
        kept: list[ObjectKey] = []
        for document in documents:
            parsed = manifests.parse_document(document)
            identity = _identity(document.body)
            if isinstance(parsed, list):
                errors.extend(str(error) for error in parsed)
                if identity is not None and identity in self.last_good:
                    current[identity] = self.last_good[identity]
                    kept.append(identity)
                    errors.append(
                        f"{document.source}: keeping the last good version of "
                        f"{identity[0]} {identity[1]}/{identity[2]}"
                    )
                continue
            if parsed is None:
                continue
            identity = (str(parsed.kind), parsed.metadata.namespace, parsed.metadata.name)
            current[identity] = (parsed, document.source.path)
        # Objects from files that failed to load as a whole keep their last good version.
        for key, (resource, file) in self.last_good.items():
            if key not in current and file in broken_files:
                current[key] = (resource, file)
                kept.append(key)
        resources = [resource for resource, _ in current.values()]
        result = compile_snapshot(resources)
        compile_errors = [
            f"{current[key][1]}: {message}" if key in current else message
            for key, message in _rejections(result)
        ]
        errors.extend(compile_errors)
        self.last_good = current
        return ReloadResult(snapshot=result.snapshot, errors=errors, compiled=result, kept=kept)


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
