"""The project's errors, where users look: IPython (a notebook, the app's page) shows their message alone."""
import pytest

from helpers import analysis, errors


def test_a_project_error_renders_as_its_own_line():
    e = errors.InputError("level must be a share between 0 and 1 (0.95 for a 95% interval), got 95")
    assert e._render_traceback_() == ["InputError: level must be a share between 0 and 1 (0.95 for a 95% interval), got 95"]
    assert isinstance(e, ValueError) and isinstance(errors.InputTypeError("x"), TypeError)
    assert isinstance(errors.StateError("x"), RuntimeError)


def test_in_ipython_the_message_comes_alone_without_its_chained_causes(capsys):
    shell = pytest.importorskip("IPython.core.interactiveshell").InteractiveShell.instance()

    class DataNotFoundError(errors.OneLineError, RuntimeError):  # as helpers.data declares its error
        pass

    shell.user_ns.update(DataNotFoundError=DataNotFoundError, analysis=analysis)
    shell.run_cell(
        "try:\n"
        "    raise OSError('[Errno -2] Name or service not known')\n"
        "except OSError as e:\n"
        "    raise DataNotFoundError('CIFAR-10 could not be loaded: offline\\nProvide it in one of these ways: ...') from e\n")
    out = capsys.readouterr().out
    assert out.strip().splitlines() == ["DataNotFoundError: CIFAR-10 could not be loaded: offline",
                                        "Provide it in one of these ways: ..."]
    shell.run_cell("analysis.judge([0.1, 0.2], level=95)")
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line == "InputError: level must be a share between 0 and 1 (0.95 for a 95% interval), got 95"
