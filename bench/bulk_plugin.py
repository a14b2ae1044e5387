"""A Caddy-sized plugin for the build benchmarks: much generated, deterministic Go.

It is not in the tree ``tests.fixtures.goproxy.generate()`` writes: ``add_bulk()`` adds it
to one. The Go it is made of lives in ``bench/testdata/bulk/``: ``unit.go.tmpl`` (a
``str.format`` template, hence its doubled braces) repeated with random constants, and
``serve.go`` linking what a real Caddy links.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.fixtures.goproxy.modules import CADDY, PLUGIN_REQUIRES
from tests.fixtures.goproxy.paths import proxy_path
from tests.fixtures.goproxy.sources import gomod
from tests.fixtures.goproxy.tree import info, version_files, write_atomic

BULK = "github.com/kiln-fixtures/bulk"
BULK_VERSIONS = ("v1.0.0", "v1.1.0")
BULK_ID = "http.handlers.bulk"
BULK_PACKAGES = 280
BULK_UNITS = 30
"""Packages of the bulk plugin and units (a record type with methods and a function) in
each, plus the standard libraries a web server links: about 38 MB of binary with ``-w -s``,
like a Caddy with a few plugins; cold it compiles in about 40 s on 2 cores."""

TESTDATA = Path(__file__).with_name("testdata") / "bulk"


def bulk_files(version: str, packages: int = BULK_PACKAGES,
               units: int = BULK_UNITS) -> dict[str, str]:
    """Return the files of the bulk plugin at ``version``: generated, deterministic Go.

    Every function and type is reachable from the root package's init(), so the linker
    keeps them all; each version has different constants, so nothing is shared between
    the two versions' compiled packages.
    """
    unit = (TESTDATA / "unit.go.tmpl").read_bytes().decode()
    rng = random.Random(f"kiln bulk {version}")
    files = {"go.mod": gomod(BULK, {CADDY: PLUGIN_REQUIRES})}
    header = ('package p{p:03d}\n\nimport (\n\t"fmt"\n\t"math/bits"\n\t"strconv"\n'
              '\t"strings"\n)\n')
    for p in range(packages):
        parts = [f"// Package p{p:03d} is generated filler of Kiln's bulk fixture plugin.\n",
                 header.format(p=p)]
        for n in range(units):
            parts.append(unit.format(
                n=n, seed=rng.getrandbits(32), a=rng.randrange(3, 1 << 20) | 1,
                r=rng.randrange(1, 63), sh=rng.randrange(1, 63), mask=rng.getrandbits(24),
                b=rng.randrange(3, 999), sh2=rng.randrange(1, 63), c=rng.randrange(3, 99),
                lim=rng.randrange(4, 64), mod=rng.randrange(3, 97)))
        parts.append("\n// Table lists this package's functions.\n"
                     "var Table = []func([]uint64, string) (uint64, string){\n"
                     + "".join(f"\tF{n:03d},\n" for n in range(units)) + "}\n"
                     "\n// Things lists one value of each record type.\nvar Things = []fmt.Stringer{\n"
                     + "".join(f'\t&T{n:03d}{{Name: "t{n}"}},\n' for n in range(units)) + "}\n")
        files[f"p{p:03d}/p.go"] = "".join(parts)
    imports = "".join(f'\t"{BULK}/p{p:03d}"\n' for p in range(packages))
    tables = "".join(f"\t\tp{p:03d}.Table,\n" for p in range(packages))
    things = "".join(f"\t\tp{p:03d}.Things,\n" for p in range(packages))
    files["bulk.go"] = (
        "// Package bulk is Kiln's Caddy-sized fixture plugin: much generated code.\n"
        f'package bulk\n\nimport (\n\t"fmt"\n\n\t"github.com/caddyserver/caddy/v2"\n{imports})\n\n'
        "// Funcs and Records count what the generated packages hold.\nvar Funcs, Records int\n\n"
        "func init() {\n"
        f"\tfor _, t := range [][]func([]uint64, string) (uint64, string){{\n{tables}\t}} {{\n"
        "\t\tFuncs += len(t)\n\t}\n"
        f"\tfor _, t := range [][]fmt.Stringer{{\n{things}\t}} {{\n"
        "\t\tRecords += len(t)\n\t}\n"
        "\tif err := selfTest(); err != nil {\n\t\tpanic(err)\n\t}\n"
        "\tcaddy.RegisterModule(caddy.ModuleInfo{\n"
        f'\t\tID:  "{BULK_ID}",\n'
        "\t\tNew: func() any { return new(Module) },\n\t})\n}\n\n"
        "// Module is the Caddy module this plugin registers.\ntype Module struct {\n"
        f'\tOn bool\n}}\n\n// Version names this version.\nconst Version = "{version}"\n'
    )
    files["serve.go"] = (TESTDATA / "serve.go").read_bytes().decode()
    return files


def add_bulk(root: Path) -> Path:
    """Add the bulk plugin's versions to a tree generate() wrote; return root.

    Its files are not part of generate()'s stamp: generate() leaves them alone while its
    own tree is current.
    """
    root = Path(root)
    for version in BULK_VERSIONS:
        base = root / proxy_path(BULK, f"@v/{version}.zip")
        if not base.exists():
            for rel, data in version_files(BULK, version, bulk_files(version)).items():
                write_atomic(root / rel, data)
    write_atomic(root / proxy_path(BULK, "@v/list"),
                 "".join(f"{v}\n" for v in BULK_VERSIONS).encode())
    write_atomic(root / proxy_path(BULK, "@latest"), info(BULK, BULK_VERSIONS[-1]))
    return root
