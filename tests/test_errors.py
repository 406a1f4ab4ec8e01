"""One vocabulary of errors and methods.

Every error a ggq module raises for the user derives from ``GGQError`` (and keeps its ValueError
or RuntimeError base, so ``except ValueError`` code still works); the CLI turns any GGQError,
whichever module raised it, into one line and exit status 2. A new module whose error forgets
the root fails here, not as a traceback in front of a user.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import ggq
from ggq.cli import main
from ggq.errors import GGQError
from ggq.solvers.method import CALIBRATED, METHODS, Method, MethodError, calibrated_list, method

# exception classes in ggq that are not user-facing errors, and why
NOT_GGQ_ERRORS = {
    "ggq.cli.UserError": "click's form of a GGQError on the command line (exit 2)",
    "ggq.signals.Terminated": "SIGTERM unwinding the command, as KeyboardInterrupt does for SIGINT",
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in ggq's Python modules (the compiled ones, _native and
    _quants, raise their own errors, which the Python modules wrap: PerplexityError, QuantError)."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(ggq.__path__, "ggq."):
        mod = importlib.import_module(info.name)
        if not str(getattr(mod, "__file__", "")).endswith(".py"):
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == mod.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_user_facing_error_derives_from_ggq_error() -> None:
    classes = _exception_classes()
    assert {"ggq.convert.ConvertError", "ggq.gguf.reader.GGUFFormatError", "ggq.native.NativeError"} <= set(
        classes
    )  # the walk sees the package
    assert set(NOT_GGQ_ERRORS) <= set(classes)  # the exceptions still exist
    strays = [n for n, c in classes.items() if n not in NOT_GGQ_ERRORS and not issubclass(c, GGQError)]
    assert strays == [], f"derive these from ggq.errors.GGQError: {strays}"
    lost = [
        n
        for n, c in classes.items()
        if c is not GGQError and n not in NOT_GGQ_ERRORS and not issubclass(c, ValueError | RuntimeError)
    ]
    assert lost == [], f"these lost their ValueError/RuntimeError base: {lost}"


class _DeepError(GGQError):
    """A GGQError from nowhere in particular: the CLI must not need to know the class."""


def _raise(exc: BaseException) -> Any:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    return fail


def _commands(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Each command, with the library call it makes first (patched to raise)."""
    model = tmp_path / "m.gguf"
    return [
        (["convert", str(tmp_path), "--dry-run"], "ggq.convert_cli.run_cli"),
        (["ppl", str(model)], "ggq.ppl.run_cli"),
        (["chat", str(model), "-p", "hi"], "ggq.chat.ChatSession"),
        (["bench", str(model)], "ggq.bench.run_cli"),
        (["study", str(tmp_path)], "ggq.study.Study"),
    ]


def _one_line(result: Result, expected: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"Error: {expected}"]


@pytest.mark.parametrize("index", range(5), ids=["convert", "ppl", "chat", "bench", "study"])
def test_cli_turns_any_ggq_error_into_one_line(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, target = _commands(tmp_path)[index]
    monkeypatch.setattr(target, _raise(_DeepError(f"{args[0]}: something named")))
    _one_line(CliRunner().invoke(main, args), f"{args[0]}: something named")


@pytest.mark.parametrize("index", range(5), ids=["convert", "ppl", "chat", "bench", "study"])
def test_os_errors_are_one_line_only_where_they_were(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert and study read and write the user's files: an OSError is one line there; the
    other commands never caught it, and do not now."""
    args, target = _commands(tmp_path)[index]
    monkeypatch.setattr(target, _raise(PermissionError(13, "Permission denied", "x.gguf")))
    result = CliRunner().invoke(main, args)
    if args[0] in ("convert", "study"):
        _one_line(result, "[Errno 13] Permission denied: 'x.gguf'")
    else:
        assert isinstance(result.exception, PermissionError)


def test_cli_lets_other_exceptions_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is a traceback, not a one-line 'bad input'."""
    monkeypatch.setattr("ggq.bench.run_cli", _raise(ZeroDivisionError("a bug")))
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "m.gguf")])
    assert isinstance(result.exception, ZeroDivisionError)


# -- methods --------------------------------------------------------------------------------


def test_methods_say_what_they_do() -> None:
    assert list(METHODS) == ["rtn", "gptq", "awq", "awq+gptq"]  # the CLI's choices, in its order
    assert method("rtn") == Method("rtn", uses_gptq=False, scales_activations=False, needs_calibration=False)
    assert [m.name for m in METHODS.values() if m.uses_gptq] == ["gptq", "awq+gptq"]
    assert [m.name for m in METHODS.values() if m.scales_activations] == ["awq", "awq+gptq"]
    assert CALIBRATED == ("gptq", "awq", "awq+gptq")
    assert calibrated_list() == "gptq, awq or awq+gptq"


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(MethodError, match=r"unknown method 'smoothquant'; known: rtn, gptq, awq, awq\+gptq"):
        method("smoothquant")
    with pytest.raises(ValueError):  # still a ValueError for code that catches those
        method("")


def test_cli_method_choices_come_from_the_registry() -> None:
    result = CliRunner().invoke(main, ["convert", "--help"])
    assert "[rtn|gptq|awq|awq+gptq]" in result.output
    result = CliRunner().invoke(main, ["study", "--help"])
    assert "Comma-separated: rtn, gptq, awq, awq+gptq." in result.output
