"""tools/wheelhouse.py, the offline wheelhouse's closure, on a made-up index: no network, no pip.

What it must get right for a node with no network: which requirements apply to the target Python
and platform (not this machine's), which names the node's image already holds at a version that
will do, the pinned version where there is a pin, one version of each name, and never torch or
nvidia-* (the node has them)."""
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import wheelhouse as wh  # noqa: E402

SpecifierSet = wh.SpecifierSet
ENV312 = wh.target_env("3.12", "manylinux_2_28_x86_64")


def test_normalize_and_base_file():
    assert wh.normalize("Huggingface_Hub") == wh.normalize("huggingface-hub") == "huggingface-hub"
    base = wh.parse_base("""# the image
torch==2.11.0+cu130
Transformers==5.17.0
py_cpuinfo
tensorboard  # version unknown
mylib @ file:///tmp/mylib-1.0-py3-none-any.whl
-e git+https://example.invalid/x.git#egg=x
--index-url https://example.invalid/simple

""")
    assert base == {"torch": "2.11.0+cu130", "transformers": "5.17.0", "py-cpuinfo": None,
                    "tensorboard": None, "mylib": None}
    with pytest.raises(ValueError, match="name==version"):
        wh.parse_base("numpy>=2\n")


def test_markers_are_the_targets_not_this_interpreters():
    env310 = wh.target_env("3.10", "manylinux_2_28_x86_64")
    assert ENV312["python_version"] == "3.12" and ENV312["python_full_version"] == "3.12.0"
    assert ENV312["platform_machine"] == "x86_64" and ENV312["sys_platform"] == "linux"
    assert wh.target_env("3.12.3", "manylinux_2_17_aarch64")["platform_machine"] == "aarch64"
    assert not wh.marker_applies('python_version < "3.11"', ENV312)
    assert wh.marker_applies('python_version < "3.11"', env310)
    assert not wh.marker_applies('sys_platform == "win32"', ENV312)
    assert wh.marker_applies('platform_machine == "x86_64" and python_version >= "3.12"', ENV312)
    assert wh.marker_applies(None, ENV312)
    # `extra ==` lines apply only for the extras asked for
    assert not wh.marker_applies('extra == "http"', ENV312)
    assert wh.marker_applies('extra == "http"', ENV312, {"http"})
    assert not wh.marker_applies('extra == "http" and python_version < "3.9"', ENV312, {"http"})
    with pytest.raises(ValueError):
        wh.target_env("3", "manylinux_2_28_x86_64")


def test_pinned_version_and_the_base_rule():
    assert wh.pinned_version(SpecifierSet("==5.24.0")) == "5.24.0"
    assert wh.pinned_version(SpecifierSet(">=1,==2.0")) == "2.0"
    assert wh.pinned_version(SpecifierSet(">=0.4")) is None
    assert wh.pinned_version(SpecifierSet("==2.*")) is None
    assert wh.base_accepts(None, SpecifierSet("==2.21.0"))  # a bare name: present, any version
    assert not wh.base_accepts("5.17.0", SpecifierSet("==5.24.0"))  # transformers: the pin wins
    assert wh.base_accepts("2.11.0+cu130", SpecifierSet(">=2.11,<2.14"))  # a local CUDA build
    assert not wh.base_accepts("2.11.0+cu130", SpecifierSet("==2.13.0"))
    assert wh.base_accepts("1.0rc1", SpecifierSet(">=0.9"))


