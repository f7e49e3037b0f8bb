"""Microbenchmark: parse and normalise image references of every form docker accepts.

    python -m pytest bench/ --benchmark-only
"""

from __future__ import annotations

from lstore.store.reference import parse_reference

REFERENCES = [
    "busybox",
    "library/nginx:1.25",
    "ghcr.io/org/team/app:v1.2.3",
    "localhost:5000/app",
    "127.0.0.1:5000/debian-nginx:oci",
    "[::1]:5000/app:latest",
    "registry.example.com/a/b/c@sha256:" + "0123456789abcdef" * 4,
    "docker.io/library/debian:bookworm-slim@sha256:" + "fedcba9876543210" * 4,
]


def parse_all() -> list[str]:
    return [str(parse_reference(text)) for text in REFERENCES]


def test_parse_references(benchmark):
    names = benchmark(parse_all)

    assert names[0] == "docker.io/library/busybox:latest"
    assert names[3] == "localhost:5000/app:latest"
    assert len(names) == len(REFERENCES)
