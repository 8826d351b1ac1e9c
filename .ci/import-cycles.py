#!/usr/bin/env python3
"""No import circles between the library's modules.

A module is a file of `src/` (the binaries under `src/bin/` are separate crates and are left out).
Every path a file names -- `use crate::...`, `use super::...`, `use self::...`, `use child::...`
in a module that declares `mod child;`, and the same paths written inline in code -- is resolved
to the file that defines what it names; a `pub use` is followed to where the item really lives.
Code under `#[cfg(test)]` is left out: a test may use anything.

The modules form a tree, and the check is made at every level of it. For each directory module
(the crate root, `kernels`, `residency`, `quant::q4_k`, ...) its children are the nodes of one
graph: a reference from a file anywhere inside child A to a file anywhere inside child B is an
edge A -> B. So `residency::store` naming `crate::residency::prefetch::Queue` is the edge
store -> prefetch in `residency`'s graph, and `model::moe` naming `crate::kernels::Matrix` is
the edge model -> kernels in the crate's graph. A directory module's own file (`mod.rs`) sits
above its children: it may re-export and use them, and they may use what it defines, so edges
between a module and its own children are not counted (they would make every `mod.rs` that
holds a shared type a circle).

Exits 1 and prints every circle, each edge with the file and line that makes it, when there is
one. `--self-test` runs the check on small planted trees first (a circle through `super::`,
through an inline `crate::` path, through a `pub use`, and a tree without one).

Usage: import-cycles.py [--self-test] [SRC_DIR]   (default: the repository's src/)
"""

