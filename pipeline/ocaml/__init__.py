"""The parts of the OCaml CI pipeline: analysis, platforms and specs, failures, status,
web pages."""
