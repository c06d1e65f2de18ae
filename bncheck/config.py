"""Settings from ``[tool.bncheck]`` in the nearest pyproject.toml (or ``--config FILE``), overridden by flags.

Keys follow ruff's conventions: ``select`` / ``extend-select`` / ``ignore`` take rule codes or prefixes (``BN``,
``BN00``, ``BN007``); where a code matches both, the more specific entry wins and ``ignore`` wins a tie.
``per-file-ignores`` maps a glob to codes. Every threshold of the checks is a key of its own (``min-variance``,
``drift-mean-shift-median``...).

A pyproject.toml found by the upward search belongs to the directory bncheck runs in (a cloned model repository
included), not to the person who runs it. Such a *discovered* file may narrow every other rule, but it cannot drop a
security code (BN1xx: what a pickle may run): the options it builds carry ``trusted``, the same settings without
it, and that alone decides the security codes. Only the command line, ``--config FILE`` and a library caller's own
``Options`` may drop them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from bncheck.checks import RULES, Thresholds
from bncheck.drift import DriftThresholds
from bncheck.errors import ConfigError
from bncheck.report import Severity


def _threshold_keys() -> dict[str, tuple[str | None, str, type]]:
    """Config key -> (sub-dataclass field or None, field name, type) for every threshold."""
    keys: dict[str, tuple[str | None, str, type]] = {}
    for f in dataclasses.fields(Thresholds):
        if f.name == "drift":
            for g in dataclasses.fields(DriftThresholds):
                if g.name != "eps":  # the same eps as the static checks: one key
                    keys["drift-" + g.name.replace("_", "-")] = ("drift", g.name, float)
        else:
            keys[f.name.replace("_", "-")] = (None, f.name, int if f.type in ("int", int) else float)
    return keys


THRESHOLD_KEYS = _threshold_keys()
# BN1xx: what a pickle may run. A settings file found by the upward search may not drop these.
SECURITY_PREFIX = "BN1"
ONLY_TRUSTED = "security codes are only ignored from the command line or --config"


def is_security_code(code: str) -> bool:
    """Whether ``code`` reports something a pickle may run (BN101 and every other BN1xx code)."""
    return code.startswith(SECURITY_PREFIX)


LIST_KEYS = ("select", "extend-select", "ignore", "exclude")
KNOWN_KEYS = frozenset({*LIST_KEYS, "fail-on", "per-file-ignores", *THRESHOLD_KEYS})


@dataclass(frozen=True, kw_only=True)
class RuleSelection:
    """Which rule codes are reported, globally and per file."""

    select: tuple[str, ...] = ("BN",)
    ignore: tuple[str, ...] = ()
    per_file_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    root: Path | None = None  # per-file-ignores globs are relative to this folder (the config file's)

    def _enabled(self, code: str, ignore: Sequence[str]) -> bool:
        chosen = max((len(p) for p in self.select if code.startswith(p)), default=-1)
        dropped = max((len(p) for p in ignore if code.startswith(p)), default=-1)
        return chosen > dropped

    def allows(self, code: str, path: str | None = None) -> bool:
        extra: list[str] = []
        if path is not None:
            for pattern, codes in self.per_file_ignores.items():
                if _path_matches(path, pattern, self.root):
                    extra.extend(codes)
        return self._enabled(code, (*self.ignore, *extra))


def _path_matches(path: str, pattern: str, root: Path | None) -> bool:
    candidates = {PurePath(path).as_posix()}
    if root is not None:
        with contextlib.suppress(ValueError):  # the file lies outside the config's folder
            candidates.add(Path(path).resolve().relative_to(root.resolve()).as_posix())
    if "/" not in pattern:
        candidates.add(PurePath(path).name)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


@dataclass(frozen=True, kw_only=True)
class SettingsFile:
    """The settings file a run read: where it is, whether bncheck found it by itself, and what it set."""

    path: Path
    # found by the upward search rather than passed with --config: it belongs to the directory, not to the person
    discovered: bool
    # every key it set, with its value as written
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """How the report names it: ``pyproject.toml at /repo`` or ``--config /path/bncheck.toml``."""
        return f"{self.path.name} at {self.path.parent}" if self.discovered else f"--config {self.path}"


@dataclass(frozen=True, kw_only=True)
class Options:
    """How ``bncheck.inspect()`` checks: what the settings file and the flags decide, as one frozen value."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    selection: RuleSelection = field(default_factory=RuleSelection)
    # the lowest severity that makes the report fail
    fail_on: Severity = Severity.ERROR
    # globs of files to skip when searching directories
    exclude: tuple[str, ...] = ()
    # files inspected in this many processes (same order, same result)
    jobs: int = 1
    # let torch unpickle (running its code) the local files bncheck's own reader cannot read; trusted files only
    unsafe_load: bool = False
    # keep every layer's statistics channel by channel in the report, for the formats that draw them (HTML)
    channel_values: bool = False
    # the settings file these options came from, if any
    config: SettingsFile | None = None
    # when ``config`` was discovered: the same options without it, whose selection and exclude globs alone decide
    # the security codes; None when every setting came from the command line, --config or the caller
    trusted: Options | None = None

    def verdict(self, code: str, path: str | None = None, *, excluded: bool = False) -> tuple[bool, str | None]:
        """Whether a finding of ``code`` in ``path`` is reported, and a note when it is reported only because a
        discovered config may not drop a security code. ``excluded``: the discovered config's exclude globs matched
        the file (which is still searched for security findings)."""
        wanted = not excluded and self.selection.allows(code, path)
        if wanted or self.trusted is None or not is_security_code(code):
            return wanted, None
        if not self.trusted.selection.allows(code, path):
            return False, None
        assert self.config is not None
        if excluded:
            tried = "exclude this file"
        elif self.selection.allows(code):
            tried = f"ignore {code} for this file"
        else:
            tried = f"{_drop_verb(self.selection, code)} {code}"
        return True, f"{self.config.name} tried to {tried}; {ONLY_TRUSTED}"

    def config_notes(self, codes: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What a discovered config changed, and which of the security ``codes`` it tried to drop and could not."""
        if self.config is None or not self.config.discovered or self.trusted is None:
            return (), ()
        name = self.config.name
        changed: tuple[str, ...] = ()
        if self.config.settings:
            changes = "; ".join(f"{key} = {value}" for key, value in self.config.settings)
            changed = (f"{name} changed the settings: {changes}",)
        notes = []
        security = [code for code in codes if is_security_code(code) and self.trusted.selection.allows(code)]
        for verb in ("deselect", "ignore"):
            dropped = [c for c in security if not self.selection.allows(c) and _drop_verb(self.selection, c) == verb]
            if dropped:
                notes.append(f"{name} tried to {verb} {', '.join(dropped)}; {ONLY_TRUSTED}")
        for pattern, ignored in self.selection.per_file_ignores.items():
            dropped = [c for c in security if any(c.startswith(p) for p in ignored)]
            if dropped and pattern not in self.trusted.selection.per_file_ignores:
                notes.append(f"{name} tried to ignore {', '.join(dropped)} in {pattern!r}; {ONLY_TRUSTED}")
        excluded = [glob for glob in self.exclude if glob not in self.trusted.exclude]
        if excluded:
            globs = ", ".join(repr(glob) for glob in excluded)
            notes.append(
                f"{name} tried to exclude {globs}: those files are still searched for security findings; "
                + ONLY_TRUSTED
            )
        return changed, tuple(notes)


def _drop_verb(selection: RuleSelection, code: str) -> str:
    """'deselect' when no select entry takes ``code``, else 'ignore'."""
    return "ignore" if any(code.startswith(p) for p in selection.select) else "deselect"


def _codes(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of rule codes or prefixes, got {value!r}")
    return tuple(_check_code(key, v) for v in value)


def _check_code(key: str, code: str) -> str:
    code = code.strip().upper()
    if not code or not any(rule.startswith(code) for rule in RULES):
        raise ConfigError(f"{key}: {code!r} matches no rule (known: {', '.join(RULES)})")
    return code


def _globs(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of glob patterns, got {value!r}")
    return tuple(value)


def _severity(key: str, value: Any) -> Severity:
    try:
        return Severity(str(value).lower())
    except ValueError:
        raise ConfigError(f"{key} must be one of error, warning, info; got {value!r}") from None


def _thresholds(table: Mapping[str, Any]) -> Thresholds:
    top: dict[str, Any] = {}
    drift: dict[str, Any] = {}
    for key, (group, name, kind) in THRESHOLD_KEYS.items():
        if key not in table:
            continue
        value = table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise ConfigError(f"{key} must be a {'whole ' if kind is int else ''}number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value!r}")
        (drift if group == "drift" else top)[name] = kind(value)
    if "eps" in top:
        drift["eps"] = top["eps"]
    return dataclasses.replace(Thresholds(**top), drift=DriftThresholds(**drift))


def parse_table(table: Mapping[str, Any], *, source: Path | None = None) -> Options:
    """Settings from a ``[tool.bncheck]`` table; an unknown key or a bad value is a ConfigError naming it."""
    unknown = sorted(set(table) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in [tool.bncheck] (known: {', '.join(sorted(KNOWN_KEYS))})")
    per_file: dict[str, tuple[str, ...]] = {}
    raw_per_file = table.get("per-file-ignores", {})
    if not isinstance(raw_per_file, dict):
        raise ConfigError("per-file-ignores must be a table of glob = [codes]")
    for pattern, codes in raw_per_file.items():
        per_file[pattern] = _codes(f"per-file-ignores.{pattern!r}", codes)
    select = _codes("select", table["select"]) if "select" in table else ("BN",)
    select += _codes("extend-select", table.get("extend-select", []))
    selection = RuleSelection(
        select=select,
        ignore=_codes("ignore", table.get("ignore", [])),
        per_file_ignores=per_file,
        root=source.parent if source else None,
    )
    return Options(
        selection=selection,
        fail_on=_severity("fail-on", table["fail-on"]) if "fail-on" in table else Severity.ERROR,
        thresholds=_thresholds(table),
        exclude=_globs("exclude", table.get("exclude", [])),
    )


# A settings file is a few hundred bytes; one beyond this is not worth parsing (TOML parsing time and memory grow
# with it, and the upward search reads whatever pyproject.toml a cloned folder holds).
MAX_CONFIG_BYTES = 1024 * 1024


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is too large ({size} bytes; at most {MAX_CONFIG_BYTES})")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    import tomllib  # only when there is a config to read: most runs have none

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc


def _read_toml(path: Path) -> dict[str, Any]:
    return _parse_toml(path, _read_text(path))


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml with a [tool.bncheck] table, searching upward from ``start``."""
    for folder in (start.resolve(), *start.resolve().parents):
        candidate = folder / "pyproject.toml"
        if not candidate.is_file():
            continue
        text = _read_text(candidate)
        # a table for bncheck, however it is spelled, names bncheck: the others need no parsing
        if "bncheck" in text and "bncheck" in _parse_toml(candidate, text).get("tool", {}):
            return candidate
    return None


def _as_written(table: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((key, json.dumps(value, default=str)) for key, value in table.items())


def load_settings(config: Path | None = None, *, cwd: Path | None = None) -> Options:
    """Settings from ``config`` (a pyproject.toml with [tool.bncheck], or a bncheck.toml holding the keys at top
    level), else from the nearest pyproject.toml above ``cwd``, else the defaults.

    Options from a discovered pyproject.toml carry ``trusted`` (the defaults), which alone decides the security
    codes: a file found in the directory bncheck runs in may not switch those off."""
    if config is not None:
        document = _read_toml(config)
        table = document.get("tool", {}).get("bncheck") if "tool" in document else document
        if not isinstance(table, dict):
            raise ConfigError(f"{config} has no [tool.bncheck] table")
        explicit = SettingsFile(path=config, discovered=False, settings=_as_written(table))
        return dataclasses.replace(parse_table(table, source=config), config=explicit)
    found = find_pyproject(cwd or Path.cwd())
    if found is None:
        return Options()
    table = _read_toml(found)["tool"]["bncheck"]
    discovered = SettingsFile(path=found, discovered=True, settings=_as_written(table))
    return dataclasses.replace(parse_table(table, source=found), config=discovered, trusted=Options())


def with_overrides(
    settings: Options,
    *,
    select: Sequence[str] | None = None,
    extend_select: Sequence[str] = (),
    ignore: Sequence[str] = (),
    fail_on: Severity | None = None,
    exclude: Sequence[str] = (),
    jobs: int = 1,
    unsafe_load: bool = False,
) -> Options:
    """Command-line flags over the file's settings: --select replaces, --extend-select / --ignore / --exclude add,
    --fail-on replaces; --jobs and --unsafe-load exist only as flags. The flags apply to ``trusted`` too: the
    command line may drop anything."""
    trusted = settings.trusted
    if trusted is not None:
        trusted = with_overrides(
            trusted, select=select, extend_select=extend_select, ignore=ignore, fail_on=fail_on, exclude=exclude
        )
    current = settings.selection
    chosen = tuple(_check_code("--select", c) for c in select) if select else current.select
    chosen += tuple(_check_code("--extend-select", c) for c in extend_select)
    selection = dataclasses.replace(
        current, select=chosen, ignore=current.ignore + tuple(_check_code("--ignore", c) for c in ignore)
    )
    return dataclasses.replace(
        settings,
        selection=selection,
        fail_on=fail_on or settings.fail_on,
        exclude=settings.exclude + tuple(exclude),
        jobs=jobs,
        unsafe_load=unsafe_load,
        trusted=trusted,
    )
