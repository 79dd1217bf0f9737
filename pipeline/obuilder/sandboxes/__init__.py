"""Sandboxes: each module runs one command isolated in a root filesystem (the `Sandbox` protocol).

- `runc`: an OCI bundle run by `runc run` (namespaces, a fixed capability set, optional cgroup
  limits and seccomp-silenced fsync), as OBuilder's runc sandbox does.
"""
