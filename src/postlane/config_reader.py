"""Reading a configuration's values: ``${VAR}`` references, ``KEY_file`` keys, the
environment's overrides, and each key through its reader (:mod:`postlane.toml_values`), with
every secret met remembered so that no error shows one.

:mod:`postlane.config` says what the sections and keys are; a :class:`Reader` reads them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from postlane import toml_values
from postlane.errors import ConfigError
from postlane.redact import is_secret_key, url_secrets

T = TypeVar("T")

#: ``${VAR}``, ``${VAR:-default}`` and ``$$``; any other ``$`` is itself (``scrypt$...``)
_REFERENCE = re.compile(r"\$(?:(\$)|\{([^}]*)\}|(\{))")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


@dataclass(frozen=True)
class Given:
    """A key's value as given, before its reader checks it."""

    value: Any
    #: what an error names: the key, the ``KEY_file`` key or the environment variable
    origin: str
    #: text from the environment, a file or a ``${VAR}``: read as the environment's values are
    #: (``"5"`` may be the number 5, ``"a,b"`` a list)
    text: bool = False


def kind(spec: dataclasses.Field[Any]) -> type:
    """list, dict or str: what shape a key's value has (by its default)."""
    if spec.default_factory is not dataclasses.MISSING:
        return type(spec.default_factory())
    return str


def has_file_form(spec: dataclasses.Field[Any]) -> bool:
    return bool(spec.metadata.get("file")) or is_secret_key(spec.name)


def _text_candidates(text: str) -> Iterator[Any]:
    """What a string from the environment may stand for, in order: itself, a number, a
    boolean, a comma-separated list, a table of ``name:value`` pairs."""
    yield text
    if re.fullmatch(r"[+-]?\d+", text):
        yield int(text)
    elif re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?", text):
        yield float(text)
    if text.lower() in ("true", "false"):
        yield text.lower() == "true"
    parts = [part.strip() for part in text.split(",") if part.strip()]
    yield parts
    if parts and all(":" in part for part in parts):
        yield dict(_pair(part) for part in parts)


def _pair(text: str) -> tuple[str, str]:
    """``name:value`` -> (name, value)."""
    name, _, value = text.partition(":")
    return name.strip(), value.strip()


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


