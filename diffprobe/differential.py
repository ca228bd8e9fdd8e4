"""Differential bound propagation for near-identical pairs (ReluDiff / NeuroDiff, backward form).

CROWN on the composed graph relaxes the ReLUs of both networks independently, so their slack adds
up. Here the difference itself is tracked: for layer k, D_k = z'_k - z_k (pre-activations) and
E_k = h'_k - h_k (post-activations), with
    D_k = W'_k E_{k-1} + (W'_k - W_k) h_{k-1} + (b'_k - b_k),   E_0 = 0 (shared input),
and E = relu(z + D) - relu(z) relaxed by chords in D (exact when both neurons are stable).
A linear form over (h_k, E_k) is back-substituted to the input as in CROWN; intermediate bounds of
z_k, z'_k and D_k come from the same backward pass started at each layer, D_k's intersected with
[l'_k - u_k, u'_k - l_k]. Works on chains of affine layers (Linear, Conv, BatchNorm in eval mode,
average pooling, reshapes: each lowered to a dense matrix) and ReLUs whose depths match; a layer
with fewer neurons in one model (node pruning) is padded with zero neurons.
"""
import copy
import math

import torch
from torch import nn

from .layers import Elementwise, Reshape


# Modules that are affine maps of one sample in eval mode; each is lowered to a dense matrix.
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool1d, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d, nn.ZeroPad2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout,
          Elementwise, Reshape)
MAX_DENSE = 25_000_000  # entries of one lowered matrix (200 MB in float64)


def _modules(model):
    """The leaf modules of a (possibly nested) Sequential, or None for any other model."""
    if not isinstance(model, nn.Sequential):
        return None
    leaves = []
    for m in model:
        inner = _modules(m) if isinstance(m, nn.Sequential) else [m]
        if inner is None:
            return None
        leaves += inner
    return leaves


def _dense(module, shape):
    """(W, b, output shape) of an affine `module` (in eval mode) on inputs of `shape` (one sample): a Linear
    layer's own weights, otherwise its responses to zero and to every unit vector; None when W
    would be too large."""
    if isinstance(module, nn.Linear) and len(shape) == 1:
        w = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else torch.zeros(len(w), dtype=torch.float64)
        return w, b, (len(w),)
    n = math.prod(shape)
    if any(t.dtype != torch.float64 for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()):
        module = copy.deepcopy(module).double()
    with torch.no_grad():
        b = module(torch.zeros(1, *shape, dtype=torch.float64))
        if n * b.numel() > MAX_DENSE:
            return None
        w = module(torch.eye(n, dtype=torch.float64).reshape(n, *shape)) - b
    return w.reshape(n, -1).T.contiguous(), b.reshape(-1), tuple(b.shape[1:])


def affine_chain(model, input_shape):
    """[(W, b), ...] in float64 with a ReLU between consecutive entries, or None when `model` is
    not a chain of affine layers (Linear, Conv, BatchNorm in eval mode, average pooling, reshapes,
    elementwise scaling) and ReLUs. Consecutive affine layers are composed into one."""
    modules = _modules(model)
    if modules is None:
        return None
    shape, layers, current = tuple(input_shape), [], None  # current: affine map since the last ReLU
    for m in modules:
        if isinstance(m, nn.ReLU):
            if current is None:
                return None
            layers.append(current[:2])
            current = None
            continue
        if not isinstance(m, AFFINE) or (m.training and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout))):
            return None  # in training mode these are not affine per sample
        lowered = _dense(m, shape)
        if lowered is None:
            return None
        w, b, shape = lowered
        if current is not None:
            if w.shape[0] * current[0].shape[1] > MAX_DENSE:
                return None
            w, b = w @ current[0], w @ current[1] + b
        current = (w, b)
    if current is None:
        return None
    return layers + [current]


def _matched_rows(big, small):
    """For each row of `small` ([n, d+1]: weights and bias), a distinct row of `big`: where a pruned
    copy's neurons sit in the original. Greedy, the rows closest to some original row first, each
    taking its nearest row still free."""
    dist = torch.cdist(small, big)
    rows = torch.empty(len(small), dtype=torch.long)
    for i in dist.amin(1).argsort().tolist():
        j = int(dist[i].argmin())
        rows[i] = j
        dist[:, j] = float("inf")
    return rows


def _spread(t, index, size, dim=0):
    """`t` placed at positions `index` along `dim` of a zero tensor of that dimension's `size`:
    a pruned layer's rows (a zero row gives relu(0) = 0, the pruned neuron's output) or the next
    layer's columns."""
    shape = list(t.shape)
    shape[dim] = size
    full = torch.zeros(shape, dtype=t.dtype)
    full.index_copy_(dim, index, t)
    return full


