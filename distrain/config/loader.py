"""Loading configs: a YAML file plus dotted command-line overrides, validated against the schema,
with errors that name the key, where it came from and the fix.

Precedence, written down once: command-line ``section.key=value`` > YAML file > field defaults.
Unknown keys are errors that name the key, where it came from and the closest valid key; bad values
name the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distrain.config.schema import Config, OptimConfig, OptimPartConfig, model_config_class, model_names
from distrain.errors import ConfigError


def _valid_keys(cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in cls.model_fields.items()]


def _model_parts(data: dict) -> tuple[str, ...]:
    """The parts of the model ``data`` names, when it has several (each may have ``optim.<part>``)."""
    name = (data.get("model") or {}).get("name") if isinstance(data.get("model"), dict) else None
    if name not in model_names():
        return ()
    parts = model_config_class(name).parts
    return parts if len(parts) > 1 else ()


def _keys_at(cls: type[BaseModel], data: dict) -> list[str]:
    """The keys a section takes: its fields, and under ``optim`` the model's parts."""
    return _valid_keys(cls) + (list(_model_parts(data)) if cls is OptimConfig else [])


def _section_class(path: tuple[str, ...], data: dict) -> type[BaseModel] | None:
    """The pydantic class that owns the keys below ``path`` (the model section follows model.name)."""
    cls: type[BaseModel] = Config
    for part in path:
        if cls is Config and part == "model":
            name = (data.get("model") or {}).get("name") if isinstance(data.get("model"), dict) else None
            if name not in model_names():
                return None  # the unknown model.name is reported instead
            cls = model_config_class(name)
            continue
        if cls is OptimConfig and part in _model_parts(data):
            cls = OptimPartConfig
            continue
        field = cls.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(options)}"


_KEY = re.compile(
    r"\b((?:run|model|data|train|optim|parallel|checkpoint|metrics|tracking|cluster)(?:\.[a-z_]+)+)"
)


def _where(msg: str, source: str, overridden: dict[str, str]) -> str:
    """Where the keys a message names were set: the command-line arguments among them, else the file."""
    args = [overridden[k] for k in dict.fromkeys(_KEY.findall(msg)) if k in overridden]
    return ", ".join(f"command-line argument '{a}'" for a in args) or source


def _format_errors(err: ValidationError, data: dict, source: str, overridden: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) if loc else "(top level)"
        where = f"command-line argument '{key}=...'" if key in overridden else source
        if e["type"] == "extra_forbidden":
            owner = _section_class(tuple(loc[:-1]), data)
            opts = [f for f in _valid_keys(owner)] if owner else []
            prefix = ".".join(loc[:-1])
            sugg = _closest(loc[-1], opts)
            if sugg.startswith("did you mean"):
                sugg = f"did you mean '{prefix + '.' if prefix else ''}{sugg.split(chr(39))[1]}'?"
            lines.append(f"unknown key '{key}' in {where}; {sugg}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}' in {source}")
        elif e["type"] == "value_error" and not e["loc"] or e["type"] == "value_error" and len(loc) <= 1:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{msg} ({_where(msg, source, overridden)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"key '{key}' = {e.get('input')!r} in {where}: {msg}")
    if len(lines) == 1:  # one line: the key, where it came from and the fix
        return lines[0]
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(arg: str) -> tuple[list[str], Any]:
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"bad override '{arg}': write section.key=value, e.g. train.steps=50")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"bad override '{arg}': the key must be dotted, section.key=value (e.g. optim.lr=3e-4)"
        )
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override '{arg}': value is not valid YAML ({exc.problem})") from None
    return parts, value


