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
# Emulated builds (arm64, ppc64le, s390x, riscv64) run through qemu's binfmt_misc handlers,
# which Debian registers with the F flag (the interpreter is opened here, so sandboxes need no
# copy of it; a handler without F works too, its interpreter bound into each sandbox). A machine
# without systemd has neither binfmt_misc mounted nor the handlers on.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
