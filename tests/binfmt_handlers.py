"""binfmt_misc handlers for the emulation tests: fake handler directories (what
`emulation.find_emulator` reads) and real handlers that only the test's own files can trigger.

A real handler is global (one binfmt_misc for the whole machine): registered over qemu's
own magic it would take over every arm64 program of every build running meanwhile. So a test
registers its handler for a magic no other file has: an ELF header whose padding bytes
(`e_ident[9:16]`, zero in every real program, and required to be zero by qemu's own handlers'
masks) hold a random marker. Only files the test marks so run through it; the kernel's and
qemu's ELF loaders ignore those bytes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.obuilder.emulation import BINFMT_DIR

PADDING = slice(9, 16)
"""Where an ELF header's padding bytes are (`e_ident[EI_PAD:]`)."""


def fake_binfmt_dir(directory: Path, handlers: dict[str, str], *, status: str = "enabled"
                    ) -> Path:
    """A directory laid out as binfmt_misc: `status`, and one file per handler name whose text
    is given (as the kernel shows a handler: `enabled`, `interpreter PATH`, `flags: ...`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "status").write_text(status + "\n")
    for name, text in handlers.items():
        (directory / name).write_text(text)
    return directory


def handler_text(interpreter: str, flags: str, *, enabled: bool = True) -> str:
    """A handler's file as the kernel shows it."""
    return (f"{'enabled' if enabled else 'disabled'}\ninterpreter {interpreter}\n"
            f"flags: {flags}\noffset 0\nmagic 7f454c46\n")


def new_marker() -> bytes:
    """Seven random bytes for an ELF header's padding (never all zero)."""
    return b"\x01" + os.urandom(6)


def marked(header: bytes, marker: bytes) -> bytes:
    """The first 20 bytes of an ELF header (identification, type, machine) with `marker` in
    its padding: the magic of a handler that only marked files match."""
    magic = bytearray(header[:20])
    magic[PADDING] = marker
    return bytes(magic)


# Every byte counts but the lowest bit of `e_type`: executables (2) and PIEs (3) alike, as in
# qemu's own handlers.
MASK = bytes([0xff] * 16 + [0xfe] + [0xff] * 3)


@contextmanager
def registered_handler(magic: bytes, interpreter: str) -> Iterator[str]:
    """A real binfmt_misc handler with the flags `P` (the program's argv[0] is preserved, as
    Debian's qemu interpreters expect) but not `F` (the kernel opens `interpreter` at its path in
    the program's root), matching files that begin with the 20 bytes `magic` (an ELF header's,
    see `marked`), for the block; its name."""
    name = f"pipeline-test-{uuid.uuid4().hex[:12]}"

    def escaped(data: bytes) -> str:
        return "".join(f"\\x{byte:02x}" for byte in data)

    (BINFMT_DIR / "register").write_text(
        f":{name}:M:0:{escaped(magic)}:{escaped(MASK)}:{interpreter}:P")
    try:
        yield name
    finally:
        (BINFMT_DIR / name).write_text("-1")
