"""`pipeline obuilder` as a real process: builds on each store, conversions, upkeep, errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from obuilder_fixtures import STORE_FILESYSTEMS, new_store_root
from oci_images import OciLayout, file, tar_bytes, tar_directory
from registry_fixtures import Registry, push_oci_layout

from pipeline.obuilder.cli import main as obuilder_main
from pipeline.obuilder.log_format import MARK

ROOT = Path(__file__).resolve().parent.parent
SPEC = """\
((from busybox)
 (copy (src "hello.txt") (dst "/hello.txt"))
 (run (shell "cat /hello.txt > /out.txt"))
 (run (shell "echo done: $(cat /out.txt)")))
"""
GOT = re.compile(r'^Got: "([0-9a-f]{64})"$')



def obuilder(*args: str | Path, env: dict[str, str] | None = None,
             python_options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, *python_options, "-m", "pipeline", "obuilder", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def imported_modules(importtime_report: str) -> set[str]:
    """The modules a process imported, from what `python -X importtime` wrote on its stderr."""
    modules = set()
    for line in importtime_report.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[1].strip().isdigit():
            modules.add(fields[2].strip())
    return modules


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A spec file and its context directory."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello.txt").write_text("hello\n")
    spec = tmp_path / "build.spec"
    spec.write_text(SPEC)
    return spec, context


@pytest.fixture
def rsync_root(tmp_path: Path) -> Path:
    """An empty directory for an rsync store, which needs no filesystem of its own."""
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.mark.parametrize("kind", sorted(STORE_FILESYSTEMS))
def test_build_then_everything_from_cache(
    kind: str, project: tuple[Path, Path], busybox_images: Path,
    request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    spec, context = project
    store = f"{kind}:{new_store_root(kind, request, tmp_path)}"
    args = ["build", "-f", spec, context, "--store", store, "--image-dir", busybox_images]
    first = obuilder(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert "done: hello" in lines
    # The builder's own lines end with its marker.
    assert lines.count("---> saved as " + lines[-1].removeprefix("Got: ") + MARK.decode()) == 1
    assert len([ln for ln in lines if ln.startswith("---> saved as")]) == 4
    second = obuilder(*args)
    assert second.returncode == 0, second.stderr
    again = second.stdout.splitlines()
    assert GOT.match(again[-1]) and again[-1] == lines[-1]
    assert len([ln for ln in again if ln.startswith("---> using")]) == 4
    assert not [ln for ln in again if ln.startswith("---> saved")]
    assert "done: hello" in again, "the cached log is replayed"


def test_a_reader_that_stops_reading_neither_stops_the_build_nor_gets_a_traceback(
    busybox_images: Path, rsync_root: Path, tmp_path: Path,
) -> None:
    # Far more output than a pipe holds, so that writing it meets the closed pipe.
    spec = tmp_path / "chatty.spec"
    spec.write_text('((from busybox)\n (run (shell "i=0; while [ $i -lt 30000 ];'
                    ' do echo line $i; i=$((i+1)); done")))\n')
    context = tmp_path / "empty"
    context.mkdir()
    args = ["build", "-f", spec, context, "--store", f"rsync:{rsync_root}",
            "--image-dir", busybox_images]
    argv = [sys.executable, "-m", "pipeline", "obuilder", *map(str, args)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `| head -1` does
        errors = proc.stderr.read().decode()
        status = proc.wait(timeout=120)
    assert first == b"(from busybox)" + MARK + b"\n"
    assert status == 0, errors
    assert errors == ""
    again = obuilder(*args)
    assert again.returncode == 0, again.stderr
    assert len([ln for ln in again.stdout.splitlines() if ln.startswith("---> using")]) == 2, \
        "the build went on to its end: every step is in the store"
    assert "line 29999" in again.stdout


def test_a_reader_that_goes_away_ends_other_commands_with_141_and_no_traceback(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "long.spec"
    spec.write_text("((from busybox)\n" + "".join(
        f' (run (shell "echo {i} {"x" * 60}"))\n' for i in range(3000)) + ")\n")
    argv = [sys.executable, "-m", "pipeline", "obuilder", "fmt", "-f", str(spec)]
    # Unbuffered, Python's text stdout drops the rest of a write that the closed pipe cut short
    # instead of raising: buffered, as it is by default, the closed pipe is seen.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                          env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()
        errors = proc.stderr.read().decode()
        status = proc.wait(timeout=60)
    assert (status, errors) == (141, "")


def test_a_cached_build_imports_no_engine_and_leaves_cleaning_to_a_build_that_runs_a_step(
    project: tuple[Path, Path], busybox_images: Path, rsync_root: Path,
) -> None:
    spec, context = project
    root = rsync_root
    args = ["build", "-f", spec, context, "--store", f"rsync:{root}", "--image-dir",
            busybox_images]
    assert obuilder(*args).returncode == 0
    # What crashed processes left: a build whose step nobody holds, and a cache copy of an owner
    # that has gone.
    unfinished = root / "result-tmp" / ("0" * 64)
    unfinished.mkdir()
    orphan_copy = root / "cache-tmp" / "p1x00000000-0-c"
    orphan_copy.mkdir()

    cached = obuilder(*args, python_options=["-X", "importtime"])
    assert cached.returncode == 0, cached.stderr
    assert "---> saved" not in cached.stdout
    modules = imported_modules(cached.stderr)
    assert "pipeline.obuilder.builder" in modules, "the report lists the builder's modules"
    engine = sorted(name for name in modules
                    if name.startswith("pipeline.") and not name.startswith("pipeline.obuilder"))
    assert engine == []
    # Neither the web's HTTP library nor the fetchers' image unpacking: nothing is fetched.
    assert not modules & {"aiohttp", "tarfile", "pipeline.obuilder.fetchers.unpack"}
    # Nothing ran, so nothing was cleaned ...
    assert unfinished.exists() and orphan_copy.exists()

    # ... until a build runs a step: the leftovers are gone before it.
    spec.write_text(SPEC.replace("done:", "finished:"))
    built = obuilder(*args)
    assert built.returncode == 0, built.stderr
    assert "finished: hello" in built.stdout.splitlines()
    assert not unfinished.exists() and not orphan_copy.exists()


def test_failed_step_exits_1_and_is_not_saved(
    project: tuple[Path, Path], busybox_images: Path, tmp_path: Path,
) -> None:
    spec, context = project
    spec.write_text('((from busybox) (run (shell "echo oops; exit 3")))')
    store = tmp_path / "store"
    store.mkdir()
    args = ["build", "-f", spec, context, "--store", f"rsync:{store}",
            "--image-dir", busybox_images]
    result = obuilder(*args)
    assert result.returncode == 1
    assert result.stdout.splitlines().count("oops") == 1
    assert "exited with status 3" in result.stderr
    assert "Got:" not in result.stdout
    again = obuilder(*args)
    assert again.returncode == 1 and "---> using" in again.stdout
    assert again.stdout.splitlines().count("oops") == 1, "the failed step runs again"


def test_secret_option(project: tuple[Path, Path], busybox_images: Path, tmp_path: Path) -> None:
    spec, context = project
    spec.write_text('((from busybox)\n (run (secrets (token (target "/run/token")))\n'
                    '      (shell "grep -q 3cre /run/token && echo secret-ok")))')
    (tmp_path / "token").write_text("s3cret")
    store = tmp_path / "store"
    store.mkdir()
    result = obuilder("build", "-f", spec, context, "--store", f"rsync:{store}",
                      "--image-dir", busybox_images, "--secret", f"token:{tmp_path / 'token'}")
    assert result.returncode == 0, result.stderr
    assert "secret-ok" in result.stdout and "s3cret" not in result.stdout
    bad = obuilder("build", "-f", spec, context, "--store", f"rsync:{store}",
                   "--image-dir", busybox_images, "--secret", "token")
    assert bad.returncode == 1 and "expected ID:FILE" in bad.stderr


def test_fmt_and_dockerfile(tmp_path: Path) -> None:
    spec = tmp_path / "s.spec"
    spec.write_text('((from busybox)(user (uid 1000) (gid 1000))'
                    '(run (cache (c (target "/c"))) (shell "a\\nb")) (copy (src a b) (dst /x/)))')
    fmt = obuilder("fmt", "-f", spec)
    assert fmt.returncode == 0, fmt.stderr
    assert fmt.stdout.splitlines()[0] == "((from busybox)"
    formatted = tmp_path / "f.spec"
    formatted.write_text(fmt.stdout)
    assert obuilder("fmt", "-f", formatted).stdout == fmt.stdout, "printing is idempotent"
    plain = obuilder("dockerfile", "-f", spec).stdout
    assert plain.startswith("FROM busybox\n")
    assert "USER 1000:1000" in plain and "COPY --chown=1000:1000 a b /x/" in plain
    assert "--mount" not in plain
    buildkit = obuilder("dockerfile", "-f", spec, "--buildkit").stdout
    assert "RUN --mount=type=cache,id=c,target=/c,uid=1000" in buildkit
    windows = obuilder("dockerfile", "-f", spec, "--escape", "windows").stdout
    assert windows.startswith("#escape=`\n")


def test_malformed_spec_names_line_and_column(tmp_path: Path) -> None:
    spec = tmp_path / "bad.spec"
    spec.write_text('((from busybox)\n (run (netwrk host) (shell "x")))\n')
    result = obuilder("fmt", "-f", spec)
    assert result.returncode == 1
    assert f"{spec}:2:" in result.stderr and "unknown field `netwrk` in run" in result.stderr


def test_unreadable_spec_files_are_one_line_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.spec"
    latin1 = tmp_path / "latin1.spec"
    latin1.write_bytes(b'((from busybox)\n (comment "caf\xe9"))\n')
    for path, error in [
        (missing, f"{missing}: No such file or directory"),
        (tmp_path, f"{tmp_path}: Is a directory"),
        (latin1, f"{latin1}:2:15: invalid UTF-8 (byte 0xe9 at offset 30); save the spec as UTF-8"),
    ]:
        for command in ("fmt", "dockerfile"):
            result = obuilder(command, "-f", path)
            assert (result.returncode, result.stdout) == (1, "")
            assert result.stderr == f"pipeline obuilder: {error}\n"


def test_store_upkeep_commands(
    project: tuple[Path, Path], busybox_images: Path, rsync_root: Path,
) -> None:
    spec, context = project
    store = rsync_root
    option = ["--store", f"rsync:{store}"]
    built = obuilder("build", "-f", spec, context, *option, "--image-dir", busybox_images)
    assert built.returncode == 0, built.stderr
    final = GOT.match(built.stdout.splitlines()[-1])
    assert final is not None
    health = obuilder("healthcheck", *option)
    assert health.returncode == 0 and "runc version" in health.stdout
    df = obuilder("df", *option)
    assert df.returncode == 0 and "GiB used of" in df.stdout
    assert obuilder("clean", *option).returncode == 0
    saved = re.findall(r'---> saved as "([0-9a-f]{64})"', built.stdout)
    deleted = obuilder("delete", saved[2], *option)
    assert deleted.returncode == 0
    assert set(re.findall(r"deleted ([0-9a-f]{64})", deleted.stdout)) == {saved[2], saved[3]}
    pruned = obuilder("prune", *option, "--before", "2999-01-01T00:00:00", "--limit", "1")
    assert pruned.returncode == 0 and "1 results deleted" in pruned.stdout
    assert not (store / "result" / saved[1]).exists(), "the newest leaf went first"
    bad_time = obuilder("prune", *option, "--before", "yesterday")
    assert bad_time.returncode == 2 and "ISO 8601" in bad_time.stderr


def test_errors_name_what_to_do(project: tuple[Path, Path], busybox_images: Path,
                                tmp_path: Path) -> None:
    spec, context = project
    store = tmp_path / "store"
    store.mkdir()
    args = ["build", "-f", spec, context, "--store", f"rsync:{store}",
            "--image-dir", busybox_images]
    no_rsync = obuilder(*args, env={**os.environ, "PATH": "/nonexistent"})
    assert no_rsync.returncode == 1
    assert "rsync not found: apt-get install rsync" in no_rsync.stderr
    only_rsync = tmp_path / "bin"
    only_rsync.mkdir()
    (only_rsync / "rsync").symlink_to(shutil.which("rsync") or "/usr/bin/rsync")
    no_runc = obuilder(*args, env={**os.environ, "PATH": str(only_rsync)})
    assert no_runc.returncode == 1
    assert "runc not found: apt-get install runc" in no_runc.stderr
    btrfs_on_ext4 = obuilder("df", "--store", f"btrfs:{store}")
    assert btrfs_on_ext4.returncode == 1 and "mkfs.btrfs" in btrfs_on_ext4.stderr
    unknown = obuilder("df", "--store", f"zfs:{store}")
    assert unknown.returncode == 1 and "zfs" in unknown.stderr
    missing_image = obuilder("build", "-f", spec, context, "--store", f"rsync:{store}",
                             "--image-dir", tmp_path)
    assert missing_image.returncode == 1 and "unknown image 'busybox'" in missing_image.stderr


def test_not_root_is_refused(monkeypatch: pytest.MonkeyPatch, project: tuple[Path, Path],
                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The suite runs as root; what a user sees is checked by pretending not to be.
    spec, context = project
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status = obuilder_main(["build", "-f", str(spec), str(context), "--store",
                            f"rsync:{tmp_path}", "--image-dir", str(tmp_path)])
    assert status == 1
    assert capsys.readouterr().err.strip() == (
        "pipeline obuilder: must run as root (runc and the stores need it)")


def test_fetcher_option_and_fetcher_map(project: tuple[Path, Path], busybox_images: Path,
                                        tmp_path: Path) -> None:
    spec, context = project
    store = tmp_path / "store"
    store.mkdir()
    option = ["--store", f"rsync:{store}"]
    local = obuilder("build", "-f", spec, context, *option, "--fetcher",
                     f"local:{busybox_images}")
    assert local.returncode == 0, local.stderr
    assert "done: hello" in local.stdout.splitlines()
    # A map sends busybox to the images; the named fetcher (which has none) gets the rest.
    mapping = tmp_path / "fetchers"
    mapping.write_text(f"# for tests\nbusy* -> local:{busybox_images}\n")
    other = tmp_path / "other-store"
    other.mkdir()
    mapped = obuilder("build", "-f", spec, context, "--store", f"rsync:{other}",
                      "--fetcher", f"local:{tmp_path}", "--fetcher-map", mapping)
    assert mapped.returncode == 0, mapped.stderr
    assert mapped.stdout.splitlines()[-1] == local.stdout.splitlines()[-1]
    spec.write_text("((from alpine) (run (shell true)))")
    unmapped = obuilder("build", "-f", spec, context, "--store", f"rsync:{other}",
                        "--fetcher", f"local:{tmp_path}", "--fetcher-map", mapping)
    assert unmapped.returncode == 1 and f"no {tmp_path}/alpine.tar" in unmapped.stderr
    mapping.write_text("busybox local:/x\n")
    bad_map = obuilder("build", "-f", spec, context, *option, "--fetcher-map", mapping)
    assert bad_map.returncode == 1
    assert f"{mapping}:1: expected PATTERN -> FETCHER" in bad_map.stderr
    bad_name = obuilder("build", "-f", spec, context, *option, "--fetcher", "docker")
    assert bad_name.returncode == 1 and "unknown fetcher 'docker'" in bad_name.stderr
    both = obuilder("build", "-f", spec, context, *option, "--fetcher", "registry",
                    "--image-dir", busybox_images)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_pull_of_a_local_image_fetches_it_again(project: tuple[Path, Path],
                                                busybox_images: Path, tmp_path: Path) -> None:
    spec, context = project
    store = tmp_path / "store"
    store.mkdir()
    option = ["--store", f"rsync:{store}", "--image-dir", busybox_images]
    built = obuilder("build", "-f", spec, context, *option)
    assert built.returncode == 0, built.stderr
    saved = re.findall(r'---> saved as "([0-9a-f]{64})"', built.stdout)
    pulled = obuilder("pull", "busybox", *option)
    assert pulled.returncode == 0, pulled.stderr
    lines = pulled.stdout.splitlines()
    assert set(re.findall(r"^deleted ([0-9a-f]{64})$", pulled.stdout, re.M)) == set(saved)
    assert f'---> saved as "{saved[0]}"{MARK.decode()}' in lines
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", lines[-1])


def test_pull_refreshes_a_registry_tag(project: tuple[Path, Path], busybox_rootfs: Path,
                                       registry: Registry, tmp_path: Path) -> None:
    spec, context = project
    image = f"{registry.host}/pull-test:latest"
    layout = OciLayout(tmp_path / "layout")

    def push(version: str) -> None:
        layer = tar_bytes([file("version", f"{version}\n".encode())])
        layout.tag(layout.add_image([(tar_directory(busybox_rootfs), "gzip"), (layer, "gzip")],
                                    env=["PATH=/bin"]), version)
        push_oci_layout(layout.path, version, image)

    push("one")
    spec.write_text(f'((from {image})\n (run (shell "echo version $(cat /version)")))\n')
    store = tmp_path / "store"
    store.mkdir()
    option = ["--store", f"rsync:{store}", "--fetcher", "registry"]
    built = obuilder("build", "-f", spec, context, *option)
    assert built.returncode == 0, built.stderr
    assert "version one" in built.stdout.splitlines()
    same = obuilder("pull", image, *option)
    assert same.returncode == 0, same.stderr
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", same.stdout), "unchanged: nothing deleted"
    push("two")
    stale = obuilder("build", "-f", spec, context, *option)
    assert "version one" in stale.stdout.splitlines(), "a tag is resolved once"
    changed = obuilder("pull", image, *option)
    assert changed.returncode == 0, changed.stderr
    lines = changed.stdout.splitlines()
    assert len([line for line in lines if line.startswith("deleted ")]) == 2
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", lines[-1]) and lines[-1] != same.stdout.strip()
    fresh = obuilder("build", "-f", spec, context, *option)
    assert fresh.returncode == 0, fresh.stderr
    assert "version two" in fresh.stdout.splitlines()
    assert len([line for line in fresh.stdout.splitlines() if line.startswith("---> using")]) == 1
    unknown = obuilder("pull", f"{registry.host}/no-such-image:latest", *option)
    assert unknown.returncode == 1 and "no-such-image" in unknown.stderr


def test_a_relative_store_path_works(project: tuple[Path, Path], busybox_images: Path,
                                     tmp_path: Path) -> None:
    spec, context = project
    (tmp_path / "store").mkdir()
    argv = [sys.executable, "-m", "pipeline", "obuilder", "build", "-f", str(spec),
            str(context), "--store", "rsync:store", "--image-dir", str(busybox_images)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "done: hello" in done.stdout.splitlines()
    assert GOT.match(done.stdout.splitlines()[-1])
