"""Where a config problem is: the line of the TOML file that its key path names.

tomllib keeps no positions, so the file's own lines are read once more: table headers
(`[server]`, `[[providers]]`, `[groups.free]`) and `key = value` lines give each key path
(`server.bind`, `providers[1].weight`) its line. A problem about a key that is missing points
at its table's header instead.
"""

from __future__ import annotations

import re
from collections import Counter

HEADER = re.compile(r"^\s*\[(\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
ASSIGNMENT = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")


def key_lines(text: str) -> dict[str, int]:
    """Key path -> 1-based line number, for every table header and plain `key =` line."""
    lines: dict[str, int] = {}
    table = ""
    arrays: Counter[str] = Counter()
    for number, line in enumerate(text.splitlines(), 1):
        header = HEADER.match(line)
        if header:
            name = header.group(2).replace('"', "").replace("'", "")
            if header.group(1):  # [[name]]: the next element of an array of tables
                table = f"{name}[{arrays[name]}]"
                arrays[name] += 1
            else:
                table = name
            lines.setdefault(table, number)
            continue
        assignment = ASSIGNMENT.match(line)
        if assignment:
            key = next(group for group in assignment.groups() if group is not None)
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def locate(problem: str, lines: dict[str, int]) -> int | None:
    """The line of a problem's key path ("providers[0].rmp: unknown key"), or of the nearest table above it."""
    path = problem.split(": ", 1)[0]
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


def with_lines(source: str, text: str, problems: list[str] | tuple[str, ...]) -> list[str]:
    """Each problem prefixed with `source:line:` where its line is known."""
    lines = key_lines(text)
    located = []
    for problem in problems:
        line = locate(problem, lines)
        located.append(f"{source}:{line}: {problem}" if line is not None else problem)
    return located
