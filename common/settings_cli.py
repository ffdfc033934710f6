"""`meshctl up`'s flags, generated from the Settings model: one declaration per setting.

Each Settings field becomes `--kebab-name` (help = its description, default shown), list fields are
repeatable (and take comma-separated values), bools are switches (`--no-x` when the default is on).
Values reach Settings as given on the command line, so pydantic validates a flag exactly as it
validates the same MESH_* variable or config.toml key. A field can refine its flag through
`json_schema_extra=cli(...)` (metavar, the default as users should read it, a short alias).
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from common.settings import NOT_FLAGS, Settings


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return f"MESH_{field.upper()}"


def _extra(info: FieldInfo) -> dict:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _base_types(annotation: Any) -> set[type]:
    """The plain types inside an annotation: `Annotated[list[str], NoDecode] | None` → {list, NoneType}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(_base_types(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {str}
    if origin is not None:
        return {origin}
    return {annotation}


def literal_choices(annotation: Any) -> list[str] | None:
    """The allowed values of a `Literal[...]` field (inside Annotated / Optional), else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if origin is typing.Annotated:
        return literal_choices(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            if (found := literal_choices(arg)) is not None:
                return found
    return None


def is_list(info: FieldInfo) -> bool:
    return list in _base_types(info.annotation)


def is_bool(info: FieldInfo) -> bool:
    return _base_types(info.annotation) - {type(None)} == {bool}


def default_text(info: FieldInfo) -> str:
    """The default as the help and the README show it."""
    extra = _extra(info)
    if "default" in extra:
        return str(extra["default"])
    value = info.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "none"
    if isinstance(value, Path):
        return str(value)
    return str(value)


def metavar(name: str, info: FieldInfo) -> str:
    extra = _extra(info)
    if "metavar" in extra:
        return extra["metavar"]
    choices = literal_choices(info.annotation)
    if choices:
        return "{" + ",".join(choices) + "}"
    types = _base_types(info.annotation) - {type(None)}
    if Path in types:
        return "PATH"
    if types <= {int}:
        return "N"
    return name.upper()


def settings_env_names() -> set[str]:
    """MESH_* names of every setting (flags or not)."""
    return {env_name(name) for name in Settings.model_fields}


def flag_fields() -> dict[str, FieldInfo]:
    return {name: info for name, info in Settings.model_fields.items() if name not in NOT_FLAGS}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; an unset flag stays None so env and config.toml still apply."""
    for name, info in flag_fields().items():
        extra = _extra(info)
        names = ([extra["short"]] if "short" in extra else []) + [flag_name(name)]
        help_text = f"{info.description or name} (default: {default_text(info)}; {env_name(name)})"
        help_text = help_text.replace("%", "%%")
        if is_bool(info):
            action = argparse.BooleanOptionalAction if info.default is True else "store_true"
            parser.add_argument(*names, dest=name, action=action, default=None, help=help_text)
        elif is_list(info):
            parser.add_argument(*names, dest=name, action="append", default=None, metavar=metavar(name, info),
                                help=help_text + "; repeatable")
        else:
            parser.add_argument(*names, dest=name, default=None, metavar=metavar(name, info), help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings values the command line gave (flags not given are left out)."""
    out = {}
    for name in flag_fields():
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def readme_rows(extra_rows: list[tuple[str, str, str]] = ()) -> list[str]:
    """The README's flag table, as `| flag | default | meaning |` rows (`python -m common.settings_cli`)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for name, info in flag_fields().items():
        extra = _extra(info)
        flag = flag_name(name)
        if not is_bool(info):
            flag += f" {metavar(name, info)}"
        if "short" in extra:
            flag = f"{extra['short']}, {flag}"
        meaning = (info.description or "") + ("; repeatable" if is_list(info) else "")
        rows.append(f"| `{flag}` | {default_text(info)} | {meaning} |")
    for flag, default, meaning in extra_rows:
        rows.append(f"| `{flag}` | {default} | {meaning} |")
    return rows


# meshctl's own options of `up` (not settings), as the README lists them.
MESHCTL_ROWS = [("-d, --detach", "off", "run in the background")]
README_START, README_END = "<!-- flags: python -m common.settings_cli --write README.md -->", "<!-- /flags -->"


def write_readme_table(readme: Path) -> None:
    text = readme.read_text()
    head, found, rest = text.partition(README_START)
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise SystemExit(f"error: {readme} has no {README_START} … {README_END} block")
    table = "\n".join(readme_rows(MESHCTL_ROWS))
    readme.write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}")


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--write"]:
        write_readme_table(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        print("\n".join(readme_rows(MESHCTL_ROWS)))
