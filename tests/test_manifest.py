"""The `copy` manifest: its rules, exact errors, digest, and how it writes into a rootfs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.obuilder.manifest import Dir, File, Symlink, manifest
from pipeline.obuilder.protocols import BuildError


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "src" / "lib" / "_build").mkdir(parents=True)
    (ctx / "src" / "main.ml").write_text("let () = ()\n")
    (ctx / "src" / "lib" / "a.ml").write_text("let a = 1\n")
    (ctx / "src" / "lib" / "_build" / "junk").write_text("junk\n")
    (ctx / "src" / "_build").mkdir()
    (ctx / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (ctx / "run.sh").chmod(0o755)
    (ctx / "README").write_text("readme\n")
    (ctx / "link").symlink_to("src")
    (ctx / "dangling").symlink_to("/nowhere")
    return ctx


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "home" / "opam").mkdir(parents=True)
    return root


def test_lists_files_symlinks_and_sorted_directories_after_excludes(context: Path) -> None:
    plan = manifest(context, ["src", "run.sh", "dangling"], "/app/", exclude=["_build"])
    main_hash = hashlib.sha256(b"let () = ()\n").hexdigest()
    a_hash = hashlib.sha256(b"let a = 1\n").hexdigest()
    run_hash = hashlib.sha256(b"#!/bin/sh\necho hi\n").hexdigest()
    assert plan.sources == (
        Dir("src", (Dir("src/lib", (File("src/lib/a.ml", a_hash, False),)),
                    File("src/main.ml", main_hash, False))),
        File("run.sh", run_hash, True),
        Symlink("dangling", "/nowhere"),
    )
    assert plan.targets == ("/app/src", "/app/run.sh", "/app/dangling")


def test_single_source_is_renamed_and_relative_dst_joins_workdir(context: Path) -> None:
    assert manifest(context, ["README"], "doc.txt", workdir="/home/opam").targets == (
        "/home/opam/doc.txt",)
    assert manifest(context, ["./src//main.ml"], "x/", workdir="/w").targets == (
        "/w/x/main.ml",)
    whole = manifest(context, ["."], "/app/", exclude=["_build", "link", "dangling"])
    assert whole.targets == ("/app",)
    assert [e.path for e in whole.sources[0].entries] == ["README", "run.sh", "src"]


@pytest.mark.parametrize(("src", "message"), [
    ("src/../README", 'copy: source "src/../README" contains ".."'),
    ("..", 'copy: source ".." contains ".."'),
    ("link/main.ml", 'copy: source "link/main.ml" passes through the symlink "link"'),
    ("nope/file", 'copy: source "nope/file" not found'),
    ("README/x", 'copy: source "README/x" not found'),
    ("missing", 'copy: source "missing" not found'),
])
def test_source_rules_have_exact_errors(context: Path, src: str, message: str) -> None:
    with pytest.raises(BuildError) as info:
        manifest(context, [src], "/dst/")
    assert str(info.value) == message


def test_several_sources_need_a_directory_destination(context: Path) -> None:
    with pytest.raises(BuildError) as info:
        manifest(context, ["README", "run.sh"], "/app")
    assert str(info.value) == 'copy: 2 sources need a destination ending in "/", not "/app"'


def test_special_files_are_refused(context: Path) -> None:
    os.mkfifo(context / "src" / "pipe")
    with pytest.raises(BuildError) as info:
        manifest(context, ["src"], "/app/")
    assert str(info.value) == 'copy: "src/pipe" is not a file, directory or symlink'


def test_digest_follows_content_mode_links_and_destination(context: Path) -> None:
    def digest(dst: str = "/app/") -> str:
        return manifest(context, ["src", "run.sh", "link"], dst, exclude=["_build"]).digest()

    first = digest()
    assert digest() == first
    (context / "src" / "lib" / "_build" / "junk").write_text("changed, but excluded\n")
    assert digest() == first
    assert digest("/opt/") != first
    (context / "src" / "lib" / "a.ml").write_text("let a = 2\n")
    second = digest()
    assert second != first
    (context / "run.sh").chmod(0o644)
    third = digest()
    assert third != second
    (context / "link").unlink()
    (context / "link").symlink_to("src/lib")
    assert digest() != third
    (context / "src" / "new").mkdir()
    assert digest() != third


def test_write_places_sources_owned_by_the_user(context: Path, rootfs: Path) -> None:
    plan = manifest(context, ["src", "run.sh", "link"], "/home/opam/app/", exclude=["_build"])
    plan.write(rootfs, 1000, 1001)
    app = rootfs / "home" / "opam" / "app"
    assert (app / "src" / "main.ml").read_text() == "let () = ()\n"
    assert (app / "src" / "lib" / "a.ml").read_text() == "let a = 1\n"
    assert not (app / "src" / "_build").exists()
    assert not (app / "src" / "lib" / "_build").exists()
    assert os.readlink(app / "link") == "src"
    assert (app / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (app / "src" / "main.ml").stat().st_mode & 0o777 == 0o644
    for path in (app, app / "src", app / "src" / "lib", app / "src" / "main.ml", app / "run.sh"):
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (1000, 1001), path
    assert (os.lstat(app / "link").st_uid, os.lstat(app / "link").st_gid) == (1000, 1001)
    # An existing directory on the way keeps its owner.
    assert (rootfs / "home" / "opam").stat().st_uid == 0


def test_write_renames_a_single_source(context: Path, rootfs: Path) -> None:
    manifest(context, ["src/lib"], "lib2", workdir="/w", exclude=["_build"]).write(rootfs, 0, 0)
    assert sorted(os.listdir(rootfs / "w" / "lib2")) == ["a.ml"]
    manifest(context, ["README"], "/etc/motd").write(rootfs, 0, 0)
    assert (rootfs / "etc" / "motd").read_text() == "readme\n"


def test_write_replaces_files_and_links_but_not_directories(context: Path, rootfs: Path) -> None:
    (rootfs / "etc" / "motd").symlink_to("/etc/shadow")
    manifest(context, ["README"], "/etc/motd").write(rootfs, 0, 0)
    assert not (rootfs / "etc" / "motd").is_symlink()
    assert (rootfs / "etc" / "motd").read_text() == "readme\n"
    with pytest.raises(BuildError) as info:
        manifest(context, ["README"], "/home").write(rootfs, 0, 0)
    assert str(info.value) == 'copy: cannot replace the directory "/home" with a file'
    with pytest.raises(BuildError) as info:
        manifest(context, ["README"], "/etc/motd/x").write(rootfs, 0, 0)
    assert str(info.value) == 'copy: "/etc/motd" in the rootfs is not a directory'


def test_write_resolves_symlinks_inside_the_rootfs(context: Path, rootfs: Path,
                                                   tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # Absolute and climbing links in the rootfs must lead into it, never to the host's paths.
    (rootfs / "opt").symlink_to(str(outside))
    (rootfs / "up").symlink_to("../../../../../../..")
    manifest(context, ["README"], "/opt/").write(rootfs, 0, 0)
    manifest(context, ["run.sh"], "/up/bin/").write(rootfs, 0, 0)
    assert os.listdir(outside) == []
    assert (rootfs / str(outside).lstrip("/") / "README").read_text() == "readme\n"
    assert (rootfs / "bin" / "run.sh").exists()


def test_write_refuses_a_file_changed_since_hashing(context: Path, rootfs: Path) -> None:
    plan = manifest(context, ["README"], "/README")
    (context / "README").write_text("tampered\n")
    with pytest.raises(BuildError) as info:
        plan.write(rootfs, 0, 0)
    assert str(info.value) == 'copy: "README" changed during the build'
