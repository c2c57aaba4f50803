"""scripts/perturbed_numerics.py fails a setting that ran no test: a path without trajectory tests (pytest's exit
5) or one whose tests all skipped must not read as passed."""
import importlib.util

from lm_helpers import REPO

spec = importlib.util.spec_from_file_location("perturbed_numerics", REPO / "scripts" / "perturbed_numerics.py")
perturbed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(perturbed)


def test_a_setting_that_ran_no_test_fails(capsys):
    assert perturbed.main(["tests/test_warmup.py", "--settings", "one-thread"]) == 1  # no trajectory test there
    captured = capsys.readouterr()
    assert "one-thread (pytest exit 5)" in captured.err and "ran no test" in captured.err
    assert "perturbed: 0 passed, 0 failed" in captured.out
