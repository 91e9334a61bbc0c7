"""The protocol package's one exception root, and how a refused document is described."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails

# A refusal names at most this many problems: a megabyte of bad input must not make a
# megabyte-sized (or, listing every problem, a fifteen-times larger) answer.
MAX_PROBLEMS_SHOWN = 5


class ProtocolError(Exception):
    """Base of every error the protocol package raises: a refused envelope, a bad key file, a
    server that refused a request or could not be reached."""


def describe_validation(exc: ValidationError, limit: int = MAX_PROBLEMS_SHOWN) -> str:
    """``exc`` as one bounded line: how many problems, and the first ``limit`` of them as
    ``field.path: message``. Input values are never echoed (they may be huge, or secrets)."""
    problems = exc.errors(include_url=False)
    shown = []
    for problem in problems[:limit]:
        where = ".".join(str(part) for part in problem["loc"])[:120] or "(the document)"
        shown.append(f"{where}: {_message(problem)[:200]}")
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"{count}: {'; '.join(shown)}{more}"


def _message(problem: ErrorDetails) -> str:
    """The problem's message; for a reported path that fails its pattern, what is wrong with
    it in check_relative_path's words (the pattern itself says nothing to a person)."""
    from .wire import REPORTED_PATH_PATTERN, PathRuleError, check_relative_path

    ctx = problem.get("ctx") or {}
    if problem["type"] == "string_pattern_mismatch" and ctx.get("pattern") == REPORTED_PATH_PATTERN:
        try:
            check_relative_path(str(problem["input"]))
        except PathRuleError as exc:
            return str(exc)
    return problem["msg"]
