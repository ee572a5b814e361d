"""How a config section reports a broken rule: one line, `<dotted.key>: <value> — <what is allowed>`.

Every section module (sections_model, sections_run, schema's RunConfig) and the loader word
their problems through `problem`, so a user reads one shape of message for the whole recipe.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A run configuration that cannot be used; carries every problem, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def problem(key: str, value, allowed: str) -> str:
    return f"{key}: {value!r} — {allowed}"


def need(out: list[str], ok: bool, key: str, value, allowed: str) -> None:
    """Appends the problem to `out` unless `ok`: every rule is checked, none stops the others."""
    if not ok:
        out.append(problem(key, value, allowed))
