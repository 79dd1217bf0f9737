"""Shared fixtures."""

pytest_plugins = ["obuilder_fixtures", "registry_fixtures", "ocaml_fixtures", "gate"]
