"""
Reading ini files into sections that remember where each value came from,
and typed section readers that collect every problem instead of stopping at
the first.
"""

from __future__ import annotations

import configparser
import glob
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from attrs import define, field, frozen

T = TypeVar("T")


@frozen
class ConfigProblem:
    """
    One thing wrong with the configuration, located as precisely as possible.
    """

    file: str
    section: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.section is not None:
            where += f": [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """
    The configuration is invalid; C{problems} lists everything found.
    """

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@frozen
class RawValue:
    """
    A value as written, with the file that set it.
    """

    text: str
    file: str


@define
class RawSection:
    """
    A section merged from every file that mentions it.
    """

    name: str
    file: str
    values: dict[str, RawValue] = field(factory=dict)


@define
class RawConfig:
    """
    Every section read from the main file and its includes, in file order.
    """

    main_file: str
    files: list[str] = field(factory=list)
    sections: dict[str, RawSection] = field(factory=dict)


def read_ini(path: str, problems: list[ConfigProblem]) -> RawConfig:
    """
    Read C{path} and the files its C{[appliance] include} globs name.

    Later files override keys set by earlier ones. Problems (unreadable
    files, syntax errors) are appended to C{problems}.
    """
    main = os.path.abspath(path)
    raw = RawConfig(main_file=main)
    _read_one(main, raw, problems)
    appliance = raw.sections.get("appliance")
    if appliance is not None and "include" in appliance.values:
        include = appliance.values.pop("include")
        base = os.path.dirname(include.file)
        for pattern in _split_patterns(include.text):
            full = os.path.join(base, pattern)
            matched = sorted(glob.glob(full))
            if not matched and not glob.has_magic(full):
                problems.append(
                    ConfigProblem(include.file, "appliance", "include",
                                  f"included file {full} does not exist")
                )
            for included in matched:
                _read_one(os.path.abspath(included), raw, problems, nested=True)
    return raw


def _split_patterns(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def _read_one(
    path: str, raw: RawConfig, problems: list[ConfigProblem], nested: bool = False
) -> None:
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        default_section="\x00no-default-section",
    )
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except OSError as error:
        problems.append(ConfigProblem(path, None, None, f"cannot read: {error.strerror}"))
        return
    except UnicodeDecodeError:
        problems.append(ConfigProblem(path, None, None, "is not valid UTF-8"))
        return
    except configparser.Error as error:
        problems.append(ConfigProblem(path, None, None, _describe_parse_error(error)))
        return
    raw.files.append(path)
    for name in parser.sections():
        section = raw.sections.get(name)
        if section is None:
            section = raw.sections[name] = RawSection(name=name, file=path)
        for key, text in parser.items(name, raw=True):
            if nested and name == "appliance" and key == "include":
                problems.append(
                    ConfigProblem(path, name, key, "only the main file may include others")
                )
                continue
            section.values[key] = RawValue(text=text, file=path)


def _describe_parse_error(error: configparser.Error) -> str:
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: a value before any [section] header"
    if isinstance(error, configparser.DuplicateSectionError):
        return f"line {error.lineno}: section [{error.section}] appears twice"
    if isinstance(error, configparser.DuplicateOptionError):
        return (f"line {error.lineno}: [{error.section}] {error.option} "
                "is set twice")
    if isinstance(error, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in error.errors)
        return f"cannot parse line(s) {lines}: expected 'key = value'"
    return f"cannot parse: {error.message}"


class _Missing:
    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Missing()
"""Returned by a reader for a value that had a problem; never used further."""

_REQUIRED: Any = object()


@define(eq=False)
class Section:
    """
    Typed, problem-collecting access to one section.

    Each read marks the key as known; L{finish} reports the keys nobody read.
    A bad value is recorded as a problem and L{INVALID} is returned, so a
    parser reads every key and the operator sees every problem in one run.
    """

    raw: RawSection
    problems: list[ConfigProblem]
    config: ConfigReader
    _read: set[str] = field(factory=set)

    @property
    def name(self) -> str:
        """The section's name as written in the ini file."""
        return self.raw.name

    @property
    def file(self) -> str:
        """The file that first declared this section."""
        return self.raw.file

    def has(self, key: str) -> bool:
        """Whether C{key} is set in this section."""
        return key in self.raw.values

    def get(
        self, key: str, convert: Callable[[str], T] = str,  # type: ignore[assignment]
        default: Any = _REQUIRED,
    ) -> T:
        """
        Read C{key} converted by C{convert}, or C{default} when unset.

        Without a default the key is required.
        """
        self._read.add(key)
        raw = self.raw.values.get(key)
        if raw is None:
            if default is _REQUIRED:
                self.problem(key, "is required", file=self.raw.file)
                return INVALID  # type: ignore[no-any-return]
            return default  # type: ignore[no-any-return]
        try:
            return convert(raw.text)
        except ValueError as error:
            self.problem(key, str(error), file=raw.file)
            return INVALID  # type: ignore[no-any-return]

    def secret(self, key: str, default: Any = _REQUIRED) -> Any:
        """
        Read a secret reference (C{${env:NAME}} or C{file:/path}) and
        resolve it; required unless a default (usually None) is given.
        """
        from appliance.host.values import resolve_secret

        environ = self.config.environ
        raw = self.raw.values.get(key)
        base = os.path.dirname(raw.file if raw is not None else self.raw.file)
        return self.get(key, lambda text: resolve_secret(text, environ, base), default)

    def reference(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """
        Read the name of a C{[kind:NAME]} section (a shared TLS context, say)
        and check that the section exists.
        """
        name = self.get(key, str, default)
        if name is INVALID or name is None or name == default:
            return name
        name = name.strip()
        if not self.config.present(f"{kind}:{name}"):
            self.problem(key, f"there is no [{kind}:{name}] section")
            return INVALID
        return name

    def problem(self, key: str | None, message: str, file: str | None = None) -> None:
        """
        Record a problem with C{key} (or the whole section when None).
        """
        if file is None:
            raw = self.raw.values.get(key) if key is not None else None
            file = raw.file if raw is not None else self.raw.file
        self.problems.append(ConfigProblem(file, self.raw.name, key, message))

    def children(self, kind: str) -> Iterator[tuple[str, Section]]:
        """
        Yield C{(label, section)} for each C{[<name>.<kind>:<label>]} section.
        """
        prefix = f"{self.raw.name}.{kind}:"
        for name in list(self.config.raw.sections):
            if name.startswith(prefix):
                label = name[len(prefix):]
                child = self.config.section(name)
                if not label:
                    child.problem(None, "needs a name after the colon")
                    continue
                yield label, child

    def keys(self) -> list[str]:
        """The keys set in this section."""
        return list(self.raw.values)

    def known_keys(self) -> set[str]:
        """The keys some reader asked for so far."""
        return set(self._read)

    def mark_read(self, key: str) -> None:
        """Mark C{key} as known without reading it (e.g. free-form tables)."""
        self._read.add(key)

    def finish(self) -> None:
        """
        Report each key that no reader asked for as unknown.
        """
        for key, raw in self.raw.values.items():
            if key not in self._read:
                self.problems.append(
                    ConfigProblem(raw.file, self.raw.name, key, "unknown key")
                )


@define(eq=False)
class ConfigReader:
    """
    Hands out L{Section} readers and reports unclaimed sections.
    """

    raw: RawConfig
    problems: list[ConfigProblem]
    environ: Mapping[str, str] | None = None
    _claimed: dict[str, Section] = field(factory=dict)

    def section(self, name: str) -> Section:
        """
        Claim section C{name} (an empty one if the files do not have it).
        """
        existing = self._claimed.get(name)
        if existing is not None:
            return existing
        raw = self.raw.sections.get(name) or RawSection(name=name, file=self.raw.main_file)
        reader = Section(raw=raw, problems=self.problems, config=self)
        self._claimed[name] = reader
        return reader

    def present(self, name: str) -> bool:
        """Whether section C{name} appears in any file."""
        return name in self.raw.sections

    def labelled(self, kind: str) -> list[tuple[str, Section]]:
        """Claim and return every C{[kind:LABEL]} section as (label, section)."""
        found = []
        for name in list(self.raw.sections):
            if name.startswith(kind + ":"):
                label = name[len(kind) + 1:]
                section = self.section(name)
                if not label:
                    section.problem(None, "needs a name after the colon")
                    continue
                found.append((label, section))
        return found

    def finish(self) -> None:
        """
        Report unknown keys in claimed sections and every unclaimed section.
        """
        for reader in self._claimed.values():
            reader.finish()
        for name, raw in self.raw.sections.items():
            if name not in self._claimed:
                self.problems.append(
                    ConfigProblem(raw.file, name, None, "unknown section")
                )
