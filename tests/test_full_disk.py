"""Full stores, on a small loop-mounted filesystem per store kind, through `pipeline obuilder`:
every way of running out of space ends in one message naming the store and what to run, exit 1
(never SIGBUS); a full store is unhealthy and refuses builds until `prune` frees space."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from obuilder_fixtures import _loop_mount, require
from test_obuilder_cli import obuilder

from pipeline.obuilder.full_store import MIN_FREE_BYTES

# Each kind on a filesystem of its own, 1 GiB (sparse): 1 % of it is less than MIN_FREE_BYTES, so
# the store is full below 100 MiB free; empty, it has far more.
FILESYSTEMS = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
               "overlayfs": ["mkfs.ext4", "-q", "-F"], "rsync": ["mkfs.ext4", "-q", "-F"]}
PACKAGES = {"mkfs.btrfs": "btrfs-progs", "mkfs.xfs": "xfsprogs", "mkfs.ext4": "e2fsprogs"}

# A command that fills the disk and fails for it (dd: "No space left on device"), silently, so
# that only the command's status says what happened.
FILL_AND_FAIL = '((from busybox) (run (shell "dd if=/dev/zero of=/big bs=1M 2>/dev/null")))'
# One that fills the disk and succeeds: then the store itself runs out of space (committing the
# step, recording it in its table).
FILL_AND_SUCCEED = ('((from busybox)\n'
                    ' (run (shell "dd if=/dev/zero of=/big bs=1M 2>/dev/null || true")))')


def small_build(word: str) -> str:
    return f'((from busybox) (run (shell "echo {word} > /{word}")))'


@pytest.fixture(params=sorted(FILESYSTEMS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """`KIND:PATH` of an empty store alone on a small filesystem."""
    kind = request.param
    mkfs = FILESYSTEMS[kind]
    require(mkfs[0], PACKAGES[mkfs[0]])
    for mount in _loop_mount(tmp_path / "fs.img", tmp_path / "mnt", mkfs):
        (mount / "store").mkdir()
        yield f"{kind}:{mount / 'store'}"


def build(store: str, spec: str, busybox_images: Path, tmp_path: Path
          ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "build.spec").write_text(spec)
    (tmp_path / "context").mkdir(exist_ok=True)
    return obuilder("build", "-f", tmp_path / "build.spec", tmp_path / "context",
                    "--store", store, "--image-dir", busybox_images)


def full_message(result: subprocess.CompletedProcess[str], store: str) -> str:
    """The one error line of a command that failed for a full store, checked."""
    # Exactly 1: not SIGBUS (135, or -7 for the signal itself), not a traceback.
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("pipeline obuilder: ")]
    assert len(errors) == 1, result.stderr
    message = errors[0]
    assert f"store {store} " in message
    assert (f"free space with 'pipeline obuilder prune --store {store} --before TIME' "
            f"(deletes the results last used before TIME, ISO 8601) or "
            f"'pipeline obuilder delete ID --store {store}'") in message
    return message


def same_but_numbers(a: str, b: str) -> bool:
    return re.sub(r"\d+", "N", a) == re.sub(r"\d+", "N", b)


def fill_to_the_last_block(store: str) -> None:
    """Fill the store's filesystem from outside the store."""
    root = Path(store.partition(":")[2])
    subprocess.run(["dd", "if=/dev/zero", f"of={root.parent / 'outside'}", "bs=1M"],
                   capture_output=True)
    os.sync()
    assert free_bytes(store) < 2**20


def free_bytes(store: str) -> int:
    stats = os.statvfs(store.partition(":")[2])
    return stats.f_bavail * stats.f_frsize