def test_never_fetch_and_platform_tags():
    assert all(wh.never_fetch(n) for n in ("torch", "nvidia-cublas", "Nvidia_NCCL_cu13"))
    assert not any(wh.never_fetch(n) for n in ("torchvision", "torch-geometric", "deepspeed"))
    assert wh.never_fetch("jax", ["jax"]) and wh.never_fetch("jax-cuda13-plugin", ["jax-*"])
    tags = wh.manylinux_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
            "manylinux_2_5_x86_64"} <= set(tags)
    arm = wh.manylinux_platforms("manylinux_2_28_aarch64")
    assert "manylinux2014_aarch64" in arm and "manylinux2010_aarch64" not in arm
    assert wh.manylinux_platforms("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


# A made-up index: {name: {version: Requires-Dist}}
INDEX = {
    "deepspeed": {"0.19.8": ["torch>=2.0.0", "pydantic>=2.0.0", "hjson", "numpy", "psutil",
                             'pywin32; sys_platform == "win32"', 'pytest; extra == "dev"']},
    "megatron-core": {"0.16.1": ["torch>=2.6.0", "numpy", "packaging>=24.2", 'tomli; python_version < "3.11"']},
    "transformers": {"5.17.0": [], "5.24.0": ["huggingface-hub<3.0,>=1.31.0", "tokenizers<0.24.0,>=0.23.1",
                                              "safetensors>=0.8.0", "numpy>=1.17"]},
    "datasets": {"5.2.0": ["fsspec[http]<=2026.9.0,>=2023.1.0", "dill<0.4.2,>=0.3.0", "multiprocess<0.70.20",
                           "huggingface-hub<3.0,>=1.31.0"]},
    "fsspec": {"2026.9.0": ['aiohttp!=4.0.0a0; extra == "http"', 'requests; extra == "ssh"'],
               "2026.10.0": []},
    "aiohttp": {"3.13.0": ["yarl"]},
    "yarl": {"1.20.0": []},
    "pydantic": {"2.13.0": ["pydantic-core==2.40.0"], "2.14.4": ["pydantic-core==2.50.5", "annotated-types>=0.6.0"]},
    "pydantic-core": {"2.40.0": [], "2.50.5": []},
    "annotated-types": {"0.8.0": []},
    "hjson": {"3.1.0": []},
    "dill": {"0.4.1": [], "0.4.2": []},
    "multiprocess": {"0.70.19": ["dill>=0.4.1"], "0.70.20": ["dill>=0.4.2"]},
    "tokenizers": {"0.23.2": ["huggingface-hub>=0.16.4"]},
    "tensorboard": {"2.21.0": []},
    "pywin32": {"311": []}, "tomli": {"2.0": []}, "pytest": {"9.0": []},
}
ROOTS = ["torch>=2.11,<2.14", "deepspeed==0.19.8", "megatron-core==0.16.1", "transformers==5.24.0",
         "datasets==5.2.0", "tensorboard==2.21.0", "safetensors>=0.4"]
BASE = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "tensorboard": None, "safetensors": "0.8.0",
        "numpy": "2.5.2", "huggingface-hub": "1.33.0", "psutil": None, "packaging": None, "requests": None}


def fake_fetch(index, calls):
    def fetch(name, spec):
        calls.append((name, str(spec)))
        ok = [v for v in index.get(name, {}) if spec.contains(v, prereleases=True)]
        if not ok:
            raise LookupError(f"no {name}{spec} in the index")
        v = wh.pinned_version(spec) or max(ok, key=wh.Version)
        return wh.Dist(name, v, index[name][v])
    return fetch


def test_closure_for_the_gpu_node():
    calls = []
    c = wh.Closure(ENV312, BASE, fake_fetch(INDEX, calls)).resolve(ROOTS)
    got = {n: d.version for n, d in c.chosen.items()}
    assert got == {"deepspeed": "0.19.8", "megatron-core": "0.16.1", "transformers": "5.24.0",
                   "datasets": "5.2.0", "fsspec": "2026.9.0", "aiohttp": "3.13.0", "yarl": "1.20.0",
                   "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "hjson": "3.1.0",
                   "dill": "0.4.1", "multiprocess": "0.70.19", "tokenizers": "0.23.2"}
    fetched = [n for n, _ in calls]
    assert "torch" not in fetched and not any(n.startswith("nvidia-") for n in fetched)
    # markers for another platform or Python, and extras nobody asked for, are not followed
    assert not {"pywin32", "tomli", "pytest", "requests"} & set(fetched)
    # the base's copies that do are used: numpy, huggingface-hub, safetensors, and tensorboard (no version known)
    assert not {"numpy", "huggingface-hub", "safetensors", "tensorboard", "psutil", "packaging"} & set(fetched)
    rep = c.report()
    assert ("transformers", "5.17.0", "==5.24.0") not in rep["base"]  # the pin needs 5.24.0: shipped
    assert ("tensorboard", "", "==2.21.0") in rep["unverified"]
    assert ("torch", "2.11.0+cu130", "<2.14,>=2.0.0,>=2.11,>=2.6.0") in rep["exclude"] and not rep["missing"]


