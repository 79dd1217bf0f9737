"""The parts of the OCaml CI pipeline: analysis, platforms and specs, status, web pages."""
