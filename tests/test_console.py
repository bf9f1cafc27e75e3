"""The CLI's console: libraries' INFO lines (orbax, TFDS, XLA) are hidden, the project's own
INFO lines and every library's warnings are not; absl's --verbosity brings everything back."""

import logging

import pytest
from absl import flags
from absl import logging as absl_logging

from dfrec_jax import __main__ as cli


@pytest.fixture
def restore_levels():
    names = ("absl", "dfrec_jax", "data_pipelines", "")
    levels = {n: logging.getLogger(n).level for n in names}
    verbosity = absl_logging.get_verbosity()
    was_parsed = flags.FLAGS.is_parsed()
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    absl_logging.set_verbosity(verbosity)
    if not was_parsed:
        flags.FLAGS.unparse_flags()


def test_library_info_hidden_project_info_and_warnings_kept(restore_levels):
    flags.FLAGS(["dfrec_jax"])  # no --verbosity given
    absl_logging.set_verbosity(absl_logging.INFO)  # what a library's import may leave
    cli.quiet_library_logs()
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)  # orbax, tfds, xla_bridge
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
    assert logging.getLogger("dfrec_jax.train.trainer").isEnabledFor(logging.INFO)
    assert logging.getLogger("data_pipelines.builders.lfw_swap").isEnabledFor(logging.INFO)


def test_verbosity_flag_shows_everything(restore_levels):
    flags.FLAGS(["dfrec_jax", "--verbosity", "0"])
    cli.quiet_library_logs()
    assert logging.getLogger("absl").isEnabledFor(logging.INFO)