def aligned(chain_a, chain_b):
    """The two chains with equal hidden widths: where one has fewer neurons in a layer (a
    node-pruned copy), its neurons are placed at their closest match in the other and the rest
    padded with zero neurons; an equivalent network, so bounds stay sound. None when the depths or
    the input/output sizes differ."""
    if len(chain_a) != len(chain_b):
        return None
    out_a, out_b = [], []
    rows_a = rows_b = None  # where the previous layer's neurons went, if it was padded
    for k, ((wa, ba), (wb, bb)) in enumerate(zip(chain_a, chain_b)):
        if rows_a is not None:
            wa = _spread(wa, rows_a, len(out_a[-1][0]), dim=1)
        if rows_b is not None:
            wb = _spread(wb, rows_b, len(out_b[-1][0]), dim=1)
        if wa.shape[1] != wb.shape[1] or (k == len(chain_a) - 1 and len(wa) != len(wb)):
            return None
        rows_a = rows_b = None
        if len(wa) > len(wb):
            rows_b = _matched_rows(torch.cat([wa, ba[:, None]], 1), torch.cat([wb, bb[:, None]], 1))
            wb, bb = _spread(wb, rows_b, len(wa)), _spread(bb, rows_b, len(wa))
        elif len(wb) > len(wa):
            rows_a = _matched_rows(torch.cat([wb, bb[:, None]], 1), torch.cat([wa, ba[:, None]], 1))
            wa, ba = _spread(wa, rows_a, len(wb)), _spread(ba, rows_a, len(wb))
        out_a.append((wa, ba))
        out_b.append((wb, bb))
    return out_a, out_b


def matching_chains(pair):
    """Both models' affine chains when their structures match (after padding pruned neurons),
    else None."""
    a, b = affine_chain(pair.model_a, pair.input_shape), affine_chain(pair.model_b, pair.input_shape)
    if a is None or b is None:
        return None
    return aligned(a, b)


def _relu_lines(l, u):
    """CROWN lines of relu(z), z in [l, u] ([B, n] each): lower slope, upper slope, upper intercept."""
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    upper = torch.where(unstable, u / (u - l).clamp_min(1e-300), active.to(l.dtype))
    intercept = torch.where(unstable, -upper * l, torch.zeros_like(l))
    lower = torch.where(unstable, (u > -l).to(l.dtype), active.to(l.dtype))
    return lower, upper, intercept


def _diff_lines(l, u, lp, up, dl, du):
    """Lines E >= lo_p D + lo_q z + lo_r and E <= up_p D + up_q z + up_r for
    E = relu(z + D) - relu(z): chords of min(D, 0) <= E <= max(D, 0), exact when both neurons
    are stable."""
    zero, one = torch.zeros_like(l), torch.ones_like(l)
    width = (du - dl).clamp_min(1e-300)
    crossing = (dl < 0) & (du > 0)
    lo_p = torch.where(du <= 0, one, torch.where(dl >= 0, zero, -dl / width))
    up_p = torch.where(du <= 0, zero, torch.where(dl >= 0, one, du / width))
    lo_r = torch.where(crossing, dl * du / width, zero)
    up_r = torch.where(crossing, -du * dl / width, zero)
    lo_q, up_q = zero.clone(), zero.clone()
    exact = [((l >= 0) & (lp >= 0), 1.0, 0.0),  # both active: E = D
             ((u <= 0) & (up <= 0), 0.0, 0.0),  # both inactive: E = 0
             ((l >= 0) & (up <= 0), 0.0, -1.0),  # a active, b inactive: E = -z
             ((u <= 0) & (lp >= 0), 1.0, 1.0)]  # a inactive, b active: E = z + D
    for mask, p, q in exact:
        lo_p, up_p = torch.where(mask, p, lo_p), torch.where(mask, p, up_p)
        lo_q, up_q = torch.where(mask, q, lo_q), torch.where(mask, q, up_q)
        lo_r, up_r = torch.where(mask, 0.0, lo_r), torch.where(mask, 0.0, up_r)
    chord_gap = torch.where(crossing, -2 * dl * du / width, torch.maximum(dl.abs(), du.abs()))
    for k in range(len(exact)):
        chord_gap = torch.where(exact[k][0], zero, chord_gap)
    return _prefer_independent(chord_gap, (lo_p, up_p, lo_q, up_q, lo_r, up_r), l, u, lp, up)


