"""Reading the JSON and YAML files xdlm trusts (manifests, meta.json, config.json, tokenizer
files, configs), with every failure one `ValueError` / `FileNotFoundError` naming the file and
what is wrong: not readable text, not JSON / YAML, a YAML tag that would build a Python object, a
missing key or a value of the wrong type. Imports nothing of xdlm (every layer may use it)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object in `path` (`what` it is, for the messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} ({what}) is missing")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} ({what}) is not valid JSON ({err}); the file is truncated, emptied or "
            "foreign: restore it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) holds a JSON {type(data).__name__}, not an object")
    return data


def parse_yaml(text: str, where: str):
    """`yaml.safe_load(text)`; a syntax error or a tag such as `!!python/object` (which only an
    unsafe loader would turn into an object) -> ValueError naming `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())[:200]
        raise ValueError(
            f"{where} is not plain YAML ({reason}); write values as YAML scalars, lists and "
            "mappings (tags such as !!python/... are refused)"
        ) from None


def read_yaml(path: str | Path):
    """The YAML document in `path` (`parse_yaml`), None when it is empty."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); pass a YAML file") from None
    return parse_yaml(text, str(path))


def require(data: dict, where: str, **types_: type | tuple) -> None:
    """ValueError naming `where` and the key when `data` lacks a key or holds another type
    (bool never passes as int / float)."""
    for key, kind in types_.items():
        if key not in data:
            raise ValueError(f"{where}: the key {key!r} is missing; the file was edited or is "
                             "foreign, restore it")  # fmt: skip
        if not _is(data[key], kind):
            raise ValueError(f"{where}: {key} must be {_name(kind)}, got {data[key]!r}")


def from_json_dict(cls, data, where: str):
    """The dataclass `cls` from a JSON dict, every field checked against its annotation (int,
    float, str, bool, dict, list, X | None, dict[str, Dataclass])."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; the file was edited or written by "
                         "another version, restore it")  # fmt: skip
    missing = dataclasses.MISSING
    required = [
        n for n, f in fields.items() if f.default is missing and f.default_factory is missing
    ]
    require(data, where, **{n: object for n in required})
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            inner = typing.get_args(hint)[1]
            require(data, where, **{key: dict})
            value = {k: from_json_dict(inner, v, f"{where}: {key}.{k}") for k, v in value.items()}
        elif not _is(value, _runtime(hint)):
            raise ValueError(f"{where}: {key} must be {_name(_runtime(hint))}, got {value!r}")
        values[key] = value
    return cls(**values)


def _runtime(hint) -> tuple:
    """The isinstance types of an annotation (`int | None` -> (int, NoneType))."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _runtime(arg))
    return (typing.get_origin(hint) or hint,)


def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """The JSON objects of `path`, one a line (blank lines skipped); a line that is not one
    -> ValueError naming `path:line`."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} ({what}) is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} ({what}) holds a JSON {type(record).__name__}, "
                             "not an object")  # fmt: skip
        records.append(record)
    return records
