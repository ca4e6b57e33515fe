"""The typed config tree: the schema (``schema.py``: sections and their validators) and the loader
(``loader.py``: YAML, dotted command-line overrides, error text). Data only: nothing here imports
torch or builds a part."""

from distrain.config.loader import (
    RESUMABLE_KEYS,
    config_from_yaml,
    load_config,
    parse_override,
    reference_markdown,
    resume_changes,
    to_yaml,
)
from distrain.config.schema import (
    Config,
    ModelSection,
    Section,
    check_sizes,
    check_topology,
    dp_size,
    elastic_global_batch,
    elastic_layouts,
    elastic_sizes,
    global_batch,
    mesh,
    mesh_line,
    mesh_summary,
    sized_for,
)
from distrain.errors import ConfigError, TopologyError

__all__ = [
    "RESUMABLE_KEYS",
    "Config",
    "ConfigError",
    "ModelSection",
    "Section",
    "TopologyError",
    "check_sizes",
    "check_topology",
    "elastic_global_batch",
    "elastic_layouts",
    "elastic_sizes",
    "config_from_yaml",
    "dp_size",
    "global_batch",
    "mesh",
    "mesh_line",
    "mesh_summary",
    "load_config",
    "parse_override",
    "reference_markdown",
    "resume_changes",
    "sized_for",
    "to_yaml",
]
