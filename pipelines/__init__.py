"""Pipelines people run (CI for OCaml projects, CI for an opam repository) and their parts."""
