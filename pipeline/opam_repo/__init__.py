"""CI for an opam package repository, in the style of opam-repo-ci: the parts that know about
opam repositories (merging a pull request, classifying and linting its changes, the build specs
of its packages) for `pipelines/opam_repo_ci.py`. Nothing here imports the engine."""
