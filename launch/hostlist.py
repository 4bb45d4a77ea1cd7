"""Expands a SLURM node list (`gpu[01-03,07],login1`) into host names, as `scontrol show
hostnames` does; the SLURM templates use it where scontrol is not installed (dry runs, tests).

    python -m launch.hostlist 'gpu[01-02]' [--first]
"""
from __future__ import annotations

import re
import sys


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in node list {s!r}")
    return out + [cur] if cur else out


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    names = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in node list item {item!r}")
        width = len(lo)  # zero padding follows the lower bound, like SLURM
        for i in range(int(lo), int(hi or lo) + 1):
            names.append(f"{head}{i:0{width}d}")
    return [n + rest for n in names for rest in _expand_one(tail)]


def expand(nodelist: str) -> list[str]:
    return [h for item in _split_top(nodelist.strip()) for h in _expand_one(item)]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    first = "--first" in args
    args = [a for a in args if a != "--first"]
    if len(args) != 1:
        print("usage: python -m launch.hostlist NODELIST [--first]", file=sys.stderr)
        return 2
    try:
        hosts = expand(args[0])
    except ValueError as e:
        print(f"hostlist: {e}", file=sys.stderr)
        return 2
    print("\n".join(hosts[:1] if first else hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
