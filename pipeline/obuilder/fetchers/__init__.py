"""Fetchers turn an image reference (`(from IMAGE)`) into a root filesystem and its environment.

Each module implements the `Fetcher` protocol of `pipeline.obuilder.protocols`:

- `local`: a directory of rootfs tarballs (`NAME.tar` / `NAME.tar.gz`), for tests and
  air-gapped sites.

A fetcher raises `BuildError` naming the image when it cannot provide it; it never leaves a
partial rootfs behind as a result, because the store discards the step's directory on failure.
"""