def _set_override(data: dict, parts: list[str], value: Any, arg: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        cls = _section_class(tuple(parts[:i]), data)
        if cls is not None and part not in _keys_at(cls, data):
            sugg = _closest(part, _keys_at(cls, data))
            if sugg.startswith("did you mean") and i:
                sugg = f"did you mean '{'.'.join(parts[:i])}.{sugg.split(chr(39))[1]}'?"
            raise ConfigError(f"bad override '{arg}': unknown key '{'.'.join(parts[: i + 1])}'; {sugg}")
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"bad override '{arg}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    cls = _section_class(tuple(parts[:-1]), data)
    if cls is not None and parts[-1] not in _keys_at(cls, data):
        prefix = ".".join(parts[:-1])
        sugg = _closest(parts[-1], _keys_at(cls, data))
        if sugg.startswith("did you mean"):
            sugg = f"did you mean '{prefix}.{sugg.split(chr(39))[1]}'?"
        raise ConfigError(f"bad override '{arg}': unknown key '{'.'.join(parts)}'; {sugg}")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML ``path`` (may be None for overrides only), apply ``overrides``, validate."""
    data: dict = {}
    source = "the command line"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {path} not found; pass a YAML file such as configs/gpt-cpu-tiny.yaml"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
        data = loaded
    overridden: dict[str, str] = {}
    for arg in overrides:
        parts, value = parse_override(arg)
        _set_override(data, parts, value, arg)
        overridden[".".join(parts)] = arg
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, data, source, overridden)) from None


def config_from_yaml(text: str, source: str = "config") -> Config:
    """A config from YAML text written by ``to_yaml`` (what launchers hand to their workers)."""
    try:
        return Config.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, yaml.safe_load(text), source, {})) from None


def to_yaml(cfg: Config) -> str:
    data = cfg.model_dump(mode="json", by_alias=True)
    data["model"] = {"name": data["model"].pop("name"), **data["model"]}
    return yaml.safe_dump(data, sort_keys=False)


# What a resume may change (dotted keys or whole sections): how long and how the run goes on, where
# it reads and writes, how it is logged and launched. Anything else (the model, precision, ZeRO
# stage, optimizer, data format and tokenizer...) belongs to the checkpoint, and a change is refused.
RESUMABLE_KEYS = (
    "run.name",
    "run.dir",
    "run.log_level",
    "run.device",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.check_replicas",
    "train.on_nonfinite",
    "train.max_nonfinite_steps",
    "train.global_batch_size",
    "optim.warmup_steps",
    "optim.fused",
    "data.train_path",
    "data.eval_path",
    "data.sources",
    "data.num_workers",
    "data.engine",
    "data.ray_actors",
    "data.prefetch_factor",
    "data.pin_memory",
    "data.restart_order",
    "parallel.grad_accum",
    "parallel.sequence_parallel",
    "parallel.backend",
    "parallel.tf32",
    "parallel.cudnn_benchmark",
    "parallel.channels_last",
    "parallel.compile",
    "checkpoint",
    "metrics",
    "tracking",
    "cluster",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(saved_yaml: str, cfg: Config) -> list[str]:
    """The keys, with both values, where ``cfg`` differs from a checkpoint's saved config in ways
    a resume may not change (``RESUMABLE_KEYS`` may)."""
    saved = _flatten(yaml.safe_load(saved_yaml))
    new = _flatten(yaml.safe_load(to_yaml(cfg)))
    out = []
    for key in sorted(set(saved) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        a, b = saved.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def config_keys() -> set[str]:
    """Every dotted key of the config tree as a YAML file or an override spells it (sections too),
    over every registered model's section."""
    keys: set[str] = set()

    def walk(prefix: str, cls: type[BaseModel]) -> None:
        for name, f in cls.model_fields.items():
            key = f"{prefix}.{f.alias or name}"
            keys.add(key)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(key, ann)
            for arg in getattr(ann, "__args__", ()):  # e.g. int | WorkerRange
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(key, arg)

    for name, field in Config.model_fields.items():
        keys.add(name)
        if name == "model":
            for m in model_names():
                walk("model", model_config_class(m))
                parts = model_config_class(m).parts
                for part in parts if len(parts) > 1 else ():
                    keys.add(f"optim.{part}")
                    walk(f"optim.{part}", OptimPartConfig)
        else:
            walk(name, field.annotation)
    return keys


def reference_markdown() -> str:
    """The config reference (every key, type, default and its one-line doc) as markdown tables."""
    out = []
    sections: list[tuple[str, type[BaseModel]]] = []
    for name, field in Config.model_fields.items():
        if name == "model":
            # the shipped models (one added in this process by ``register`` documents itself)
            shipped = model_names(shipped=True)
            sections += [(f"model (name: {k})", model_config_class(k)) for k in shipped]
        else:
            sections.append((name, field.annotation))
        if name == "optim":
            multi = [k for k in model_names(shipped=True) if len(model_config_class(k).parts) > 1]
            sections.append((f"optim.<part> (models of several parts: {', '.join(multi)})", OptimPartConfig))
    for title, cls in sections:
        out.append(f"### `{title}`\n\n| key | default | description |\n|---|---|---|")
        sec = title.split(" ")[0]

        def rows(prefix: str, cls: type[BaseModel]) -> None:
            for key, f in ((f.alias or k, f) for k, f in cls.model_fields.items()):
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                    rows(f"{prefix}.{key}", f.annotation)  # a nested section: its keys in full
                    continue
                default = (
                    "required"
                    if f.is_required()
                    else (f.default_factory() if f.default_factory else f.default)
                )
                out.append(f"| `{prefix}.{key}` | `{default!r}` | {f.description} |")

        rows(sec, cls)
        out.append("")
    return "\n".join(out)
