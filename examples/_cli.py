"""What the absl examples share: a quiet TensorFlow start and kind exits.

- `quiet_tensorflow()`: TensorFlow's C++ INFO lines off
  (`TF_CPP_MIN_LOG_LEVEL=2` unless set) and the lines it prints while
  loading (oneDNN, CPU features), which no setting turns off, kept from the
  terminal; they are shown if the import fails.
- `run(main)`: `absl.app.run(main)` where an expected user error (a bad
  flag, missing data: `absl.app.UsageError`, see `user_errors`) prints its
  message and exits with status 1 without a traceback or the whole help
  text, and absl's own INFO logs (TensorFlow's SavedModel notices) are off
  unless `--verbosity` is given.
"""

import contextlib
import os
import sys
import tempfile


def quiet_tensorflow():
    """Import TensorFlow with its start-up lines hidden (see the module)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def user_errors(*types):
    """Within the block, an error of one of `types` (missing data, no
    network: the loaders' messages name the fix) becomes a `UsageError`,
    so `run` prints its message without a traceback."""
    from absl import app

    try:
        yield
    except types as error:
        raise app.UsageError(str(error)) from error


def quiet_logs():
    """absl's (and so TensorFlow's Python) INFO logs off, unless the user
    asked for them with `--verbosity`."""
    from absl import flags
    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run(main):
    """`absl.app.run(main)`; a `UsageError` prints `<script>: error: ...`
    and exits with status 1 (absl alone would print the whole help first)."""
    from absl import app

    def checked_main(argv):
        quiet_logs()
        quiet_tensorflow()
        try:
            return main(argv)
        except app.UsageError as error:
            script = os.path.basename(sys.argv[0])
            sys.stdout.flush()
            sys.exit(f"{script}: error: {error}\n(--help lists every flag and what the example "
                     "needs to run offline.)")

    app.run(checked_main)
