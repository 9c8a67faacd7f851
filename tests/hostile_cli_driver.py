"""Run several `edgeid` command lines in one process (a test helper, not a test).

``python tests/hostile_cli_driver.py CALLS.json`` reads a JSON list of argument lists, runs
each through ``edgeid.cli.main`` with its stdout and stderr captured at the file-descriptor
level and a per-call alarm, and prints a JSON list of ``{"rc", "stderr", "escaped", "hung"}``:
``escaped`` is the traceback of an exception that got out of ``main`` (there must be none),
``hung`` is true when the alarm fired (a call that blocks). One process per command keeps the
every-command test affordable: a subprocess per call would spend minutes importing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from types import FrameType

CALL_TIMEOUT_S = 20


class Hung(BaseException):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hung


def run(argv: list[str]) -> dict[str, object]:
    from edgeid.cli import main

    result: dict[str, object] = {"argv": argv, "rc": None, "escaped": None, "hung": False}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        signal.alarm(CALL_TIMEOUT_S)
        try:
            result["rc"] = main(argv)
        except SystemExit as exc:  # argparse refusing the arguments
            result["rc"] = exc.code
        except Hung:
            result["hung"] = True
        except BaseException:
            result["escaped"] = traceback.format_exc()
        finally:
            signal.alarm(0)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        err.seek(0)
        result["stderr"] = err.read().decode("utf-8", "replace")
    return result


def main() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    calls = json.loads(Path(sys.argv[1]).read_text())
    results = [run(argv) for argv in calls]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
