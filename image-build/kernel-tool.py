#!/usr/bin/env python3
"""Guest kernel configuration tool: fragment parsing, merge, verification, cache key, manifest.

Standard library only: it runs on the build host before any virtualenv exists.

Subcommands (used by build-kernel.sh):
  key       print the content-addressed cache key of a kernel build
  merge     write the requested options of one architecture as a KCONFIG_ALLCONFIG file
  verify    compare a final .config with the requested options; exit 1 naming every loss
  manifest  write kernel.json describing the built artefacts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Command-line architecture names -> kernel ARCH / fragment folder names.
KERNEL_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_VALUE_RE = re.compile(r'^(?:[ymn]|-?[0-9]+|0x[0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')
_ALLOW_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)\s+#\s*(\S.*)$")

# Bumped when the meaning of the cache key inputs changes.
_KEY_FORMAT = "kata-agent-py-kernel-key-v1"


class ConfigError(Exception):
    """A fragment, allow list or .config that cannot be used as given."""


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    value: str  # "y", "m", "n", a number, or a double-quoted string as written
    origin: str  # "file:line" for messages


def kernel_arch(arch: str) -> str:
    try:
        return KERNEL_ARCH[arch]
    except KeyError:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {sorted(KERNEL_ARCH)}") from None


def parse_config_text(text: str, source: str, *, strict: bool = True) -> list[Option]:
    """Parse .config syntax. Plain comments and blank lines are skipped.

    strict: every non-comment line must be an assignment with a valid value (fragments);
    a generated .config is read with strict=False only to tolerate future value forms.
    """
    options: list[Option] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        origin = f"{source}:{number}"
        if not line:
            continue
        unset = _UNSET_RE.match(line)
        if unset:
            options.append(Option(unset.group(1), "n", origin))
            continue
        if line.startswith("#"):
            continue
        match = _SET_RE.match(line)
        if not match:
            raise ConfigError(f"{origin}: not a CONFIG_ assignment: {line!r}")
        value = match.group(2)
        if strict and not _VALUE_RE.match(value):
            raise ConfigError(f"{origin}: bad value {value!r} for {match.group(1)}")
        options.append(Option(match.group(1), value, origin))
    return options


def fragment_files(config_dir: Path, karch: str) -> list[Path]:
    """Fragments applied for one kernel arch: common first, then the arch folder, sorted."""
    files: list[Path] = []
    for part in ("common", karch):
        folder = config_dir / "fragments" / part
        if not folder.is_dir():
            raise ConfigError(f"missing fragment folder {folder}")
        files.extend(sorted(folder.glob("*.conf")))
    return files


def requested_options(config_dir: Path, karch: str) -> dict[str, Option]:
    """All options requested for karch; the same option asked twice must agree."""
    merged: dict[str, Option] = {}
    conflicts: list[str] = []
    for path in fragment_files(config_dir, karch):
        rel = path.relative_to(config_dir).as_posix()
        for option in parse_config_text(path.read_text(encoding="utf-8"), rel):
            previous = merged.get(option.name)
            if previous is not None and previous.value != option.value:
                conflicts.append(
                    f"{option.name}: {previous.value} ({previous.origin}) "
                    f"vs {option.value} ({option.origin})"
                )
                continue
            merged.setdefault(option.name, option)
    if conflicts:
        raise ConfigError("conflicting requests:\n  " + "\n  ".join(conflicts))
    return merged


def parse_allow_list(text: str, source: str) -> dict[str, str]:
    """`CONFIG_X  # why it may be missing` per line; a bare name is an error."""
    allowed: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ALLOW_RE.match(line)
        if not match:
            raise ConfigError(f"{source}:{number}: allow-list entry needs a '# reason': {line!r}")
        if match.group(1) in allowed:
            raise ConfigError(f"{source}:{number}: {match.group(1)} listed twice")
        allowed[match.group(1)] = match.group(2).strip()
    return allowed


def render_allconfig(options: Iterable[Option]) -> str:
    lines = []
    for option in options:
        if option.value == "n":
            lines.append(f"# {option.name} is not set")
        else:
            lines.append(f"{option.name}={option.value}")
    return "\n".join(lines) + "\n"


def missing_options(
    requested: Mapping[str, Option], final: Mapping[str, str]
) -> list[tuple[Option, str]]:
    """Requested options whose final value differs; 'n' is met by an absent option."""
    lost: list[tuple[Option, str]] = []
    for name, option in sorted(requested.items()):
        got = final.get(name, "n")
        if got != option.value:
            lost.append((option, got))
    return lost


def key_inputs(
    source_id: str, config_dir: Path, build_script: Path, tool_script: Path, arch: str
) -> list[tuple[str, bytes]]:
    """Named inputs of the cache key; names are relative so a copied tree hashes the same."""
    karch = kernel_arch(arch)
    inputs: list[tuple[str, bytes]] = [
        ("format", _KEY_FORMAT.encode()),
        ("source", source_id.encode()),
        ("arch", arch.encode()),
    ]
    for path in sorted((config_dir / "fragments").rglob("*.conf")):
        # Every fragment counts, not only this arch's: simpler and never stale.
        inputs.append((f"fragment:{path.relative_to(config_dir).as_posix()}", path.read_bytes()))
    allow = config_dir / "allow-missing.txt"
    inputs.append(("allow-missing", allow.read_bytes() if allow.exists() else b""))
    inputs.append(("build-script", build_script.read_bytes()))
    inputs.append(("tool-script", tool_script.read_bytes()))
    inputs.append(("kernel-arch", karch.encode()))
    return inputs


def cache_key(
    source_id: str, config_dir: Path, build_script: Path, tool_script: Path, arch: str
) -> str:
    digest = hashlib.sha256()
    for name, data in key_inputs(source_id, config_dir, build_script, tool_script, arch):
        # Length-prefixed so that moving bytes between inputs changes the key.
        for part in (name.encode(), data):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cmd_key(args: argparse.Namespace) -> int:
    print(
        cache_key(
            args.source_id,
            Path(args.config_dir),
            Path(args.build_script),
            Path(__file__),
            args.arch,
        )
    )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    options = requested_options(Path(args.config_dir), kernel_arch(args.arch))
    Path(args.out).write_text(render_allconfig(options.values()), encoding="utf-8")
    print(f"merged {len(options)} requested options into {args.out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    config_dir = Path(args.config_dir)
    requested = requested_options(config_dir, kernel_arch(args.arch))
    allow_path = config_dir / "allow-missing.txt"
    allowed = (
        parse_allow_list(allow_path.read_text(encoding="utf-8"), allow_path.name)
        if allow_path.exists()
        else {}
    )
    final_path = Path(args.config)
    final = {
        o.name: o.value
        for o in parse_config_text(
            final_path.read_text(encoding="utf-8"), str(final_path), strict=False
        )
    }
    failures = 0
    for option, got in missing_options(requested, final):
        if option.name in allowed:
            print(
                f"allowed missing: {option.name}={option.value} (got {got}): {allowed[option.name]}"
            )
            continue
        failures += 1
        print(
            f"MISSING: {option.name}={option.value} requested at {option.origin}, "
            f"final value {got}",
            file=sys.stderr,
        )
    for name in sorted(set(allowed) & set(requested)):
        if final.get(name, "n") == requested[name].value:
            print(f"note: {name} is allow-listed but survived; the entry may be stale")
    if failures:
        print(f"{failures} requested option(s) did not survive olddefconfig", file=sys.stderr)
        return 1
    print(f"verified {len(requested)} requested options against {final_path}")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    files = {}
    for name in args.files:
        path = Path(args.dir) / name
        files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {
        "arch": args.arch,
        "kernel_arch": kernel_arch(args.arch),
        "version": args.version,
        "source": args.source_id,
        "cache_key": args.key,
        "config_sha256": file_sha256(Path(args.config)),
        "files": files,
    }
    out = Path(args.dir) / "kernel.json"
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("key")
    p.add_argument("--source-id", required=True)
    p.add_argument("--config-dir", required=True)
    p.add_argument("--build-script", required=True)
    p.add_argument("--arch", required=True)
    p.set_defaults(func=_cmd_key)

    p = sub.add_parser("merge")
    p.add_argument("--config-dir", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("verify")
    p.add_argument("--config-dir", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--config", required=True)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("manifest")
    p.add_argument("--dir", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--source-id", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_manifest)

    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
