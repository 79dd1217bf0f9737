"""Images must not reach the host: extraction stays inside the rootfs (directory attributes,
whiteouts, hard links), a broken image is one clear error, and no other host user can reach
what an image put in the store (setuid binaries, device nodes).

Images are real tarballs made here; the end-to-end cases run `pipeline obuilder build
--image-dir` as a process, and the other-user checks run real commands as `nobody`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from obuilder_fixtures import STORE_FILESYSTEMS, new_store_root
from oci_images import directory, file, member, tar_bytes
from test_obuilder_cli import GOT, obuilder

from pipeline.obuilder import confined
from pipeline.obuilder.fetchers import unpack
from pipeline.obuilder.protocols import BuildError

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
LAYOUT = ["result", "result-tmp", "cache", "cache-tmp", "state"]
OVERLAYFS_LAYOUT = ["layer", "layer-tmp", "view"]


def symlink(name: str, target: str | Path) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.SYMTYPE, linkname=str(target)), b""


def hard_link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.LNKTYPE, linkname=target), b""


def extract(rootfs: Path, entries: list, *, layer: bool = False) -> None:
    """Extract a tarball of `entries` into `rootfs` (made if missing) as a stream, as the
    registry fetcher reads layers."""
    rootfs.mkdir(exist_ok=True)
    path = rootfs.parent / "image.tar"
    path.write_bytes(tar_bytes(entries))
    with tarfile.open(path, mode="r|") as tar:
        unpack.extract(tar, rootfs, layer=layer)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host directory (standing in for /etc) that images try to change."""
    path = tmp_path / "victim"
    (path / "sub").mkdir(parents=True)
    for d in (path, path / "sub"):
        os.chmod(d, 0o750)
        os.utime(d, (1_000_000_000, 1_000_000_000))
    return path


def attributes(path: Path) -> tuple[int, int, int, int]:
    st = path.lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns


def evil_directory(victim: Path) -> list:
    """A directory (0777, owner 4242, mtime 0) that later becomes a symlink to `victim`, and one
    under a directory that does."""
    attrs = {"mode": 0o777, "uid": 4242, "gid": 4242, "mtime": 0}
    return [directory("d", **attrs), symlink("d", victim),
            directory("p", **attrs), directory("p/sub", **attrs), symlink("p", victim)]


# --- (a) directory attributes never go through a symlink ---------------------------------------


@pytest.mark.parametrize("layer", [False, True])
def test_a_directory_replaced_by_a_symlink_leaves_the_host_directory_alone(
        tmp_path: Path, victim: Path, layer: bool) -> None:
    before = {p: attributes(p) for p in (victim, victim / "sub")}
    extract(tmp_path / "rootfs", evil_directory(victim), layer=layer)
    assert {p: attributes(p) for p in before} == before
    assert os.readlink(tmp_path / "rootfs" / "d") == str(victim)


