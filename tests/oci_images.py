"""OCI image layouts written by hand for the registry tests (then pushed with skopeo).

`OciLayout(dir)` holds blobs and `index.json`; `layer(...)` makes a layer tarball from
`(TarInfo, data)` pairs or a directory; `add_image` writes a config and a manifest; `add_index`
a multi-platform index; `tag` names a manifest or index in `index.json`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}

Entry = tuple[tarfile.TarInfo, bytes]


def member(name: str, type: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    """A tar header for `name`; `fields` set TarInfo attributes (mode, uid, linkname...)."""
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = 0o755 if type == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def file(name: str, data: bytes, **fields: object) -> Entry:
    return member(name, **fields), data


def directory(name: str, **fields: object) -> Entry:
    return member(name, tarfile.DIRTYPE, **fields), b""


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_directory(root: Path) -> bytes:
    """A tarball of everything under `root`, as a layer holds it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
    return buffer.getvalue()


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


class OciLayout:
    """An OCI image layout directory being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                      "manifests": []}
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Store `data`; its descriptor."""
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def add_image(self, layers: Sequence[tuple[bytes, str]], *,
                  env: Sequence[str] = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",),
                  architecture: str = "amd64") -> dict[str, Any]:
        """Write the layers (uncompressed tar, compression), a config and a manifest; the
        manifest's descriptor."""
        descriptors = [self.blob(compress(tar, c), LAYER_TYPES[c]) for tar, c in layers]
        config = {
            "architecture": architecture, "os": "linux",
            "config": {"Env": list(env), "WorkingDir": "/nowhere", "User": "nobody"},
            "rootfs": {"type": "layers",
                       "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t, _ in layers]},
        }
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": self.blob(json.dumps(config).encode(), OCI_CONFIG),
                    "layers": descriptors}
        return self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)

    def add_index(self, manifests: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """An index of the manifests by platform ("os/arch[/variant]"); its descriptor."""
        entries = []
        for platform, descriptor in manifests.items():
            os, architecture, *variant = platform.split("/")
            entry = {"os": os, "architecture": architecture}
            if variant:
                entry["variant"] = variant[0]
            entries.append({**descriptor, "platform": entry})
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return self.blob(json.dumps(index).encode(), OCI_INDEX)

    def tag(self, descriptor: dict[str, Any], name: str) -> None:
        """Name `descriptor` `name` in index.json (skopeo's `oci:DIR:name`), replacing an
        earlier image of that name."""
        self.index["manifests"] = [m for m in self.index["manifests"]
                                   if m["annotations"]["org.opencontainers.image.ref.name"] != name]
        self.index["manifests"].append(
            {**descriptor, "annotations": {"org.opencontainers.image.ref.name": name}})
        self._write_index()

    def _write_index(self) -> None:
        (self.path / "index.json").write_text(json.dumps(self.index))
