"""gadgetpipe's YAML config: models (:mod:`config.schema`) and loader (:mod:`config.loader`,
which reads YAML with positions (:mod:`config.yaml_doc`), turns model errors into issues
(:mod:`config.model_issues`), documents into declarations (:mod:`config.declare`), checks each
instance (:mod:`config.checks`) and returns :mod:`config.results`).

``config/examples/default.yaml`` is the embedded default config (``serve`` without
``--config``); ``config/schema.json`` is the generated JSON Schema; ``config/deploy`` holds a
systemd unit and a Kubernetes DaemonSet.
"""

from config.loader import (
    DEFAULT_CONFIG,
    ConfigError,
    ConfigLoader,
    DeclaredInstance,
    Issue,
    LoadedConfig,
    Reachability,
)
from config.schema import (
    ConfigDocument,
    DaemonSection,
    InstanceSection,
    InstanceSpecManifest,
    json_schema,
)

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigDocument",
    "ConfigError",
    "ConfigLoader",
    "DaemonSection",
    "DeclaredInstance",
    "InstanceSection",
    "InstanceSpecManifest",
    "Issue",
    "LoadedConfig",
    "Reachability",
    "json_schema",
]
