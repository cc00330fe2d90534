#!/usr/bin/env python3
"""Module dependency report: which modules of src/ name which, and every dependency cycle.

A module is a file (src/foo.rs is `foo`, src/git/mirror.rs is `git::mirror`, src/git/mod.rs is
`git`). A module depends on another when it names it by a `crate::…` or `super::…` path
anywhere in its text (use lines and inline paths alike; `#[cfg(test)]` modules included).
Naming one's own parent or child is allowed and not counted: a folder's mod.rs and its files
are one unit. Exits 1 when there is a cycle.

Usage: scripts/module-cycles.py [--edges]
"""

import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return parts[0]
    return "::".join(parts)


def main() -> int:
    files = {module_of(p): p for p in SRC.rglob("*.rs")}
    modules = set(files)

    def resolve(segments):
        """The longest prefix of `segments` that is a module."""
        for n in range(len(segments), 0, -1):
            name = "::".join(segments[:n])
            if name in modules:
                return name
        return None

    edges = {m: set() for m in modules}
    path_re = re.compile(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)")
    group_re = re.compile(r"\b(crate|super)::\{([^}]*)\}")
    for m, p in files.items():
        text = p.read_text()
        # Comments are not dependencies.
        text = re.sub(r"//[^\n]*", "", text)
        own = m.split("::") if m not in ("lib", "main") else []
        refs = []
        for kind, rest in path_re.findall(text):
            refs.append((kind, rest.strip(":").split("::")))
        for kind, group in group_re.findall(text):
            for item in group.split(","):
                item = item.strip().split(" as ")[0]
                if item and item[0].islower():
                    refs.append((kind, item.split("::")))
        for kind, segs in refs:
            if kind == "crate":
                target = resolve(segs)
            else:
                # `super` is the parent module, whether this file is a mod.rs or not.
                parent = own[:-1]
                target = resolve(parent + segs) or ("::".join(parent) or None)
            if not target or target == m or target in ("lib", "main"):
                continue
            # Parent and child are one unit.
            if target.startswith(m + "::") or m.startswith(target + "::"):
                continue
            edges[m].add(target)
        if m == "main":
            for t in re.findall(r"\bcratere::([a-z_]+)", text):
                if t in modules:
                    edges[m].add(t)

    if "--edges" in sys.argv:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
        print()

    # A folder is also one unit: `storage` stands for storage/*.rs, so a cycle that goes
    # through a folder's re-exports (usage -> storage -> storage::fs -> usage) is seen too.
    folders = {}
    for m, targets in edges.items():
        top = m.split("::")[0]
        folders.setdefault(top, set())
        for t in targets:
            if t.split("::")[0] != top:
                folders[top].add(t.split("::")[0])

    print(f"{len(modules)} modules, {sum(len(e) for e in edges.values())} dependencies")
    found = report("module", edges)
    found += report("top-level module", folders)
    if not found:
        print("no dependency cycle")
        return 0
    return 1


def report(what, edges):
    """Prints every cycle of `edges`; returns how many."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    for c in cycles:
        print(f"cycle of {len(c)} {what}s: {', '.join(c)}")
        for m in c:
            inner = sorted(t for t in edges[m] if t in c)
            print(f"  {m} -> {', '.join(inner)}")
    return len(cycles)


if __name__ == "__main__":
    sys.exit(main())