def test_one_version_of_each_and_what_a_replaced_version_needed_is_dropped():
    """c is fetched (newest, 2.0, which needs d) before e's bound c<2 is seen: the closure must
    replace it by 1.0 and drop d, which only the replaced version needed."""
    index = {"a": {"1": ["c"]}, "b": {"1": ["e"]}, "e": {"1": ["c<2"]},
             "c": {"1.0": [], "2.0": ["d"]}, "d": {"1": []}}
    calls = []
    c = wh.Closure(ENV312, {}, fake_fetch(index, calls)).resolve(["a", "b"], "root")
    assert {n: d.version for n, d in c.chosen.items()} == {"a": "1", "b": "1", "e": "1", "c": "1.0"}
    assert ("c", "") in calls and ("c", "<2") in calls and ("d", "") in calls  # c fetched twice, kept once


def test_a_stricter_need_than_the_base_has_fetches_it():
    index = {"app": {"1": ["lib>=2"]}, "lib": {"2.5": []}}
    base = {"lib": "1.0"}
    c = wh.Closure(ENV312, base, fake_fetch(index, [])).resolve(["app"], "root")
    assert c.chosen["lib"].version == "2.5"
    c = wh.Closure(ENV312, {"lib": "3.0"}, fake_fetch(index, [])).resolve(["app"], "root")
    assert "lib" not in c.chosen


def test_conflict_names_who_asked():
    index = {"a": {"1": ["c>=2"]}, "b": {"1": ["c<2"]}, "c": {"1.0": [], "2.0": []}}
    with pytest.raises((RuntimeError, LookupError), match="c"):
        wh.Closure(ENV312, {}, fake_fetch(index, [])).resolve(["a", "b"], "root")


def test_torch_missing_from_the_base_is_reported_not_fetched():
    calls = []
    c = wh.Closure(ENV312, {}, fake_fetch({"x": {"1": ["torch>=2", "nvidia-nccl-cu13"]}}, calls)).resolve(["x"], "root")
    assert calls == [("x", "")]
    assert {r[0] for r in c.report()["missing"]} == {"torch", "nvidia-nccl-cu13"}


def test_wheel_metadata(tmp_path):
    whl = tmp_path / "demo_pkg-1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("demo_pkg/__init__.py", "")
        z.writestr("demo_pkg-1.2.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: Demo_Pkg\nVersion: 1.2\nRequires-Dist: numpy>=1\n"
                   'Requires-Dist: pytest; extra == "test"\n\nA description.\n')
    d = wh.wheel_metadata(whl)
    assert (d.name, d.version, d.requires) == ("demo-pkg", "1.2", ["numpy>=1", 'pytest; extra == "test"'])


def test_the_repos_pyproject_and_the_gpu_node_base_file():
    """The shipped base file parses, and the project's torch range admits the node's torch 2.11
    (pip on the node would otherwise look for a torch the wheelhouse never carries)."""
    name, deps = wh.read_project(ROOT / "pyproject.toml")
    base = wh.parse_base((ROOT / "tools/wheelhouse/gpu_node_image.txt").read_text())
    assert name == "trinityx-ds"
    torch_req = next(wh.Requirement(d) for d in deps if wh.Requirement(d).name == "torch")
    assert wh.base_accepts(base["torch"], torch_req.specifier)
    assert base["transformers"] == "5.17.0" and base["tensorboard"] is None and "pydantic" not in base
