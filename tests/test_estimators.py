"""tepo.evaluation estimators: pass@k, avg@n, maj@k, bootstrap_ci."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo.evaluation import avg_at_n, bootstrap_ci, maj_at_k, pass_at_k


def test_pass_at_k_spec_example():
    # OBJECTIVES.md / research-notes 9: n=32, c=8
    assert pass_at_k(32, 8, 1) == pytest.approx(0.25, abs=1e-12)
    assert pass_at_k(32, 8, 4) == pytest.approx(0.704505, abs=1e-6)
    assert pass_at_k(32, 8, 8) == pytest.approx(0.930077, abs=1e-6)
    assert pass_at_k(32, 8, 16) == pytest.approx(0.998776, abs=1e-6)
    assert pass_at_k(32, 8, 32) == 1.0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_pass_at_k_equals_the_binomial_form(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-14)


def test_pass_at_k_edges_and_stability():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(np.int64(5), np.int64(1), np.int64(1)) == pytest.approx(0.2)
    big = pass_at_k(100000, 3, 1000)  # binomials of this size overflow floats; the product does not
    assert big == pytest.approx(1 - math.comb(99997, 1000) / math.comb(100000, 1000), rel=1e-10)


@pytest.mark.parametrize(
    "args,word", [((4, 1, 5), "k <= n"), ((4, 5, 1), "c"), ((-1, 0, 1), "n"), ((4, -1, 1), "c"), ((4, 1, 0), "k"), ((4.0, 1, 1), "integer")]
)
def test_pass_at_k_errors(args, word):
    with pytest.raises(ValueError, match=word):
        pass_at_k(*args)


def test_avg_at_n():
    assert avg_at_n([8], 32) == 0.25
    assert avg_at_n([0, 4, 2], 4) == pytest.approx((0 + 1 + 0.5) / 3)
    assert avg_at_n([1, 2], [2, 8]) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="exceeds"):
        avg_at_n([5], 4)
    with pytest.raises(ValueError, match="at least one"):
        avg_at_n([], 4)
    with pytest.raises(ValueError, match="entries"):
        avg_at_n([1, 2], [4])
    with pytest.raises(ValueError, match=">= 0"):
        avg_at_n([-1], 4)


def test_maj_at_k():
    answers = ["3", "4", "4", "3", None, "5"]
    correct = [True, False, False, True, False, False]
    assert maj_at_k(answers, correct, 1) == 1.0  # only "3"
    assert maj_at_k(answers, correct, 3) == 0.0  # "4" twice
    assert maj_at_k(answers, correct, 4) == 1.0  # tie 2-2: "3" appeared first
    assert maj_at_k(answers, correct, 6) == 1.0  # None does not vote
    assert maj_at_k([None, None, "7"], [False, False, True], 2) == 0.0  # all None -> wrong
    assert maj_at_k([None, None, "7"], [False, False, True], 3) == 1.0
    assert maj_at_k([None, "1", "2", "2"], [False, True, False, False], 3) == 1.0  # tie, "1" first
    with pytest.raises(ValueError, match="k"):
        maj_at_k(["1"], [True], 2)
    with pytest.raises(ValueError, match="entries"):
        maj_at_k(["1", "2"], [True], 1)


def test_bootstrap_ci():
    values = [0.0, 1.0] * 50
    lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)
    assert lo < 0.5 < hi
    assert (lo, hi) == bootstrap_ci(values, n_boot=2000, seed=0)  # deterministic
    smooth = list(np.linspace(0.0, 1.0, 37))
    assert bootstrap_ci(smooth, seed=0) != bootstrap_ci(smooth, seed=1)  # the seed matters
    # the 95% interval of a mean of 100 Bernoulli(0.5): about +-1.96 * 0.05
    assert hi - lo == pytest.approx(2 * 1.96 * 0.05, rel=0.15)
    narrow = bootstrap_ci(values, n_boot=2000, alpha=0.5, seed=0)
    assert lo <= narrow[0] <= narrow[1] <= hi
    assert bootstrap_ci([0.3], n_boot=10) == (0.3, 0.3)
    assert bootstrap_ci([0.2] * 7) == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0], alpha=1.5)


def test_evaluation_package_import_is_light():
    code = "import sys, tepo.evaluation; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