def test_directory_attributes_are_applied_after_the_members_inside(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    extract(rootfs, [directory("ro", mode=0o555, uid=7, gid=8, mtime=1234),
                     file("ro/f", b"x"), directory("ro/sub", mode=0o700, mtime=99)])
    assert attributes(rootfs / "ro") == (0o555, 7, 8, 1234 * 10**9)
    assert attributes(rootfs / "ro" / "sub")[::3] == (0o700, 99 * 10**9)


def test_an_opaque_directory_under_a_lower_layers_symlink_is_refused(
        tmp_path: Path, victim: Path) -> None:
    rootfs = tmp_path / "rootfs"
    extract(rootfs, [symlink("l", victim)], layer=True)
    with pytest.raises(BuildError) as info:
        extract(rootfs, [file("l/.wh..wh..opq", b"")], layer=True)
    assert str(info.value) == "image member 'l/.wh..wh..opq' passes through the symlink /l"
    assert (victim / "sub").is_dir()


# --- (c) broken images are one clear error -----------------------------------------------------


@pytest.mark.parametrize("layer", [False, True])
def test_a_hard_link_to_a_name_not_in_the_image_is_a_clear_error(
        tmp_path: Path, layer: bool) -> None:
    with pytest.raises(BuildError) as info:
        extract(tmp_path / "rootfs", [directory("etc"), hard_link("x", "etc/shadow")],
                layer=layer)
    assert str(info.value) == ("image member 'x' is a hard link to 'etc/shadow', which is not "
                               "in the image")


def test_a_hard_link_to_a_lower_layers_file_links_it(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    extract(rootfs, [directory("etc"), file("etc/passwd", b"root\n")], layer=True)
    extract(rootfs, [hard_link("bin/passwd", "/etc/passwd")], layer=True)
    assert (rootfs / "bin" / "passwd").stat().st_ino == (rootfs / "etc" / "passwd").stat().st_ino


def test_a_member_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        extract(tmp_path / "rootfs", [file("f", b""), file("f/x", b"")])
    assert str(info.value) == "image member 'f/x' is under /f, which is not a directory"


# --- The confined walk ---------------------------------------------------------------------------


def test_open_dir_walks_without_following_symlinks(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "f").write_text("")
    (tmp_path / "a" / "l").symlink_to(victim)
    (tmp_path / "a" / "rel").symlink_to("b")
    fd = confined.open_dir(tmp_path, "/a/./b/")
    try:
        assert os.fstat(fd).st_ino == (tmp_path / "a" / "b").stat().st_ino
    finally:
        os.close(fd)
    for path, code, where in [("a/l", errno.ELOOP, "a/l"), ("a/rel/x", errno.ELOOP, "a/rel"),
                              ("a/f/x", errno.ENOTDIR, "a/f"), ("a/none/x", errno.ENOENT, "a/none"),
                              ("a/../a", errno.EXDEV, "a/..")]:
        with pytest.raises(OSError) as info:
            confined.open_dir(tmp_path, path)
        assert (info.value.errno, info.value.filename) == (code, where)


def test_make_dirs_creates_missing_directories_but_no_symlinked_ones(
        tmp_path: Path, victim: Path) -> None:
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(confined.make_dirs(root, "x/y/z", 0o711))
        assert stat.S_IMODE((tmp_path / "x" / "y" / "z").stat().st_mode) == 0o711
        (tmp_path / "l").symlink_to(victim)
        with pytest.raises(OSError) as info:
            confined.make_dirs(root, "l/new", 0o755)
        assert info.value.errno == errno.ELOOP
        assert not (victim / "new").exists()
    finally:
        os.close(root)


# --- End to end through `pipeline obuilder build --image-dir` ------------------------------------


def build(image: bytes, store: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`pipeline obuilder build` of a spec that only fetches `image` from an image directory."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "evil.tar").write_bytes(image)
    context = tmp_path / "context"
    context.mkdir(exist_ok=True)
    spec = tmp_path / "build.spec"
    spec.write_text("((from evil))\n")
    Path(store.partition(":")[2]).mkdir(exist_ok=True)
    return obuilder("build", "-f", spec, context, "--store", store, "--image-dir", images)


def test_build_of_an_image_with_a_symlinked_directory_leaves_the_host_alone(
        tmp_path: Path, victim: Path) -> None:
    before = {p: attributes(p) for p in (victim, victim / "sub")}
    store = tmp_path / "store"
    result = build(tar_bytes(evil_directory(victim)), f"rsync:{store}", tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p: attributes(p) for p in before} == before


def test_build_of_an_image_with_a_dangling_hard_link_fails_in_one_line(tmp_path: Path) -> None:
    result = build(tar_bytes([directory("etc"), hard_link("x", "etc/shadow")]),
                   f"rsync:{tmp_path / 'store'}", tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("pipeline obuilder: step (from evil) failed: image member 'x' is a "
                             "hard link to "
                             "'etc/shadow', which is not in the image\n")


@pytest.mark.parametrize(("cut", "problem"), [(1500, "unexpected end of data"),
                                              (100, "not a tar file")])
def test_build_of_a_damaged_tarball_fails_in_one_line(tmp_path: Path, cut: int,
                                                      problem: str) -> None:
    whole = tar_bytes([file("big", b"x" * 5000)])
    result = build(whole[:cut], f"rsync:{tmp_path / 'store'}", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("pipeline obuilder: step (from evil) failed: ")
    assert result.stderr.endswith(f"evil.tar cannot be unpacked ({problem})\n")
    assert result.stderr.count("\n") == 1


# --- (b) no other host user reaches the store ---------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every host user can reach (pytest's tmp_path is under a 0700 directory, which
    would hide the store whatever the store does)."""
    path = Path(tempfile.mkdtemp(prefix="public-store-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    # Through a shell: setpriv looks the program up while it still has its capabilities.
    return subprocess.run([*NOBODY, "sh", "-c", '"$0" "$@"', *map(str, argv)],
                          capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def public_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                 public_dir: Path) -> Iterator[Path]:
    """A store root of `kind` at a path every host user can reach: on a mounted filesystem
    through a bind mount of a directory on it."""
    root = public_dir / "store"
    root.mkdir()
    if STORE_FILESYSTEMS[kind] is None:
        yield root
        return
    mounted = new_store_root(kind, request, tmp_path)
    os.chmod(mounted, 0o755)
    subprocess.run(["mount", "--bind", mounted, root], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", root], check=False)


def dangerous_image() -> bytes:
    """An image holding a setuid-root copy of `id`, a device node and a world-readable file."""
    return tar_bytes([
        directory("bin"), file("bin/id", Path(shutil.which("id") or "/usr/bin/id").read_bytes(),
                               mode=0o4755, uid=0, gid=0),
        directory("dev"), (member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3,
                                  mode=0o666), b""),
        directory("etc"), file("etc/motd", b"image data\n", mode=0o644),
    ])


@pytest.mark.parametrize("kind", ["rsync", "btrfs"])
def test_other_users_cannot_use_what_an_image_puts_in_the_store(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, public_dir: Path) -> None:
    with public_store(kind, request, tmp_path, public_dir) as root:
        # An existing store made with wider modes is fixed up too.
        for name in LAYOUT:
            (root / name).mkdir(mode=0o755)
            os.chmod(root / name, 0o755)
        assert as_nobody("ls", root).returncode == 0, "the store root itself stays reachable"
        result = build(dangerous_image(), f"{kind}:{root}", tmp_path)
        assert result.returncode == 0, result.stderr
        got = GOT.match(result.stdout.splitlines()[-1])
        assert got is not None
        rootfs = root / "result" / got.group(1) / "rootfs"
        assert os.stat(rootfs / "bin" / "id").st_mode & stat.S_ISUID, "the image keeps it"
        assert stat.S_ISCHR(os.stat(rootfs / "dev" / "null").st_mode)
        ran = as_nobody(rootfs / "bin" / "id", "-u")
        assert ran.returncode != 0 and "Permission denied" in ran.stderr, ran.stdout
        for path in (rootfs / "dev" / "null", rootfs / "etc" / "motd"):
            read = as_nobody("cat", path)
            assert read.returncode != 0 and "Permission denied" in read.stderr
        assert {name: stat.S_IMODE((root / name).stat().st_mode) for name in LAYOUT} == {
            name: 0o700 for name in LAYOUT}


@pytest.mark.parametrize("kind", sorted(STORE_FILESYSTEMS))
def test_every_store_keeps_its_layout_private(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    root = new_store_root(kind, request, tmp_path)
    names = LAYOUT + (OVERLAYFS_LAYOUT if kind == "overlayfs" else [])
    for name in names:
        (root / name).mkdir(mode=0o777)
        os.chmod(root / name, 0o777)
    result = obuilder("df", "--store", f"{kind}:{root}")
    assert result.returncode == 0, result.stderr
    assert {name: stat.S_IMODE((root / name).stat().st_mode) for name in names} == {
        name: 0o700 for name in names}
    (tmp_path / "fresh").mkdir()
    fresh = new_store_root(kind, request, tmp_path / "fresh")
    assert obuilder("df", "--store", f"{kind}:{fresh}").returncode == 0
    assert {name: stat.S_IMODE((fresh / name).stat().st_mode) for name in names} == {
        name: 0o700 for name in names}
