"""python -m full.released: the released weights known by name, their kind, size and an example command;
`--urls`: each one's official URL and the cache path where a file fetched by hand goes."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from full.released import hub


def size_text(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--urls"]:  # for fetching by hand: name, official URL, where the cache wants the file
        for r in hub.RELEASES.values():
            print(f"{r.name}  {r.url}  {hub.cache_path(r.url)}")
        return 0
    if args:
        print("usage: python -m full.released [--urls]  (the released weights known by name; --urls: each "
              "one's official URL and cache path)", file=sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    root = hub.cache_root()
    print(f"Released weights by name, downloaded on first use into {root} ($CM_CACHE/weights; "
          f"${hub.MIRROR_ENV} fetches from a mirror). Size: of the cached file, '?' before it is downloaded.")
    rows = [(r.name, r.kind, size_text(hub.cached_size(r)), r.example) for r in hub.RELEASES.values()]
    widths = [max(len(row[i]) for row in [("name", "kind", "size"), *rows]) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(("name", "kind", "size"), widths)) + "  example")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
