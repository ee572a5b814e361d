"""An offline wheelhouse: every wheel that a node without network needs to install this package.

Run on a machine with the network (tools/wheelhouse.sh is the front door; see --help). It reads
pyproject.toml's [project] dependencies and a base file (what the node's image already holds:
a requirements file or `pip freeze` output; a bare name means "present, any version"), then
computes the closure itself: for each requirement whose environment markers apply to the target
(Python version and platform, not this machine), a name that the base holds at an acceptable
version is skipped; any other is fetched as a wheel for the target with
`pip download --no-deps --only-binary=:all: --python-version ... --platform ...`, and its
METADATA's Requires-Dist is followed in turn (``extra ==`` lines only for the extras asked for).
pip is not asked to resolve: for a foreign platform it cannot do so reliably.

torch and nvidia-* are never fetched (the node has its CUDA build). DeepSpeed has no wheel on
PyPI: it is built here as a pure-Python wheel (DS_BUILD_OPS=0, --no-build-isolation, with an
interpreter that has torch: --build-python). This package is built with `pip wheel --no-deps .`.
One version of each name is kept; DIR gets requirements.txt, from-node.txt and INSTALL.txt.

The pure functions (requirement and base parsing, marker evaluation for the target, the skip
rule, the pinned version, the platform tags, the closure with an injected fetcher) are tested in
tests/unit/test_wheelhouse.py without network.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Callable, Iterable

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
SELF = "trinityx-ds"
# the node brings these (its CUDA torch and the CUDA libraries that torch's wheel pulls in)
NEVER_FETCH = ("torch", "nvidia-*")
# names with no usable wheel on PyPI, built here: (extra environment, extra `pip wheel` arguments)
# (DeepSpeed: no cached build, which could hold compiled ops; its CUDA ops are JIT-built on the node)
BUILDS = {"deepspeed": ({"DS_BUILD_OPS": "0"}, ["--no-build-isolation", "--no-cache-dir"])}

INSTALL = """\
Install on the node, with no network (DIR: the wheelhouse, copied to the node):
  python3 -m pip install --no-index --find-links DIR trinityx-ds
