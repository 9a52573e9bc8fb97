"""Every typed error quantkit raises has exactly one message row at the CLI edge."""

import inspect

from quantkit import errors as e
from quantkit.cli.errors import ERROR_TABLE


def test_every_error_has_a_row():
    classes = [c for _, c in inspect.getmembers(e, inspect.isclass) if issubclass(c, e.QuantkitError)]
    abstract = {e.QuantkitError, e.CalibrationError}
    assert sorted(c.__name__ for c in classes if c not in abstract and c not in ERROR_TABLE) == []