import os
import re
import sys
import tempfile

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """Comments, strings and char literals replaced by spaces; newlines kept for line numbers."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return "".join(c if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 260]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_") or text[i - 1] == "b"):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append(blank(text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i:j + 1]))
            i = j + 1
        elif c == "'":
            if i + 1 < n and text[i + 1] == "\\":
                j = text.find("'", i + 2)
                out.append(blank(text[i:j + 1]))
                i = j + 1
            elif i + 2 < n and text[i + 2] == "'":
                out.append("   ")
                i += 3
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(text, i):
    """Index just past the `}` closing the `{` at i."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def drop_cfg_test(text):
    """Items under `#[cfg(test)]` blanked (newlines kept)."""
    pat = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
    while True:
        m = pat.search(text)
        if not m:
            return text
        i = m.end()
        # Further attributes on the same item.
        while True:
            a = re.match(r"\s*#\s*\[", text[i:])
            if not a:
                break
            depth, j = 0, i + a.end() - 1
            while j < len(text):
                depth += {"[": 1, "]": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            i = j
        if re.match(r"\s*(pub(\([^)]*\))?\s+)?use\b", text[i:]):
            end = text.find(";", i) + 1
        else:
            semi = text.find(";", i)
            brace = text.find("{", i)
            if brace >= 0 and (semi < 0 or brace < semi):
                end = matching_brace(text, brace)
            else:
                end = semi + 1
        text = text[:m.start()] + "".join(c if c == "\n" else " " for c in text[m.start():end]) + text[end:]


def expand_use_tree(tree):
    """`a::{b, c::{self, d as e}, f::*}` -> [(['a','b'], 'b'), (['a','c'], 'c'), (['a','c','d'], 'e'), (['a','f','*'], None)]."""
    tree = re.sub(r"\s+", " ", tree).strip()

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for c in s:
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            if c == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += c
        parts.append(cur)
        return [p.strip() for p in parts if p.strip()]

    def walk(prefix, s):
        s = s.strip()
        b = s.find("{")
        if b >= 0:
            head = s[:b].strip().rstrip(":").strip()
            segs = prefix + [x.strip() for x in head.split("::") if x.strip()]
            inner = s[b + 1:s.rfind("}")]
            res = []
            for part in split_top(inner):
                res += walk(segs, part)
            return res
        alias = None
        m = re.match(r"(.*?)\s+as\s+(" + IDENT + r")$", s)
        if m:
            s, alias = m.group(1), m.group(2)
        segs = prefix + [x.strip() for x in s.split("::") if x.strip()]
        if segs and segs[-1] == "self":
            segs = segs[:-1]
        if not segs:
            return []
        if segs[-1] == "*":
            return [(segs, None)]
        return [(segs, alias or segs[-1])]

    return walk([], tree)


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module path (tuple) -> relative file name
        for root, dirs, names in os.walk(src):
            rel_root = os.path.relpath(root, src)
            if rel_root == "bin" or rel_root.startswith("bin" + os.sep):
                continue
            for name in names:
                if not name.endswith(".rs"):
                    continue
                rel = os.path.normpath(os.path.join(rel_root, name))
                parts = rel[:-3].split(os.sep)
                if parts == ["lib"] or parts == ["main"]:
                    mod = ()
                elif parts[-1] == "mod":
                    mod = tuple(parts[:-1])
                else:
                    mod = tuple(parts)
                self.files[mod] = rel
        self.text = {}
        for mod, rel in self.files.items():
            with open(os.path.join(src, rel), encoding="utf-8") as f:
                self.text[mod] = drop_cfg_test(strip(f.read()))
        self.uses = {m: self.parse_uses(m) for m in self.files}
        # Re-exports: module -> name -> absolute path it stands for.
        self.reexports = {m: {} for m in self.files}
        for m, uses in self.uses.items():
            for line, public, segs, name in uses:
                if public and name:
                    target = self.absolute(m, segs)
                    if target is not None:
                        self.reexports[m][name] = target

    def parse_uses(self, mod):
        text = self.text[mod]
        res = []
        for m in re.finditer(r"(?<![\w:])(pub(?:\s*\([^)]*\))?\s+)?use\s+([^;]*);", text):
            line = text.count("\n", 0, m.start()) + 1
            for segs, name in expand_use_tree(m.group(2)):
                res.append((line, m.group(1) is not None, segs, name))
        return res

    def is_module(self, path):
        return tuple(path) in self.files

    def absolute(self, mod, segs):
        """The absolute module path a use or inline path starts from, or None for another crate."""
        segs = list(segs)
        if segs[0] in ("crate", "$crate"):
            return tuple(segs[1:])
        base = list(mod)
        if segs[0] == "self":
            return tuple(base + segs[1:])
        if segs[0] == "super":
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            return tuple(base + segs)
        if self.is_module(base + [segs[0]]):
            return tuple(base + segs)
        return None  # std, core, a dependency, or a local item

    def resolve(self, path, seen=()):
        """The module (file) that defines what the absolute `path` names."""
        node = ()
        for i, seg in enumerate(path):
            if self.is_module(node + (seg,)):
                node = node + (seg,)
                continue
            target = self.reexports.get(node, {}).get(seg)
            if target is not None and target not in seen:
                return self.resolve(target + tuple(path[i + 1:]), seen + (target,))
            return node
        return node

    def references(self, mod):
        """(line, target module, what) for every path in `mod` that names something of this crate."""
        text = self.text[mod]
        refs = []
        for line, public, segs, name in self.uses[mod]:
            if segs[-1] == "*":
                segs = segs[:-1]
            a = self.absolute(mod, segs)
            if a is None:
                continue
            target = self.resolve(a)
            # A module's `pub use` of its own descendants is its facade, not a dependency.
            if public and target[:len(mod)] == mod and target != mod:
                continue
            refs.append((line, target, "::".join(segs)))
        # Inline paths, outside `use` items.
        body = re.sub(r"(?<![\w:])(pub(?:\s*\([^)]*\))?\s+)?use\s+[^;]*;", lambda m: "".join(c if c == "\n" else " " for c in m.group(0)), text)
        children = {m[-1] for m in self.files if len(m) == len(mod) + 1 and m[:len(mod)] == mod}
        for m in re.finditer(r"(?<![\w:$])(\$?" + IDENT + r")((?:\s*::\s*" + IDENT + r")+)", body):
            first = m.group(1)
            if first not in ("crate", "$crate", "self", "super") and first not in children:
                continue
            segs = [first] + [s.strip() for s in m.group(2).split("::") if s.strip()]
            a = self.absolute(mod, segs)
            if a is None:
                continue
            refs.append((body.count("\n", 0, m.start()) + 1, self.resolve(a), "::".join(segs)))
        return refs

    def graphs(self):
        """Directory module -> {child: {child: (file, line, path)}}."""
        g = {}
        for mod in self.files:
            for line, target, what in self.references(mod):
                n = 0
                while n < len(mod) and n < len(target) and mod[n] == target[n]:
                    n += 1
                if n == len(mod) or n == len(target):
                    continue  # the same module, or a module and its own descendant
                parent = mod[:n]
                a, b = mod[n], target[n]
                edges = g.setdefault(parent, {}).setdefault(a, {})
                edges.setdefault(b, (self.files[mod], line, what))
        return g


def circles(edges):
    """Every elementary circle of a small directed graph, each once, as a list of nodes."""
    nodes = sorted(set(edges) | {b for a in edges for b in edges[a]})
    found = []
    for start in nodes:
        # Circles whose smallest node is `start`.
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, {})):
                if nxt == start:
                    found.append(path)
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def check(src, out=sys.stdout):
    crate = Crate(src)
    total = 0
    for parent, edges in sorted(crate.graphs().items()):
        where = "::".join(parent) or "crate"
        for c in circles(edges):
            total += 1
            names = ["::".join(parent + (x,)) for x in c]
            print(f"import circle in {where}: {' -> '.join(names + names[:1])}", file=out)
            for a, b in zip(c, c[1:] + c[:1]):
                f, line, what = edges[a][b]
                print(f"    {'::'.join(parent + (a,))} -> {'::'.join(parent + (b,))}: src/{f}:{line} names {what}", file=out)
    return total, crate