Read-only image (site-packages cannot be written): install beside it and put it on the path
(SITE's path must contain "site-packages", e.g. /tmp/trinityx/site-packages: dill, which datasets
hashes with, pickles modules from elsewhere by value, and fails on pyarrow's)
  python3 -m pip install --no-index --no-deps --target SITE DIR/*.whl
  export PYTHONPATH=SITE:$PYTHONPATH PATH=SITE/bin:$PATH"""


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. made one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_base(text: str) -> dict[str, str | None]:
    """A requirements file or `pip freeze` output -> {name: version or None (present, any version)}.

    Understands `name==version`, `name===version`, a bare `name`, `name @ url` (version unknown) and
    comments; skips options (-e, -r, --index-url, ...)."""
    base: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if " @ " in line:
            base[normalize(line.split(" @ ", 1)[0].split("[")[0].strip())] = None
            continue
        req = Requirement(line)
        version = None
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
            version = specs[0].version
        elif specs:
            raise ValueError(f"base file: {raw.strip()!r}: give a name, or name==version")
        base[normalize(req.name)] = version
    return base


def read_project(pyproject: Path) -> tuple[str, list[str]]:
    """pyproject.toml -> (normalized project name, [project] dependencies)."""
    data = tomllib.loads(pyproject.read_text())
    return normalize(data["project"]["name"]), list(data["project"].get("dependencies", []))


def _arch(platform: str) -> str:
    for prefix in ("manylinux_", "musllinux_"):
        if platform.startswith(prefix):  # manylinux_2_28_x86_64
            return platform.split("_", 3)[3]
    if platform.startswith(("manylinux1_", "manylinux2010_", "manylinux2014_", "linux_")):
        return platform.split("_", 1)[1]
    if platform.startswith("macosx_"):  # macosx_11_0_arm64
        return platform.split("_", 3)[3]
    return {"win_amd64": "AMD64", "win32": "x86", "win_arm64": "ARM64"}.get(platform, platform)


def target_env(python: str, platform: str) -> dict[str, str]:
    """PEP 508 marker environment of the target interpreter (not this one)."""
    parts = python.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--python {python!r}: give e.g. 3.12 or 3.12.3")
    short = ".".join(parts[:2])
    full = python if len(parts) >= 3 else short + ".0"
    if platform.startswith(("manylinux", "musllinux", "linux")):
        sys_platform, system, os_name = "linux", "Linux", "posix"
    elif platform.startswith("macosx"):
        sys_platform, system, os_name = "darwin", "Darwin", "posix"
    elif platform.startswith("win"):
        sys_platform, system, os_name = "win32", "Windows", "nt"
    else:
        raise ValueError(f"--platform {platform!r}: not a manylinux/musllinux/macosx/win tag")
    return {"python_version": short, "python_full_version": full, "implementation_name": "cpython",
            "implementation_version": full, "platform_python_implementation": "CPython",
            "os_name": os_name, "sys_platform": sys_platform, "platform_system": system,
            "platform_machine": _arch(platform), "platform_release": "", "platform_version": "",
            "extra": ""}


def marker_applies(marker: Marker | str | None, env: dict[str, str], extras: Iterable[str] = ()) -> bool:
    """True when a requirement's marker holds on the target, for no extra or one of `extras`."""
    if marker is None:
        return True
    if isinstance(marker, str):
        marker = Marker(marker)
    return any(marker.evaluate(dict(env, extra=e)) for e in ("", *sorted(extras)))


def pinned_version(spec: SpecifierSet) -> str | None:
    """The one version an exact pin (==X, ===X, no wildcard) allows, else None."""
    exact = [s.version for s in spec if s.operator in ("==", "===") and "*" not in s.version]
    return exact[0] if len(exact) == 1 else None


def base_accepts(version: str | None, spec: SpecifierSet) -> bool:
    """Does the base's copy do? A name without a version is present at any version."""
    if version is None:
        return True
    try:
        return spec.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def never_fetch(name: str, extra: Iterable[str] = ()) -> bool:
    name = normalize(name)
    for pat in (*NEVER_FETCH, *extra):
        pat = normalize(pat.rstrip("*")) + ("*" if pat.endswith("*") else "")
        if name == pat or (pat.endswith("*") and name.startswith(pat[:-1])):
            return True
    return False


def manylinux_platforms(platform: str) -> list[str]:
    """pip matches a PEP 600 tag exactly: manylinux_2_28_x86_64 -> itself and every older glibc
    tag it runs (2_27 ... 2_5) with the legacy aliases (manylinux2014/2010/1); others as given."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    top, arch = int(m.group(1)), m.group(2)
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}  # 2010 and 1: x86 only
    out = []
    for minor in range(top, 4, -1):
        out.append(f"manylinux_2_{minor}_{arch}")
        if minor == 17 or (minor in legacy and arch in ("x86_64", "i686")):
            out.append(f"{legacy[minor]}_{arch}")
    return out


@dataclass
class Dist:
    name: str
    version: str
    requires: list[str]
    path: Path | None = None


def wheel_metadata(path: Path) -> Dist:
    """Name, version and Requires-Dist of a wheel, from its .dist-info/METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise ValueError(f"{path.name}: {len(meta)} METADATA files")
        msg = Parser().parsestr(z.read(meta[0]).decode("utf-8"))
    return Dist(normalize(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or [], path)


@dataclass
class Closure:
    """What a node with `base` needs for `roots`, on the target `env`.

    fetch(name, spec) -> Dist returns the version to ship (pinned when spec pins one, else the
    newest that fits); it is the only thing that touches the network."""
    env: dict[str, str]
    base: dict[str, str | None]
    fetch: Callable[[str, SpecifierSet], Dist]
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()  # fetch these even when the base has them
    chosen: dict[str, Dist] = field(default_factory=dict)
    specs: dict[str, SpecifierSet] = field(default_factory=dict)
    extras: dict[str, set[str]] = field(default_factory=dict)
    why: dict[str, list[str]] = field(default_factory=dict)

    def _note(self, req: Requirement, parent: str) -> bool:
        """Record a requirement; True when it changed what is asked of its name."""
        name = normalize(req.name)
        old = (str(self.specs.get(name)), set(self.extras.get(name, ())))
        self.specs[name] = self.specs.get(name, SpecifierSet()) & req.specifier
        self.extras.setdefault(name, set()).update(req.extras)
        self.why.setdefault(name, []).append(f"{parent}: {req}")
        return old != (str(self.specs[name]), self.extras[name])

    def _applicable(self, reqs: Iterable[str], extras: Iterable[str]) -> list[Requirement]:
        out = []
        for r in reqs:
            req = Requirement(r)
            if marker_applies(req.marker, self.env, extras):
                out.append(req)
        return out

    def decide(self, name: str) -> str:
        """'exclude', 'base' or 'fetch'."""
        if never_fetch(name, self.exclude):
            return "exclude"
        if name in self.base and name not in self.include and base_accepts(self.base[name], self.specs[name]):
            return "base"
        return "fetch"

    def resolve(self, roots: Iterable[str], root_name: str = SELF) -> Closure:
        queue: list[str] = []
        for req in self._applicable(roots, ()):
            self._note(req, root_name)
            queue.append(normalize(req.name))
        done: dict[str, tuple[str, str, frozenset]] = {}
        while queue:
            name = queue.pop(0)
            state = (self.decide(name), str(self.specs[name]), frozenset(self.extras[name]))
            if done.get(name) == state:
                continue
            done[name] = state
            if state[0] != "fetch":
                continue
            have = self.chosen.get(name)
            if have is None or not self.specs[name].contains(Version(have.version), prereleases=True):
                self.chosen[name] = have = self.fetch(name, self.specs[name])
            for req in self._applicable(have.requires, self.extras[name]):
                dep = normalize(req.name)
                if self._note(req, f"{name} {have.version}") or dep not in done:
                    queue.append(dep)
        self.prune(roots, root_name)
        return self

    def prune(self, roots: Iterable[str], root_name: str = SELF) -> None:
        """Drop what nothing reaches any more (a version replaced, a name the base took over),
        recompute the asked specs from what stays, and check that every need is met."""
        self.specs, self.extras, self.why = {}, {}, {}
        stack = [(req, root_name) for req in self._applicable(roots, ())]
        seen: set[str] = set()
        while stack:
            req, parent = stack.pop()
            name = normalize(req.name)
            self._note(req, parent)
            key = f"{name}[{','.join(sorted(self.extras[name]))}]"
            if name in self.chosen and self.decide(name) == "fetch" and key not in seen:
                seen.add(key)
                d = self.chosen[name]
                stack += [(r, f"{name} {d.version}") for r in self._applicable(d.requires, self.extras[name])]
        self.chosen = {n: d for n, d in self.chosen.items() if n in self.specs and self.decide(n) == "fetch"}
        for name, spec in self.specs.items():
            if self.decide(name) == "fetch":
                d = self.chosen.get(name)
                if d is None or not spec.contains(Version(d.version), prereleases=True):
                    raise RuntimeError(f"{name}: no version meets {spec} (asked by {'; '.join(self.why[name])})")

    def report(self) -> dict[str, list[tuple[str, str, str]]]:
        """{'base': [(name, base version or '', spec)], 'exclude': [...], 'unverified': [...],
        'extras_of_base': [...]}: what the node must already hold, and what could not be checked."""
        out: dict[str, list[tuple[str, str, str]]] = {"base": [], "exclude": [], "unverified": [],
                                                      "extras_of_base": [], "missing": []}
        for name in sorted(self.specs):
            kind = self.decide(name)
            if kind == "fetch":
                continue
            have = self.base.get(name)
            row = (name, have or "", str(self.specs[name]))
            out[kind].append(row)
            if name not in self.base:
                out["missing"].append(row)
            elif have is None and str(self.specs[name]):
                out["unverified"].append(row)
            elif have is not None and not base_accepts(have, self.specs[name]):
                out["missing"].append(row)  # an excluded name (torch) at a version that won't do
            if kind == "base" and self.extras[name]:
                out["extras_of_base"].append((name, have or "", ",".join(sorted(self.extras[name]))))
        return out


# ---------------------------------------------------------------- the parts that run pip

def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}")


def _one_wheel(d: Path) -> Path:
    wheels = list(d.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {d}, found {[w.name for w in wheels]}")
    return wheels[0]


class PipFetcher:
    """fetch() for Closure: a target-platform wheel from the index, or a pure-Python build."""

    def __init__(self, pip_python: str, build_python: str, python: str, platforms: list[str], out: Path):
        self.pip_python, self.build_python, self.python, self.out = pip_python, build_python, python, out
        self.platforms = [p for plat in platforms for p in manylinux_platforms(plat)]

    def __call__(self, name: str, spec: SpecifierSet) -> Dist:
        want = f"{name}=={pinned_version(spec)}" if pinned_version(spec) else f"{name}{spec}"
        t = time.time()
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            tmp = Path(tmp)
            if name in BUILDS:
                path = self._build(want, tmp, *BUILDS[name])
            else:
                cmd = [self.pip_python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                       "--python-version", self.python, "--implementation", "cp", "-d", str(tmp), want]
                cmd[-1:-1] = [x for p in self.platforms for x in ("--platform", p)]
                try:
                    _run(cmd)
                    path = _one_wheel(tmp)
                except RuntimeError as e:  # no wheel for the target: a pure-Python one built here will do
                    print(f"  {want}: no wheel for the target ({str(e).splitlines()[-1]}); building one", flush=True)
                    path = self._build(want, tmp, {}, [])
            dest = self.out / path.name
            shutil.move(str(path), dest)
        d = wheel_metadata(dest)
        print(f"  {d.name} {d.version}: {dest.name} ({dest.stat().st_size / 2**20:.1f} MiB, {time.time() - t:.0f} s)",
              flush=True)
        return d

    def _build(self, want: str, tmp: Path, env: dict[str, str], args: list[str]) -> Path:
        cmd = [self.build_python, "-m", "pip", "wheel", "-q", "--no-deps", *args, "-w", str(tmp), want]
        _run(cmd, env={**os.environ, **env})
        path = _one_wheel(tmp)
        if not path.name.endswith("-none-any.whl"):
            raise RuntimeError(f"{want}: built {path.name}, which is not pure Python; it cannot serve the target")
        return path


def build_self(build_python: str, src: Path, out: Path) -> Dist:
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        _run([build_python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(src)])
        path = out / _one_wheel(Path(tmp)).name
        shutil.move(str(_one_wheel(Path(tmp))), path)
    return wheel_metadata(path)


def default_build_python() -> str:
    for cand in (ROOT / ".venv/bin/python", Path(sys.executable)):
        if cand.exists() and subprocess.run([str(cand), "-c", "import torch"], capture_output=True).returncode == 0:
            return str(cand)
    raise SystemExit("no interpreter with torch found for DeepSpeed's build (its setup.py imports torch): "
                     "give --build-python, e.g. the project's .venv/bin/python after tools/setup_env.sh")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tools/wheelhouse.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Collect, on a machine with the network, the wheels that a node with no network needs "
                    "to install trinityx-ds: the closure of pyproject.toml's dependencies for the target "
                    "Python and platform, less what --base says the node already has, less torch and nvidia-*.",
        epilog=INSTALL + "\n\nExample (the GPU nodes this project borrows):\n  tools/wheelhouse.sh --python 3.12 "
               "--base tools/wheelhouse/gpu_node_image.txt --out wheelhouse")
    ap.add_argument("--python", default="3.12", help="target Python, e.g. 3.12 or 3.12.3 (default 3.12)")
    ap.add_argument("--platform", action="append", help="target platform tag, repeatable "
                    "(default manylinux_2_28_x86_64; a manylinux_2_N tag also takes every older glibc's wheels)")
    ap.add_argument("--base", type=Path, help="requirements or `pip freeze` of the node's image "
                    "(name==version, or a bare name: present at any version)")
    ap.add_argument("--out", type=Path, required=True, help="the wheelhouse folder (its other .whl files are removed)")
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--build-python", help="interpreter with torch, to build DeepSpeed's pure-Python wheel "
                    "(default: the project's .venv/bin/python, else this one, if it imports torch)")
    ap.add_argument("--exclude", action="append", default=[], help="never fetch NAME (as torch, nvidia-*)")
    ap.add_argument("--include", action="append", default=[], help="fetch NAME even when the base has it")
    a = ap.parse_args(argv)

    t0 = time.time()
    platforms = a.platform or ["manylinux_2_28_x86_64"]
    env = target_env(a.python, platforms[0])
    base = parse_base(a.base.read_text()) if a.base else {}
    self_name, roots = read_project(a.pyproject)
    build_python = a.build_python or default_build_python()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"wheelhouse for CPython {a.python} on {', '.join(platforms)}: {len(roots)} dependencies of {self_name}, "
          f"{len(base)} names in the base{f' ({a.base})' if a.base else ''}; DeepSpeed built with {build_python}",
          flush=True)
    me = build_self(build_python, a.pyproject.parent, out)
    print(f"  {me.name} {me.version}: {me.path.name}", flush=True)
    fetch = PipFetcher(sys.executable, build_python, a.python, platforms, out)
    c = Closure(env, base, fetch, tuple(a.exclude), tuple(normalize(n) for n in a.include)).resolve(roots, self_name)
    keep = {me.path.name} | {d.path.name for d in c.chosen.values()}
    for w in out.glob("*.whl"):
        if w.name not in keep:
            print(f"  removed {w.name} (not part of this wheelhouse)")
            w.unlink()

    dists = sorted([me, *c.chosen.values()], key=lambda d: d.name)
    (out / "requirements.txt").write_text("".join(f"{d.name}=={d.version}\n" for d in dists))
    rep = c.report()
    lines = [f"# names the node must already hold (from {a.base or 'no base file'}): name, its version there, what is asked\n"]
    lines += [f"{n}=={v}  # asks {s or 'any'}\n" if v else f"{n}  # asks {s or 'any'}\n" for n, v, s in rep["base"] + rep["exclude"]]
    (out / "from-node.txt").write_text("".join(lines))
    (out / "INSTALL.txt").write_text(INSTALL.replace("DIR", str(out)) + "\n")

    total = sum(d.path.stat().st_size for d in dists)
    print(f"\nput in {out} ({len(dists)} wheels):")
    for d in dists:
        print(f"  {d.path.stat().st_size / 2**20:7.2f} MiB  {d.path.name}")
    print(f"total {total / 2**20:.1f} MiB ({total} bytes) in {time.time() - t0:.0f} s")
    print(f"taken from the node: {', '.join(n + ('==' + v if v else '') for n, v, _ in rep['base'] + rep['exclude'])}")
    for n, v, s in rep["missing"]:
        print(f"WARNING: {n} is asked as {s or 'any'} and is not fetched (never-fetch list), but the base "
              f"{'has ' + v if v else 'lacks it'}: the install will fail until the node has a fitting {n}")
    if rep["unverified"]:
        print("unverified (the base gives no version): " + ", ".join(f"{n} {s}" for n, _, s in rep["unverified"])
              + "; if the node's copy does not fit, rerun with --include NAME")
    if rep["extras_of_base"]:
        print("extras assumed present with the base's copy: " + ", ".join(f"{n}[{e}]" for n, _, e in rep["extras_of_base"]))
    print("\n" + INSTALL.replace("DIR", str(out)))
    return 1 if rep["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
