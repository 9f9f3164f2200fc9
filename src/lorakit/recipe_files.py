"""Reading a recipe file (``lorakit train CONFIG``): TOML, or YAML read by YAML 1.2 rules.

PyYAML's ``safe_load`` follows YAML 1.1, which reads ``010`` as octal 8, ``1:30`` as the base-60
number 90, ``yes``/``on`` as true and ``1e-3`` as a string, and lets a repeated key silently
replace the first. ``RecipeLoader`` resolves plain scalars by the YAML 1.2 core schema instead:
``true``/``false``, ``null``/``~``, decimal integers (``0x`` hex and ``0o`` octal), and floats
with an optional exponent (``1e-3``, ``.inf``, ``.nan``); anything else is a string. An integer
with a leading zero (``010``: octal to YAML 1.1, ten to YAML 1.2) is refused, as are a repeated
key (naming it and both lines) and a key that is not a string. Errors name ``file:line:col``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError

SECTIONS = {"out_dir", "model", "data", "lora", "train"}
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_DROPPED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
            "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}  # fmt: skip


class RecipeError(InputError):
    """The training config is wrong; the message says where."""


def check_type(section: str, table: dict[str, Any], key: str, allowed: str, ok: Callable[[Any], bool]) -> None:
    """Refuse ``table[key]`` (when present) unless ``ok(value)``, naming ``[section] key``."""
    if key in table and not ok(table[key]):
        value = table[key]
        raise RecipeError(f"[{section}] {key} = {value!r} ({type(value).__name__}): expected {allowed}")


def check_keys(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    """Refuse keys of ``table`` outside ``allowed``, naming them and the allowed ones."""
    unknown = sorted(map(str, set(table) - allowed))
    if unknown:
        raise RecipeError(f"[{section}]: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _recipe_loader(path: Path) -> type:
    """A ``yaml.SafeLoader`` subclass with the YAML 1.2 core schema and no repeated keys; its
    errors are ``RecipeError``s naming ``path:line:col``."""
    import yaml

    def fail(node: Any, message: str) -> RecipeError:
        mark = node.start_mark
        return RecipeError(f"{path}:{mark.line + 1}:{mark.column + 1}: {message}")

    class RecipeLoader(yaml.SafeLoader):
        yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, re.Pattern[str]]]]] = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):  # the table's own keys; merged ones (<<) may be overridden
                seen: dict[str, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    if not isinstance(key, str):
                        raise fail(key_node, f"key {key!r} ({type(key).__name__}) is not a string; allowed: "
                                             "names (quote it to make it one)")  # fmt: skip
                    if key in seen:
                        raise fail(key_node, f"duplicate key {key!r} (first at line {seen[key]}); each key may "
                                             "appear once in a table")  # fmt: skip
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

        def construct_int(self, node: Any) -> int:
            text = str(self.construct_scalar(node))
            if _LEADING_ZERO.fullmatch(text):
                digits = text.lstrip("+-").lstrip("0") or "0"
                octal = f", or 0o{digits} (octal)" if set(digits) <= set("01234567") else ""
                raise fail(node, f"{text}: an integer with a leading zero is ambiguous (octal to YAML 1.1, decimal "
                                 f"to YAML 1.2); allowed: {digits} (decimal){octal}")  # fmt: skip
            if not _INT.fullmatch(text):
                raise fail(node, f"{text!r} is not an integer; allowed: decimal digits, 0x... or 0o...")
            if text.startswith(("0o", "0x")):
                return int(text[2:], 8 if text[1] == "o" else 16)
            return int(text)

        def construct_float(self, node: Any) -> float:
            text = str(self.construct_scalar(node))
            if not _FLOAT.fullmatch(text):
                raise fail(node, f"{text!r} is not a number; allowed: 0.001, 1.0e-3, 1e-3, .inf, .nan")
            lowered = text.lower()
            if lowered.endswith(".inf"):
                return float("-inf") if lowered.startswith("-") else float("inf")
            return float("nan") if lowered.endswith(".nan") else float(text)

        def construct_bool(self, node: Any) -> bool:
            text = str(self.construct_scalar(node))
            if not _BOOL.fullmatch(text):
                raise fail(node, f"{text!r} is not a boolean; allowed: true or false")
            return text.lower() == "true"

    def anchored(*patterns: re.Pattern[str]) -> re.Pattern[str]:  # resolvers use match(), not fullmatch()
        return re.compile("^(?:" + "|".join(p.pattern for p in patterns) + ")$")

    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", anchored(_BOOL), list("tTfF"))
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", anchored(_INT, _LEADING_ZERO), list("-+0123456789"))
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", anchored(_FLOAT), list("-+0123456789."))
    RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_int)
    RecipeLoader.add_constructor("tag:yaml.org,2002:float", RecipeLoader.construct_float)
    RecipeLoader.add_constructor("tag:yaml.org,2002:bool", RecipeLoader.construct_bool)
    return RecipeLoader


def load_yaml(path: Path, text: str) -> Any:
    """The YAML document in ``text`` (read from ``path``) by ``RecipeLoader``'s rules."""
    try:
        import yaml
    except ImportError:
        raise RecipeError(f"{path}: YAML configs need PyYAML (pip install pyyaml); TOML needs nothing") from None
    loader = _recipe_loader(path)(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = ": ".join(part for part in (err.context, err.problem) if part)
        raise RecipeError(f"{where}: not valid YAML: {problem or err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def read_config(path: str | Path) -> dict[str, Any]:
    """The recipe in ``path`` (``.yaml``/``.yml``: YAML, else TOML), its sections checked."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(path, text)
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{path}: not valid TOML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the config must be a table of sections")
    unknown = sorted(map(str, set(data) - SECTIONS))
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    for required in ("out_dir", "model", "data", "lora", "train"):
        if required not in data:
            raise RecipeError(f"{path}: missing {required!r}")
        if required != "out_dir" and not isinstance(data[required], dict):
            raise RecipeError(f"{path}: [{required}] must be a table of keys, got {type(data[required]).__name__}")
    if not isinstance(data["out_dir"], str) or not data["out_dir"]:
        raise RecipeError(f"{path}: out_dir = {data['out_dir']!r}: expected a non-empty path string")
    return data
