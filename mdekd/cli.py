"""What every command-line entry point shares: argument checks, quiet logs, one-line errors.

``@command("mdekd.evaluate")`` wraps an absl ``main(argv)``: stray positional arguments are a usage
error, absl logs at WARNING unless ``--verbosity`` is given (TF's converter logs every step at
INFO), and a user error (``ValueError``/``OSError`` and the given ``errors``: a missing file, a
bad flag value, an output that cannot be written) prints ``<program>: error: <message>`` on stderr
and exits 1, without a traceback. The message names the flag or file (see each raise).
"""

import functools
import sys

USER_ERRORS = (ValueError, OSError)


def command(program, errors=()):
    """Decorator for an absl ``main(argv)`` (see the module docstring); returns its exit code."""
    caught = USER_ERRORS + tuple(errors)

    def decorate(main):
        @functools.wraps(main)
        def wrapped(argv):
            from absl import app, flags, logging

            if len(argv) > 1:
                raise app.UsageError(f"unexpected arguments: {argv[1:]}")
            if not flags.FLAGS["verbosity"].present:
                logging.set_verbosity(logging.WARNING)
            try:
                return main(argv) or 0
            except caught as error:
                print(f"{program}: error: {error}", file=sys.stderr)
                return 1

        return wrapped

    return decorate