def self_test():
    """The check finds planted circles and passes a tree without one."""
    cases = {
        "a circle through super::": ({
            "lib.rs": "pub mod r;\n",
            "r/mod.rs": "mod a;\nmod b;\npub struct Shared;\n",
            "r/a.rs": "use super::b::B;\npub struct A;\n",
            "r/b.rs": "use super::{a::A, Shared};\npub struct B;\n",
        }, 1),
        "a circle through an inline crate:: path": ({
            "lib.rs": "pub mod x;\npub mod y;\n",
            "x.rs": "pub fn f() { crate::y::g() }\n",
            "y/mod.rs": "mod inner;\npub use inner::g;\n",
            "y/inner.rs": "pub fn g() {}\npub fn h() -> u8 { crate::x::f(); 0 }\n",
        }, 1),
        "a circle hidden behind a pub use": ({
            "lib.rs": "pub mod m;\n",
            "m/mod.rs": "mod p;\nmod q;\npub use p::P;\npub use q::Q;\n",
            "m/p.rs": "pub struct P(super::Q);\n",
            "m/q.rs": "// crate::m::p::P is only named in this comment\npub struct Q;\npub fn make() -> super::P { todo!() }\n",
        }, 1),
        "no circle (test code and comments are left out)": ({
            "lib.rs": "pub mod m;\npub mod n;\n",
            "m/mod.rs": "mod p;\nmod q;\npub use p::P;\npub struct Shared;\nfn f(_: p::P) {}\n",
            "m/p.rs": "use super::q::Q;\nuse super::Shared;\npub struct P(Q);\n",
            "m/q.rs": "pub struct Q; // super::p::P\nconst S: &str = \"super::p::P\";\n"
                      "#[cfg(test)]\nmod tests { use super::super::p::P; }\n",
            "n.rs": "use crate::m::P;\nuse std::fmt;\n",
        }, 0),
    }
    ok = True
    for name, (files, want) in cases.items():
        with tempfile.TemporaryDirectory() as d:
            for rel, body in files.items():
                os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
                with open(os.path.join(d, rel), "w") as f:
                    f.write(body)
            with open(os.devnull, "w") as null:
                got, _ = check(d, null)
        status = "ok" if got == want else "FAILED"
        ok &= got == want
        print(f"import-cycles self-test: {name}: {got} circle(s), want {want}: {status}")
    return ok


def main(argv):
    args = [a for a in argv if a != "--self-test"]
    if "--self-test" in argv and not self_test():
        return 1
    src = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    total, crate = check(src)
    if total:
        print(f"{total} import circle(s) between the modules of src/", file=sys.stderr)
        return 1
    print(f"no import circles among {len(crate.files)} modules of src/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
