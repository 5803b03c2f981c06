"""MLflow tracking for ovdlab: run lifecycle, params, metrics, artifacts, parent runs."""

from ovdlab.platform.tracking.tracker import (
    CONFIG_ARTIFACT,
    LONG_PARAM_POINTER,
    LONG_PARAMS_ARTIFACT,
    Tracker,
    git_commit,
    split_long_params,
    tracker_from_config,
)
from ovdlab.platform.tracking.uri import (
    TRACKING_URI_ENV,
    TrackingError,
    TrackingServerUnavailable,
    check_tracking_server,
    default_artifact_location,
    default_tracking_uri,
    experiment_name_for,
    resolve_tracking_uri,
)

__all__ = [
    "CONFIG_ARTIFACT",
    "LONG_PARAMS_ARTIFACT",
    "LONG_PARAM_POINTER",
    "TRACKING_URI_ENV",
    "Tracker",
    "TrackingError",
    "TrackingServerUnavailable",
    "check_tracking_server",
    "default_artifact_location",
    "default_tracking_uri",
    "experiment_name_for",
    "git_commit",
    "resolve_tracking_uri",
    "split_long_params",
    "tracker_from_config",
]
