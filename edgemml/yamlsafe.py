"""Reading YAML that a hostile user may have written: bounded in size, values, depth and aliases.

Why a module of its own: pipeline files, `edgemml validate` files and `--set` values all go
through yaml.SafeLoader, which is safe from code execution but not from exhaustion. A 484-byte file
of nested aliases ("billion laughs") expands to billions of values; `x: &x [*x]` to an infinite
one; a 5-million-item list took 195 s and 4.8 GB. The limits below are far above any real pipeline
(a few hundred values) and are counted while the parser runs, so a hostile file costs little.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from edgemml.errors import ConfigError, InputError
from edgemml.paths import os_error

MAX_PIPELINE_BYTES = 4 * 1024 * 1024
MAX_YAML_VALUES = 100_000  # counted with aliases expanded
MAX_YAML_DEPTH = 64


class YamlLimit(yaml.MarkedYAMLError):
    """A pipeline file over one of the limits above (not a syntax error)."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts while it composes: values with aliases expanded, nesting depth,
    and aliases that point into their own anchor (recursion). The count stops the parser as soon
    as a limit is passed, so a hostile file costs a few thousand values of work, not gigabytes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded
        self._total = 0
        self._depth = 0

    def _count(self, n: int, mark: Any) -> None:
        self._total += n
        if self._total > MAX_YAML_VALUES:
            raise YamlLimit(None, None, f"more than {MAX_YAML_VALUES:,} values (aliases "
                             f"expanded); a pipeline file is far smaller", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise YamlLimit(None, None, f"alias *{event.anchor} refers to a value that "
                                 f"contains it (recursive structures are not allowed)",
                                 event.start_mark)
            node = super().compose_node(parent, index)
            self._count(self._sizes[id(node)], event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlLimit(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                             self.peek_event().start_mark)
        start = self._total
        self._count(1, self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = self._total - start  # itself and everything below it
        return node


def compose(text: str) -> tuple[Any, Any]:
    """(data, node) of one YAML document, within the limits of _BoundedLoader."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def read_yaml_text(path: Path, what: str = "pipeline file") -> str:
    """The text of a pipeline (or validation) file: a regular file of at most MAX_PIPELINE_BYTES,
    UTF-8; checked before it is read, so /dev/zero or a 5 GB file is refused at once."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}",
                         hint="give the path of a pipeline.yaml, e.g. pipelines/quickstart.yaml") \
            from None
    except OSError as exc:
        raise os_error(exc, path, doing=f"read the {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {path} is not a regular file",
                         hint="give the path of a YAML file")
    if st.st_size > MAX_PIPELINE_BYTES:
        raise ConfigError(f"{what} is {st.st_size / 1e6:.1f} MB; the limit is "
                          f"{MAX_PIPELINE_BYTES / 1e6:.1f} MB", file=str(path),
                          hint="a pipeline file holds settings, not data: point at data files")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PIPELINE_BYTES + 1)
    except OSError as exc:
        raise os_error(exc, path, doing=f"read the {what}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                          file=str(path), line=line, hint="save the file as UTF-8") from None
