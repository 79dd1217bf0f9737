#!/usr/bin/env bash
# Installs everything `pipeline` needs on a fresh Debian 12 machine (run as root):
# the system tools from Debian, then the package and its test tools in ./.venv.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-pip git graphviz ca-certificates \
    runc btrfs-progs xfsprogs rsync busybox-static buildah \
    debootstrap docker-registry skopeo umoci apache2-utils opam \
    qemu-user-static binfmt-support podman \
    chromium fonts-dejavu-core >/dev/null
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