class Reader:
    """Reads one configuration: ``${VAR}`` references, ``KEY_file`` keys, the environment's
    overrides, and every value through its key's reader; remembers each secret it meets, so
    that no error it raises shows one (nor any later message: :attr:`Config.secrets`)."""

    def __init__(
        self,
        env: Mapping[str, str],
        base_dir: Path,
        overrides: Mapping[str, Mapping[str, tuple[str, str]]],
    ) -> None:
        self.env = env
        self.base_dir = base_dir
        self.secrets: set[str] = set()
        #: the ``POSTLANE_*`` variables that set keys: {section: {key: (variable, text)}}
        self.overrides = overrides
        for section in self.overrides.values():
            for key, (_variable, text) in section.items():
                self.remember(key, text)

    def remember(self, key: str, value: Any, *, secret: bool = False) -> None:
        """Keep the secrets of a value: all of it for a secret key, the credentials of URLs."""
        secret = secret or is_secret_key(key)
        for leaf in _leaves(value):
            if isinstance(leaf, str):
                found = ({leaf} if secret else set()) | (
                    url_secrets(leaf) if "://" in leaf else set()
                )
                # a ${VAR} reference is no secret (its value, once expanded, is remembered)
                self.secrets.update(part for part in found if "${" not in part)
            elif secret and isinstance(leaf, int | float) and not isinstance(leaf, bool):
                self.secrets.add(str(leaf))

    def remember_tree(self, data: Any, key: str = "") -> None:
        if isinstance(data, Mapping):
            for name, value in data.items():
                self.remember_tree(value, str(name))
        elif isinstance(data, list):
            for item in data:
                self.remember_tree(item, key)
        else:
            self.remember(key, data)

    # -- ${VAR} and KEY_file ------------------------------------------------------------------

    def expand(self, value: Any, where: str) -> tuple[Any, bool]:
        """``value`` with ``${VAR}`` replaced in its strings (lists and tables too), and
        whether any was."""
        if isinstance(value, str):
            return self._expand_string(value, where)
        if isinstance(value, list):
            items = [self.expand(item, f"{where}[{n}]") for n, item in enumerate(value, 1)]
            return [item for item, _ in items], any(changed for _, changed in items)
        if isinstance(value, Mapping):
            pairs = {k: self.expand(v, f"{where}.{k}") for k, v in value.items()}
            return {k: v for k, (v, _) in pairs.items()}, any(c for _, c in pairs.values())
        return value, False

    def _expand_string(self, text: str, where: str) -> tuple[str, bool]:
        expanded = False

        def substitute(match: re.Match[str]) -> str:
            nonlocal expanded
            if match[1]:
                return "$"
            reference = _VARIABLE.fullmatch(match[2] or "") if match[3] is None else None
            if reference is None:
                raise ConfigError(
                    f"{where}: {match[0]!r} is not a reference like ${{VAR}} (write $$ for a $)"
                )
            name, default = reference[1], reference[2]
            found = self.env.get(name)
            if found is None or (default is not None and found == ""):
                if default is None:
                    raise ConfigError(
                        f"{where}: the environment variable {name} is not set (set it, or "
                        f"write $${{{name}}} for the text ${{{name}}} itself)"
                    )
                found = default
            expanded = True
            return found

        return _REFERENCE.sub(substitute, text), expanded

    def read_file(self, path_value: Any, kind: type, where: str) -> Any:
        """The value a ``KEY_file`` key names: the file's text, trimmed (a list: its lines;
        a table: its ``name:value`` lines)."""
        path_text, _ = self.expand(path_value, where)
        if not isinstance(path_text, str) or not path_text:
            raise ConfigError(f"{where}: expected the path of a file, got {path_text!r}")
        path = Path(path_text).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        try:
            content = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{where}: cannot read {path}: {reason}") from None
        if not content:
            raise ConfigError(f"{where}: {path} is empty")
        lines = [line.strip() for line in content.splitlines() if line.strip()]
        if kind is tuple:
            value: Any = lines
        elif kind is dict:
            if not all(":" in line for line in lines):
                raise ConfigError(f"{where}: {path}: expected one name:value line per entry")
            value = dict(_pair(line) for line in lines)
        else:
            value = content
        self.remember(where, value, secret=True)
        return value

    # -- sections -------------------------------------------------------------------------------

    def section(self, cls: type[T], table: Any, prefix: str) -> T:
        """A section (or one named table) read as a ``cls``: the file's keys, then the
        environment's (which replace them)."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{prefix}: expected a table ([{prefix}]), got {table!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        given = self._from_file(table, fields, prefix)
        given.update(self._from_environment(self.overrides.get(prefix, {}), fields, prefix))
        values = {key: self.parse(fields[key], item) for key, item in given.items()}
        return cls(**values)

    def _from_file(
        self, table: Mapping[str, Any], fields: Mapping[str, dataclasses.Field[Any]], prefix: str
    ) -> dict[str, Given]:
        given: dict[str, Given] = {}
        for key, raw in table.items():
            where = f"{prefix}.{key}"
            if (base := _file_form_of(key, fields)) is not None:
                if base in table:
                    raise ConfigError(f"give {prefix}.{base} or {where}, not both")
                given[base] = self._secret_file(raw, fields[base], where)
            elif key in fields:
                self.remember(key, raw)
                value, expanded = self.expand(raw, where)
                self.remember(key, value)
                given[key] = Given(value, where, text=expanded and isinstance(value, str))
            else:
                known = ", ".join(known_keys(fields))
                raise ConfigError(f"unknown key {where} (known keys in [{prefix}]: {known})")
        return given

    def _from_environment(
        self,
        variables: Mapping[str, tuple[str, str]],
        fields: Mapping[str, dataclasses.Field[Any]],
        prefix: str,
    ) -> dict[str, Given]:
        given: dict[str, Given] = {}
        for key, (variable, text) in variables.items():
            if (base := _file_form_of(key, fields)) is not None:
                if base in variables:
                    raise ConfigError(f"give {variables[base][0]} or {variable}, not both")
                given[base] = self._secret_file(text, fields[base], variable)
            elif key in fields:
                if not fields[key].metadata.get("env", True):
                    raise ConfigError(f"{variable}: this key cannot be set from the environment")
                given[key] = Given(text, variable, text=True)
            else:
                raise ConfigError(f"unknown setting {variable} (no key {prefix}.{key} to set)")
        return given

    def _secret_file(self, path: Any, spec: dataclasses.Field[Any], where: str) -> Given:
        """A key's value read from the file a ``KEY_file`` form names."""
        return Given(self.read_file(path, kind(spec), where), where, text=kind(spec) is str)

    def parse(self, spec: dataclasses.Field[Any], given: Given) -> Any:
        """The value ``spec``'s reader makes of ``given`` (text: of the first reading of it
        that the reader takes); a ConfigError naming where it came from, never the value of
        a secret."""
        candidates = _text_candidates(given.value) if given.text else iter([given.value])
        first_error: ValueError | None = None
        for raw in candidates:
            try:
                return spec.metadata["parse"](raw)
            except ValueError as exc:
                first_error = first_error or exc
        assert first_error is not None
        if is_secret_key(spec.name):
            problem = (
                first_error.without_value()
                if isinstance(first_error, toml_values.UnexpectedValue)
                else "not a valid value (not shown: it is a secret)"
            )
        else:
            problem = str(first_error)
        raise ConfigError(f"{given.origin}: {problem}")

    def tables_by_name(
        self,
        data: Mapping[str, Any],
        name: str,
        cls: type[T],
        example: str,
        check: Callable[[T, str], None] | None = None,
    ) -> dict[str, T]:
        """``[name.KEY]`` tables (``[destinations.google]``), each read as a ``cls`` and passed to
        ``check``, which raises ConfigError for what the keys alone cannot say."""
        tables = data.get(name, {})
        if not isinstance(tables, Mapping):
            raise ConfigError(f"{name}: expected tables like [{name}.{example}]")
        items: dict[str, T] = {}
        for key, table in tables.items():
            where = f"{name}.{key}"
            item = self.section(cls, table, where)
            if check is not None:
                check(item, where)
            items[str(key)] = item
        return items

    def array_of_tables(
        self,
        data: Mapping[str, Any],
        name: str,
        cls: type[T],
        check: Callable[[T, str], None],
    ) -> tuple[T, ...]:
        """``[[name]]`` tables (``[[routes]]``), each read as a ``cls`` and passed to ``check``."""
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{name}: expected [[{name}]] tables")
        items = []
        for number, table in enumerate(entries, 1):
            where = f"{name}[{number}]"
            item = self.section(cls, table, where)
            check(item, where)
            items.append(item)
        return tuple(items)

    def resolved(
        self, table: Mapping[str, Any], where: str, file_keys: Collection[str]
    ) -> dict[str, Any]:
        """A ``[webhooks]`` table's values with ``${VAR}`` expanded and each ``KEY_file`` of
        ``file_keys`` read (the secrets remembered, so no error shows them)."""
        resolved: dict[str, Any] = {}
        for key, raw in table.items():
            base = key.removesuffix("_file")
            if key != base and base in file_keys:
                if base in table:
                    raise ConfigError(f"give {where}.{base} or {where}.{key}, not both")
                resolved[base] = self.read_file(raw, str, f"{where}.{key}")
                continue
            self.remember(key, raw)
            value, _ = self.expand(raw, f"{where}.{key}")
            self.remember(key, value)
            resolved[key] = value
        return resolved


def _file_form_of(key: str, fields: Mapping[str, dataclasses.Field[Any]]) -> str | None:
    """The key that ``key`` is the ``KEY_file`` form of, or None."""
    base = key.removesuffix("_file")
    if key not in fields and base in fields and has_file_form(fields[base]):
        return base
    return None


def known_keys(fields: Mapping[str, dataclasses.Field[Any]]) -> list[str]:
    names = set(fields)
    names |= {f"{name}_file" for name, spec in fields.items() if has_file_form(spec)}
    return sorted(names)