def test_full_store_messages_then_prune_makes_it_healthy(
    store: str, busybox_images: Path, tmp_path: Path,
) -> None:
    first = build(store, small_build("first"), busybox_images, tmp_path)
    assert first.returncode == 0, first.stderr
    healthy = obuilder("healthcheck", "--store", store)
    assert healthy.returncode == 0 and f"store {store}: ok" in healthy.stdout, healthy.stderr

    # The command fails for lack of space: a failed step, with the hint that the store is full.
    failed = build(store, FILL_AND_FAIL, busybox_images, tmp_path)
    message = full_message(failed, store)
    assert "failed: command exited with status 1; store" in message
    assert f"store {store} is full (" in message
    # Discarding the failed step gave the space back.
    assert obuilder("healthcheck", "--store", store).returncode == 0

    # The step succeeds with the disk full: committing and recording it may fail for lack of
    # space (always on btrfs, which copies on write), or fit in what a filesystem keeps aside.
    # Either way the store is left full.
    succeeded = build(store, FILL_AND_SUCCEED, busybox_images, tmp_path)
    if succeeded.returncode != 0 or store.startswith("btrfs:"):
        full_message(succeeded, store)
        # A result committed but not recorded is removed when the store is next opened.
        assert obuilder("healthcheck", "--store", store).returncode == 0
        # A result leaving less than MIN_FREE_BYTES free.
        filler = free_bytes(store) - MIN_FREE_BYTES // 2
        filled = build(store, f'((from busybox) (run (shell "fallocate -l {filler} /filler")))',
                       busybox_images, tmp_path)
        assert filled.returncode == 0, filled.stderr
    unhealthy = obuilder("healthcheck", "--store", store)
    assert f"store {store} is full (" in full_message(unhealthy, store)
    refused = build(store, small_build("refused"), busybox_images, tmp_path)
    assert same_but_numbers(full_message(refused, store), full_message(unhealthy, store))
    assert refused.stdout == "", "refused before the first step"

    # Full to the last block (where WAL mode died of SIGBUS): still one message, and prune works.
    fill_to_the_last_block(store)
    full_message(obuilder("healthcheck", "--store", store), store)
    usage = obuilder("df", "--store", store)
    assert usage.returncode == 0 and "(0% free)" in usage.stdout, usage.stderr
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    pruned = obuilder("prune", "--store", store, "--before", later)
    assert pruned.returncode == 0 and "results deleted" in pruned.stdout, pruned.stderr
    healthy = obuilder("healthcheck", "--store", store)
    assert healthy.returncode == 0 and f"store {store}: ok" in healthy.stdout, healthy.stderr
    again = build(store, small_build("again"), busybox_images, tmp_path)
    assert again.returncode == 0 and "Got:" in again.stdout, again.stderr


@pytest.mark.parametrize("store", ["btrfs"], indirect=True)
def test_database_left_in_wal_mode_on_a_full_btrfs(store: str, tmp_path: Path) -> None:
    """The SIGBUS of the issue: a database in WAL mode, left with its log by a process that
    died, opened on a full btrfs (where any write to the mapped `-shm` file needs space)."""
    root = Path(store.partition(":")[2])
    (root / "state").mkdir()
    database = root / "state" / "db.sqlite"
    # Exits without closing the database, as a killed process would: the row stays in the WAL.
    subprocess.run([sys.executable, "-c", f"""if True:
        import os, sqlite3
        db = sqlite3.connect({str(database)!r})
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE results (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                   "used REAL NOT NULL, parent TEXT, children INTEGER NOT NULL DEFAULT 0)")
        db.execute("INSERT INTO results VALUES ('kept', 0, 0, NULL, 0)")
        db.commit()
        os._exit(0)"""], check=True)
    assert Path(f"{database}-wal").stat().st_size > 0
    (root / "result" / "kept").mkdir(parents=True)
    fill_to_the_last_block(store)

    for command in ("healthcheck", "df"):
        full_message(obuilder(command, "--store", store), store)

    (root.parent / "outside").unlink()
    # Space freed by a deletion counts once committed.
    subprocess.run(["btrfs", "filesystem", "sync", root], check=True)
    healthy = obuilder("healthcheck", "--store", store)
    assert healthy.returncode == 0, healthy.stderr
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert db.execute("SELECT id FROM results").fetchall() == [("kept",)]
