"""Tracking URI forms: the stores ovdlab logs to are accepted, every other URI is refused up front."""

from __future__ import annotations

import pytest

from ovdlab.platform.tracking.uri import check_tracking_uri

ALLOWED_FORMS = r"use a filesystem path \(a SQLite database file\), sqlite:///<abs path>/mlflow.db, or http\(s\)://"


@pytest.mark.parametrize(
    "uri",
    [None, "work/mlflow.db", "/abs/mlflow.db", "~/mlflow.db", "sqlite:////abs/mlflow.db", "sqlite:///rel.db",
     "http://127.0.0.1:5000", "https://mlflow.example.org/"],
)
def test_supported_tracking_uris_pass(uri: str | None) -> None:
    check_tracking_uri(uri)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("ftp://x", "uses the unsupported scheme 'ftp'"),
        ("file:///x/mlruns", "is MLflow's deprecated file store"),
        ("file:mlruns", "is MLflow's deprecated file store"),
        ("postgresql://user@db/mlflow", "uses the unsupported scheme 'postgresql'"),
        ("databricks://profile", "uses the unsupported scheme 'databricks'"),
        ("http://", "names no server host"),
        ("sqlite:rel.db", "is not a sqlite:/// URL"),
        ("", "is empty"),
    ],
)
def test_other_tracking_uris_are_refused_naming_the_allowed_forms(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"^tracking.uri '{uri}' {problem}.*; {ALLOWED_FORMS}"):
        check_tracking_uri(uri)


def test_refusal_names_where_the_uri_came_from() -> None:
    with pytest.raises(ValueError, match=r"^\$MLFLOW_TRACKING_URI 'ftp://x' uses"):
        check_tracking_uri("ftp://x", "$MLFLOW_TRACKING_URI")
