"""Compare two run folders number for number: metrics.json and every units/*.json.

    python benchmarks/compare_runs.py A B [--rename old=new ...]

Used to show that a refactor changes no number: every value must be equal (floats bit for bit,
NaN equal to NaN), apart from the keys that measure time, memory, the host, the date or the
revision and the config hash (it hashes the config's key names, which a refactor may rename):
``treedaps.record.volatile``, the same filter the real-path suite uses. ``--rename old=new`` maps
a key of A to its new name in B (a dotted config key such as ``repulsion.end_timestep`` is renamed
wherever it appears as a dict key); the built-in ``RENAMES`` dict holds renames a refactor
introduced (the search: block of issue 9 renamed the unit record's ``resolved`` key of the
repulsion's end). Prints the first differences with their JSON path and exits 1 when any is
found, else prints ``identical`` and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from treedaps.record.volatile import volatile as ignored  # noqa: E402 - time, memory, host, date, hash

# config-key renames between the two runs (old name in A -> new name in B)
RENAMES: dict[str, str] = {"repulsion.end_timestep": "search.repulsion.end_timestep"}   # the search: block


def same_number(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a.hex() == b.hex()
    return a == b and type(a) is type(b)


def diff(a, b, path: str, renames: dict[str, str], out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        a = {renames.get(k, k): v for k, v in a.items()}
        keys = [k for k in dict.fromkeys([*a, *b]) if not ignored(k)]
        for k in keys:
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'A' if k in a else 'B'}")
            else:
                diff(a[k], b[k], f"{path}.{k}", renames, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", renames, out)
    elif not same_number(a, b):
        out.append(f"{path}: {a!r} != {b!r}")


def compare(a: Path, b: Path, renames: dict[str, str]) -> list[str]:
    out: list[str] = []
    names = ["metrics.json", *sorted(p.relative_to(a).as_posix() for p in (a / "units").glob("*.json"))]
    other = sorted(p.relative_to(b).as_posix() for p in (b / "units").glob("*.json"))
    if names[1:] != other:
        out.append(f"unit files differ: {names[1:]} vs {other}")
    for name in names:
        if not (b / name).exists():
            out.append(f"{name}: missing in B")
            continue
        diff(json.loads((a / name).read_text()), json.loads((b / name).read_text()), name, renames, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    args = parser.parse_args(argv)
    renames = dict(RENAMES)
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep:
            parser.error(f"--rename needs OLD=NEW, got {item!r}")
        renames[old] = new
    for folder in (args.a, args.b):
        if not (folder / "metrics.json").is_file():
            parser.error(f"{folder} has no metrics.json")
    problems = compare(args.a, args.b, renames)
    for line in problems[:40]:
        print(line)
    if problems:
        print(f"{len(problems)} difference(s)")
        return 1
    print("identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
