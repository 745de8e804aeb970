"""The wheels a bare GPU machine lacks for the GPU check, and their installation there (no torch import here).

The GPU image has CPython 3.12, torch, Triton, nvcc, transformers and peft (so huggingface_hub, safetensors, numpy,
regex, requests, psutil, pyyaml, tqdm, packaging too), but not diffusers or DeepSpeed. `make gpu-bundle` puts the
wheels of BUNDLE into `.whl/`, pinned to the versions of this checkout's venv (the versions the CPU suite tests);
DeepSpeed is an sdist on PyPI, so the bundle builds its wheel (pure Python with DS_BUILD_OPS=0: its ops JIT-build).

    python bench/gpu_wheels.py pins [--sdist]      requirement lines (==venv version) for `pip download`
    python bench/gpu_wheels.py install WHEELS TARGET   install into TARGET what this interpreter needs (see select)
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile

# distribution names; SDIST ones have no wheel on PyPI and are built by `make gpu-bundle`
SDIST = ["deepspeed"]
BUNDLE = ["diffusers", "importlib_metadata", "zipp", "lazy-importer", "pillow",      # diffusers and its extras
          "einops", "hjson", "msgpack", "ninja", "py-cpuinfo", "pydantic", "pydantic_core", "annotated-types",
          "typing-inspection", "typing_extensions",                                  # DeepSpeed's
          "pytest", "pluggy", "iniconfig", "pygments"] + SDIST                       # the GPU tests


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(sdist: bool = False) -> list[str]:
    """name==version for BUNDLE (or SDIST) from the running interpreter's installed distributions."""
    from importlib.metadata import version
    names = SDIST if sdist else [n for n in BUNDLE if n not in SDIST]
    return [f"{n}=={version(n)}" for n in names]


def wheel_meta(path: str) -> tuple[str, str, list[str]]:
    """(normalised name, version, Requires-Dist lines) read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    field = lambda k: [ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.startswith(k + ":")]
    return norm(field("Name")[0]), field("Version")[0], field("Requires-Dist")


def _installed() -> dict:
    from importlib.metadata import distributions
    return {norm(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def _unmet(reqs: list[str], have: dict) -> list[str]:
    """The requirements (markers evaluated, extras ignored) that `have` {name: version} does not satisfy."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers; without it nothing can be checked
        return []
    out = []
    for line in reqs:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        v = have.get(norm(r.name))
        if v is None or (r.specifier and not r.specifier.contains(v, prereleases=True)):
            out.append(f"{line} (have {v})")
    return out


def select(wheel_dir: str) -> dict:
    """Which of the wheels under wheel_dir this interpreter should get, by one rule:
    install a wheel when its distribution is absent, or when the present version fails a requirement of a wheel
    being installed and the bundled version's own requirements are met (present or bundled); otherwise keep what
    the image has. -> {"install": [paths], "keep": {name: present version}, "unmet": [requirements still unmet]}."""
    wheels = {}
    for p in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
        name, ver, reqs = wheel_meta(p)
        wheels[name] = (p, ver, reqs)
    have = _installed()
    install = {n for n in wheels if n not in have}
    changed = True
    while changed:  # a replaced distribution may in turn need another
        changed = False
        after = {**have, **{n: wheels[n][1] for n in install}}
        for n in sorted(install):
            for line in _unmet(wheels[n][2], after):
                dep = norm(re.split(r"[ <>=!~;\[(]", line, 1)[0])
                if dep in wheels and dep not in install and not _unmet(wheels[dep][2], {**after, dep: wheels[dep][1]}):
                    install.add(dep)
                    changed = True
    after = {**have, **{n: wheels[n][1] for n in install}}
    unmet = sorted({f"{n}: {u}" for n in install for u in _unmet(wheels[n][2], after)})
    return {"install": [wheels[n][0] for n in sorted(install)],
            "keep": {n: have[n] for n in sorted(wheels) if n not in install},
            "unmet": unmet}


def install(wheel_dir: str, target: str) -> dict:
    """pip install --no-deps --target (or, without pip, unpack the wheels: they need no build step)."""
    sel = select(wheel_dir)
    os.makedirs(target, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if sel["install"] and has_pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", target, *sel["install"]], check=True)
    elif sel["install"]:
        print("no pip here: unpacking the wheels (they need no build step)", file=sys.stderr)
        for p in sel["install"]:
            with zipfile.ZipFile(p) as z:
                z.extractall(target)
    for p in sel["install"]:
        print(f"installed {os.path.basename(p)}")
    for n, v in sel["keep"].items():
        print(f"kept the image's {n} {v}")
    for u in sel["unmet"]:
        print(f"WARNING unmet requirement {u}")
    return sel


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[:1] == ["pins"]:
        print("\n".join(pins(sdist="--sdist" in a)))
    elif a[:1] == ["install"] and len(a) == 3:
        install(a[1], a[2])
    else:
        sys.exit(__doc__)
