"""The files the package ships beside its code: stock DeepSpeed configs, Slurm templates, recipes.

They live at the repository's top level (`ds_configs/`, `slurm/`, `configs/`: what a user of the
checkout reads and edits) and are reached from the code only as package data,
`importlib.resources.files("trinityx_ds") / "_data" / <folder>`:

- in a checkout, `trinityx_ds/_data/<folder>` is a relative symlink to the top-level folder, so
  the top level stays the one source of truth (an edit there is what the code reads, nothing is
  generated or copied);
- in a wheel, setuptools' `package-data` (`_data/**`, pyproject.toml) follows those symlinks and
  stores the real files under `trinityx_ds/_data/`, so an installed package (a container, a
  cluster's shared venv) finds them the same way, with no repository around.

Why not `[tool.setuptools.data-files]`: it installs outside the package (`<prefix>/...`), where
importlib.resources cannot see it. Why not paths relative to `__file__`'s parents: they point at
site-packages' parent once installed, and the stock ZeRO settings silently went missing there.
pip never installs a package zipped, so the resources are real directories and a `Path` is
returned (callers print it and hand it to other tools).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

FOLDERS = ("ds_configs", "slurm", "configs")


def data_dir(folder: str) -> Path:
    """The shipped folder `folder` (one of FOLDERS), from the checkout or the installed package."""
    if folder not in FOLDERS:
        raise ValueError(f"package data folder: {folder!r} — one of {', '.join(FOLDERS)}")
    path = Path(str(importlib.resources.files("trinityx_ds") / "_data" / folder))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the package's {folder}/ is missing (a broken install: reinstall "
                                f"trinityx-ds, or in a checkout restore the symlink trinityx_ds/_data/{folder})")
    return path


def data_file(folder: str, *parts: str) -> Path:
    """One file of a shipped folder, e.g. data_file("ds_configs", "zero3.json") (may not exist)."""
    return data_dir(folder).joinpath(*parts)


def package_root() -> Path:
    """The folder that holds the `trinityx_ds` package: the checkout's root, or site-packages.
    The stock recipes name the fixtures as `../trinityx_ds/fixtures/...` from `configs/`, which
    resolves against this folder in both cases (see demo.write_run_config)."""
    return Path(str(importlib.resources.files("trinityx_ds"))).parent


def fixtures_dir() -> Path:
    """The project's own small data files (`trinityx_ds/fixtures/data`, shipped in the wheel): what
    the demo, the tiny tokenizer, the smoke runs and the tests train and evaluate on where the real
    samples are absent."""
    return Path(str(importlib.resources.files("trinityx_ds"))) / "fixtures" / "data"
