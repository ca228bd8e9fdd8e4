"""The differential engine's line choices, one relaxation at a time, against answers worked out by
hand (in the style of jax_verify's linear_relaxations_test): each line must be the stated one."""
import torch

from diffprobe.activations import RELU_FN


def t(*values):
    return torch.tensor([list(values)], dtype=torch.float64)


def test_relu_lines_of_unstable_and_stable_neurons():
    lower, lower_c, upper, intercept = RELU_FN.lines(t(-1.0, 1.0, -3.0, -2.0), t(3.0, 2.0, -1.0, 1.0))
    assert (lower_c == 0).all()
    # [-1, 3]: the chord 3/4 (z + 1); u > -l, so the lower line is z itself
    assert lower[0, 0] == 1 and upper[0, 0] == 0.75 and intercept[0, 0] == 0.75
    # active [1, 2]: relu(z) = z; inactive [-3, -1]: 0
    assert (lower[0, 1], upper[0, 1], intercept[0, 1]) == (1, 1, 0)
    assert (lower[0, 2], upper[0, 2], intercept[0, 2]) == (0, 0, 0)
    # [-2, 1]: u < -l, so the lower line is 0; the chord (z + 2) / 3
    assert lower[0, 3] == 0 and abs(upper[0, 3] - 1 / 3) < 1e-15 and abs(intercept[0, 3] - 2 / 3) < 1e-15


def _lines(l, u, lp, up, dl, du):
    lo_p, up_p, lo_q, up_q, lo_r, up_r = (x[0, 0].item() for x in RELU_FN.differences(t(l), t(u), t(lp), t(up), t(dl), t(du)))
    return (lo_p, lo_q, lo_r), (up_p, up_q, up_r)  # E >= lo_p D + lo_q z + lo_r, E <= up_p D + up_q z + up_r


def test_difference_lines_are_exact_for_stable_pairs():
    assert _lines(1, 2, 0.5, 3, -0.5, 1) == ((1, 0, 0), (1, 0, 0))  # both active: E = D
    assert _lines(-3, -1, -2, -0.5, -1, 1.5) == ((0, 0, 0), (0, 0, 0))  # both inactive: E = 0
    assert _lines(1, 2, -3, -1, -5, -2) == ((0, -1, 0), (0, -1, 0))  # a active, b inactive: E = -z
    assert _lines(-2, -1, 1, 3, 2, 5) == ((1, 1, 0), (1, 1, 0))  # a inactive, b active: E = z + D


def test_difference_chords_when_the_pair_is_unstable():
    # z in [-10, 10] (a triangle gap of 5 per network), D in [-1, 3]: the chords of
    # min(D, 0) <= E <= max(D, 0) are E >= (D - 3) / 4 and E <= 3 (D + 1) / 4
    (lo_p, lo_q, lo_r), (up_p, up_q, up_r) = _lines(-10, 10, -9, 11, -1, 3)
    assert (lo_p, lo_q, lo_r) == (0.25, 0, -0.75) and (up_p, up_q, up_r) == (0.75, 0, 0.75)
    # D of one sign: E lies between 0 and D
    assert _lines(-10, 10, -9, 11, 0.5, 2) == ((0, 0, 0), (1, 0, 0))
    assert _lines(-10, 10, -9, 11, -2, -0.5) == ((1, 0, 0), (0, 0, 0))


def test_independent_lines_win_when_the_models_genuinely_differ():
    # z in [-1, 1] and z' = z + D in [-1, 1] (triangle gaps 1/2 each) but D in [-2, 2] (chord gap 2):
    # E >= a' z' - (s z + t) and E <= s' z' + t' - a z with the networks' own CROWN lines
    (lo_p, lo_q, lo_r), (up_p, up_q, up_r) = _lines(-1, 1, -1, 1, -2, 2)
    a, s, t_ = 0.0, 0.5, 0.5  # relu on [-1, 1]: lower slope 0 (u > -l fails), chord 0.5 z + 0.5
    assert (lo_p, lo_q, lo_r) == (a, a - s, -t_) and (up_p, up_q, up_r) == (s, s - a, t_)