def _triangle_gap(l, u):
    return torch.where((l < 0) & (u > 0), -l * u / (u - l).clamp_min(1e-300), torch.zeros_like(l))


def _prefer_independent(chord_gap, chord, l, u, lp, up):
    """Per neuron, the independent relaxation E = relu(z') - relu(z) with z' = z + D where its
    gap is smaller than the chords' (models that genuinely differ):
    E >= a' (z + D) - (s z + t)  and  E <= s' (z + D) + t' - a z."""
    a, s, t = _relu_lines(l, u)
    ap, sp, tp = _relu_lines(lp, up)
    independent = (ap, sp, ap - s, sp - a, -t, tp)
    use = _triangle_gap(l, u) + _triangle_gap(lp, up) < chord_gap
    return tuple(torch.where(use, i, c) for i, c in zip(independent, chord))


def _pick(lam, if_pos, if_neg):
    """lam * line, the line chosen per entry by the sign of lam (lower bound of lam * value)."""
    return torch.where(lam >= 0, lam * if_pos.unsqueeze(1), lam * if_neg.unsqueeze(1))


def _dot(lam, vec):
    return torch.bmm(lam, vec.unsqueeze(-1)).squeeze(-1)


def _concretize_lower(lam, const, lo, hi):
    return _dot(lam.clamp_min(0), lo) + _dot(lam.clamp_max(0), hi) + const


