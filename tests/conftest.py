"""Shared fixtures."""

import re

import pytest

# kdcache's log format: "HH:MM:SS LEVEL logger: message".
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


@pytest.fixture
def error_line(capsys):
    """Reads stderr and returns the command's one error line, checked to be the only line there besides logs."""

    def read() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if not LOG_LINE.match(line)]
        assert len(lines) == 1 and lines[0].startswith("kdcache") and "Traceback" not in err, err
        return lines[0]

    return read
