"""Descriptor set files named by Routes (`grpcTranscoder.descriptorFile`), for `kanal run`
and `kanal validate`: the file-side I/O the compiler leaves out.

A relative path is taken from the folder of the manifest that names it, as a path in a
compose file is; the Route is given back with the path made absolute, and the compiler
is handed every file's bytes by that path (`compile_snapshot(descriptor_files=...)`),
or why the file could not be read.
"""

from __future__ import annotations

from pathlib import Path

from kanal.operator.models import Resource, Route

MAX_DESCRIPTOR_FILE = 16 * 1024 * 1024
"""Bytes of a descriptor set file read; a larger one is refused."""


def resolve(resource: Resource, manifest_path: str) -> tuple[Resource, dict[str, bytes | str]]:
    """`resource` with its descriptor file paths absolute, and what each file holds (its
    bytes, or why it cannot be read). Anything but such a Route comes back as it is."""
    if not isinstance(resource, Route):
        return resource, {}
    files: dict[str, bytes | str] = {}
    rules = list(resource.spec.rules)
    for position, rule in enumerate(rules):
        settings = rule.grpc_transcoder
        if settings is None or settings.descriptor_file is None:
            continue
        path = str((Path(manifest_path).parent / Path(settings.descriptor_file).expanduser())
                   .resolve())
        files[path] = read(path)
        rules[position] = rule.model_copy(update={
            "grpc_transcoder": settings.model_copy(update={"descriptor_file": path})})
    if not files:
        return resource, {}
    spec = resource.spec.model_copy(update={"rules": rules})
    return resource.model_copy(update={"spec": spec}), files


def read(path: str) -> bytes | str:
    """A descriptor set file's bytes, or why it cannot be read."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_DESCRIPTOR_FILE + 1)
    except OSError as exc:
        return exc.strerror or str(exc)
    if len(data) > MAX_DESCRIPTOR_FILE:
        return f"larger than {MAX_DESCRIPTOR_FILE} bytes"
    return data