class DifferentialBounds:
    """Bounds of model_b(x) - model_a(x) over boxes, for a pair of matching affine/ReLU chains."""

    def __init__(self, chains):
        self.a, self.b = chains
        # (W'_k - W_k, b'_k - b_k) per layer, used by every back-substitution
        self.delta = [(wb - wa, bb - ba) for (wa, ba), (wb, bb) in zip(self.a, self.b)]

    def lower(self, spec_d, k, lo, hi, relax_a, relax_d):
        """Lower bound of spec_d · D_k over boxes [B, n] (spec_d: [B, m, n_k])."""
        lam_z = torch.zeros_like(spec_d)
        lam_d, const = spec_d, torch.zeros(spec_d.shape[:2], dtype=spec_d.dtype)
        for j in range(k, -1, -1):
            (wa, ba), (wb, _), (dw, db) = self.a[j], self.b[j], self.delta[j]
            # z_j = W_j h + b_j ;  D_j = W'_j E + (W'_j - W_j) h + (b'_j - b_j)
            const = const + lam_z @ ba + lam_d @ db
            lam_h = lam_z @ wa + lam_d @ dw
            lam_e = lam_d @ wb
            if j == 0:
                return _concretize_lower(lam_h, const, lo, hi)
            lower, upper, intercept = relax_a[j - 1]
            lo_p, up_p, lo_q, up_q, lo_r, up_r = relax_d[j - 1]
            const = (const + _dot(lam_h.clamp_max(0), intercept)
                     + _dot(lam_e.clamp_min(0), lo_r) + _dot(lam_e.clamp_max(0), up_r))
            lam_z = _pick(lam_h, lower, upper) + _pick(lam_e, lo_q, up_q)
            lam_d = _pick(lam_e, lo_p, up_p)

    def single_lower(self, chain, spec, k, lo, hi, relax):
        """Plain CROWN lower bound of spec · z_k for one network."""
        lam, const = spec, torch.zeros(spec.shape[:2], dtype=spec.dtype)
        for j in range(k, -1, -1):
            w, b = chain[j]
            const = const + lam @ b
            lam = lam @ w
            if j == 0:
                return _concretize_lower(lam, const, lo, hi)
            lower, upper, intercept = relax[j - 1]
            const = const + _dot(lam.clamp_max(0), intercept)
            lam = _pick(lam, lower, upper)

    @staticmethod
    def _refined(fn, rows, lower, upper, chunk=4096):
        """Interval bounds [B, n] tightened by back-substitution on the entries marked in `rows`
        [B, n]. Each marked (box, neuron) is one single-row problem, so boxes with few unstable
        neurons cost little however many another box has. `fn(spec, boxes)` bounds spec
        [P, 1, n] over the given boxes."""
        box, row = rows.nonzero(as_tuple=True)
        lower, upper = lower.clone(), upper.clone()
        for start in range(0, len(box), chunk):
            b, r = box[start:start + chunk], row[start:start + chunk]
            spec = torch.nn.functional.one_hot(r, lower.shape[1]).to(lower.dtype).unsqueeze(1)
            lower[b, r] = torch.maximum(lower[b, r], fn(spec, b).squeeze(1))
            upper[b, r] = torch.minimum(upper[b, r], -fn(-spec, b).squeeze(1))
        return lower, upper

    @property
    def hidden(self):
        """Hidden neurons per model, all layers."""
        return sum(w.shape[0] for w, _ in self.a[:-1])

    @torch.no_grad()
    def bounds(self, lo, hi, spec=None, given=None):
        """Lower/upper bounds of spec @ (model_b - model_a) over each box [B, n]. `given`: per
        hidden layer, sound bounds (l, u, l', u') of both models' pre-activations from elsewhere
        (e.g. alpha-CROWN on each network), intersected with the engine's own."""
        lo, hi = lo.reshape(len(lo), -1).double(), hi.reshape(len(hi), -1).double()
        relax_a, relax_d = self._intermediate(lo, hi, given)
        k, n_out = len(self.a) - 1, self.a[-1][0].shape[0]
        spec = torch.eye(n_out, dtype=lo.dtype) if spec is None else spec.to(lo.dtype)
        spec = spec.expand(lo.shape[0], *spec.shape)
        return (self.lower(spec, k, lo, hi, relax_a, relax_d),
                -self.lower(-spec, k, lo, hi, relax_a, relax_d))

    def _intermediate(self, lo, hi, given=None):
        """The relaxations of model_a's ReLUs and of the ReLU differences, per hidden layer.

        Intermediate bounds start as intervals (exact for the first layer) and are tightened by
        back-substitution only where the relaxation depends on them: neurons unstable in either
        model, and differences whose ReLU pair is not stable in a known pattern. That is what makes
        batches of many small regions cheap."""
        relax_a, relax_b, relax_d = [], [], []
        h_a = h_b = (lo, hi)
        e = (torch.zeros_like(lo), torch.zeros_like(lo))
        for k in range(len(self.a) - 1):
            (wa, ba), (wb, bb), (dw, db) = self.a[k], self.b[k], self.delta[k]
            l, u = _affine_interval(wa, ba, *h_a)
            lp, up = _affine_interval(wb, bb, *h_b)
            if given is not None:
                l, u, lp, up = _intersect((l, u), given[k][:2]) + _intersect((lp, up), given[k][2:])
            dl, du = _sum(_affine_interval(wb, torch.zeros_like(bb), *e), _affine_interval(dw, db, *h_a))
            if k > 0:  # the first layer's intervals are exact
                l, u = self._refined(lambda s, i: self.single_lower(self.a, s, k, lo[i], hi[i], _take(relax_a, i)),
                                     _unstable(l, u), l, u)
                lp, up = self._refined(lambda s, i: self.single_lower(self.b, s, k, lo[i], hi[i], _take(relax_b, i)),
                                       _unstable(lp, up), lp, up)
                dl, du = self._refined(lambda s, i: self.lower(s, k, lo[i], hi[i], _take(relax_a, i), _take(relax_d, i)),
                                       ~_exact_pattern(l, u, lp, up), dl, du)
            dl, du = torch.maximum(dl, lp - u), torch.minimum(du, up - l)
            relax_a.append(_relu_lines(l, u))
            relax_b.append(_relu_lines(lp, up))
            relax_d.append(_diff_lines(l, u, lp, up, dl, du))
            h_a, h_b = (l.clamp_min(0), u.clamp_min(0)), (lp.clamp_min(0), up.clamp_min(0))
            # E = relu(z') - relu(z) lies between min(D, 0) and max(D, 0) and in h'_k - h_k
            e = (torch.maximum(dl.clamp_max(0), h_b[0] - h_a[1]), torch.minimum(du.clamp_min(0), h_b[1] - h_a[0]))
        return relax_a, relax_d


def _intersect(x, y):
    return torch.maximum(x[0], y[0]), torch.minimum(x[1], y[1])


def _take(relaxations, index):
    """Each layer's relaxation tensors [B, n] restricted to the boxes in `index`."""
    return [tuple(t[index] for t in layer) for layer in relaxations]


def _affine_interval(w, b, lower, upper):
    """Exact bounds of w x + b over the boxes [lower, upper] ([B, n] each)."""
    mid, rad = (lower + upper) / 2, (upper - lower) / 2
    center = mid @ w.T + b
    spread = rad @ w.abs().T
    return center - spread, center + spread


def _sum(x, y):
    return x[0] + y[0], x[1] + y[1]


def _unstable(l, u):
    return (l < 0) & (u > 0)


def _exact_pattern(l, u, lp, up):
    """Neuron pairs whose ReLU difference is linear in (z, D) without knowing D's bounds."""
    return ~(_unstable(l, u) | _unstable(lp, up))
