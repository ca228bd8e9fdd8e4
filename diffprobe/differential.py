"""Differential bound propagation for near-identical pairs (ReluDiff / NeuroDiff, backward form).

CROWN on the composed graph relaxes the ReLUs of both networks independently, so their slack adds
up. Here the difference itself is tracked: for layer k, D_k = z'_k - z_k (pre-activations) and
E_k = h'_k - h_k (post-activations), with
    D_k = W'_k E_{k-1} + (W'_k - W_k) h_{k-1} + (b'_k - b_k) + n'_k - n_k,   E_0 = 0 (shared input),
where n_k, n'_k are the error terms of the arithmetic each model runs in (`lowering.Layer.noise`:
rounding, quantisation; none in exact arithmetic), and E = sigma(z + D) - sigma(z) is relaxed
by the activation's own lines in (D, z) (`diffprobe.activations`: for ReLU chords in D, exact when
both neurons are stable; for smooth ones the mean value theorem). A linear form over (h_k, E_k) is
back-substituted to the input as in CROWN, an error term M e with |e| <= r costing |lam M| r;
intermediate bounds of z_k and z'_k come from each network's own CROWN pass (`ChainBounds`), those
of D_k from the same backward pass started at each layer, intersected with [l'_k - u_k, u'_k - l_k].
Works on the lowered chains of `diffprobe.lowering` (residual and concatenating graphs are lowered
to chains whose skipped values pass through identity neurons); a layer with fewer neurons in one
model (node pruning) is padded with zero neurons.
"""
from dataclasses import dataclass

import torch

from .lowering import relu_only


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


def aligned(layers_a, layers_b):
    """The two layer lists with equal hidden widths: where one has fewer neurons in a layer (a
    node-pruned copy), its neurons are placed at their closest match in the other and the rest
    padded with zero neurons; an equivalent network, so bounds stay sound. None when the depths or
    the input/output sizes differ. The layers are modified in place."""
    if len(layers_a) != len(layers_b):
        return None
    for k, (la, lb) in enumerate(zip(layers_a, layers_b)):
        if la.weight.shape[1] != lb.weight.shape[1] or (k == len(layers_a) - 1 and len(la.weight) != len(lb.weight)):
            return None
        small, big = (lb, la) if len(la.weight) > len(lb.weight) else (la, lb)
        if not _same_activation(la, lb):
            return None
        if len(small.weight) == len(big.weight):
            continue
        if not la.activation.uniform:
            return None  # only neurons of one activation for all can be padded in
        rows = _matched_rows(_rows_of(big), _rows_of(small))
        small.spread_rows(rows, len(big.weight))
        following = (layers_b if small is lb else layers_a)[k + 1]
        following.spread_columns(rows, len(big.weight))
    return layers_a, layers_b


def _same_activation(la, lb):
    """Whether two layers end in the same nonlinearity (the output layers in none)."""
    x, y = la.activation, lb.activation
    return x is y if x is None or y is None else x.same_as(y)


def _rows_of(layer):
    return torch.cat([layer.weight, layer.bias[:, None]], 1)


def matching_layers(chain_a, chain_b):
    """Both chains' layers when their structures match (after padding pruned neurons), else None."""
    if chain_a is None or chain_b is None:
        return None
    a, b = chain_a.layers(), chain_b.layers()
    if a is None or b is None:
        return None
    return aligned(a, b)


def _pick(lam, if_pos, if_neg):
    """lam * line, the line chosen per entry by the sign of lam (lower bound of lam * value)."""
    return lam * torch.where(lam >= 0, if_pos.unsqueeze(1), if_neg.unsqueeze(1))  # one product: 25 % faster


def _through(lam, const, lines):
    """lam . sigma(z) >= lam' . z + const': through an activation by its lines (lo_s, lo_c, up_s, up_c)."""
    lo_s, lo_c, up_s, up_c = lines
    return _pick(lam, lo_s, up_s), const + _dot(lam.clamp_min(0), lo_c) + _dot(lam.clamp_max(0), up_c)


def _dot(lam, vec):
    return torch.bmm(lam, vec.unsqueeze(-1)).squeeze(-1)


def _concretize_lower(lam, const, lo, hi):
    return _dot(lam.clamp_min(0), lo) + _dot(lam.clamp_max(0), hi) + const


def noise_lower(lam, terms):
    """Lower bound of lam . sum_t M_t e_t over |e_t| <= r_t: -sum_t |lam M_t| r_t ([B, S])."""
    total = 0.0
    for m, r in terms:
        total = total - _dot((lam if m is None else lam @ m).abs(), r)
    return total


def noise_radius(terms, like):
    """Per-entry bound on |sum_t M_t e_t| ([B, n], zeros like `like` when there is no term)."""
    total = torch.zeros_like(like)
    for m, r in terms:
        total = total + (r if m is None else r @ m.abs().T)
    return total


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
        both = fn(torch.cat([spec, -spec], dim=1), b)  # one pass gives the lower and the upper bound
        lower[b, r] = torch.maximum(lower[b, r], both[:, 0])
        upper[b, r] = torch.minimum(upper[b, r], -both[:, 1])
    return lower, upper


@dataclass
class ChainState:
    """One network over a batch of boxes: per hidden layer its pre-activation bounds and ReLU
    lines, per layer (the output layer included) its error terms."""

    bounds: list
    relax: list
    noise: list

    def take(self, index):
        """The state of the boxes in `index` (up to the layers computed so far)."""
        return ChainState([(l[index], u[index]) for l, u in self.bounds],
                          [tuple(t[index] for t in r) for r in self.relax],
                          [[(m, r[index]) for m, r in terms] for terms in self.noise])


class ChainBounds:
    """CROWN over one lowered network (a list of `Layer`s with ReLUs between), error terms included."""

    def __init__(self, layers):
        self.layers = layers

    @property
    def hidden(self):
        return sum(layer.weight.shape[0] for layer in self.layers[:-1])

    def lower(self, spec, k, lo, hi, state):
        """Lower bound of spec . z_k over boxes [B, n] (spec: [B, m, n_k])."""
        lam, const = spec, torch.zeros(spec.shape[:2], dtype=spec.dtype)
        for j in range(k, -1, -1):
            layer = self.layers[j]
            const = const + lam @ layer.bias + noise_lower(lam, state.noise[j])
            lam = lam @ layer.weight
            if j == 0:
                return _concretize_lower(lam, const, lo, hi)
            lam, const = _through(lam, const, state.relax[j - 1])

    def intermediate(self, lo, hi, given=None):
        """Bounds, lines and error terms of every layer over boxes [B, n]. Bounds start as intervals
        (exact for the first layer) and are tightened by back-substitution only for unstable
        neurons; `given` (per hidden layer (l, u) known from elsewhere) is intersected."""
        state = ChainState([], [], [])
        h = (lo, hi)
        for k, layer in enumerate(self.layers):
            state.noise.append(layer.noise(*h))
            l, u = _affine_interval(layer.weight, layer.bias, *h)
            pad = noise_radius(state.noise[k], l)
            l, u = l - pad, u + pad
            last = k == len(self.layers) - 1
            if given is not None and not last:
                l, u = _intersect((l, u), given[k])
            if k > 0:
                # the output layer only when noisy (its errors are sized by these bounds), else
                # the neurons whose activation is not linear on [l, u]
                rows = (torch.full_like(l, layer.noisy, dtype=torch.bool) if last
                        else ~layer.activation.exact(l, u))
                l, u = _refined(lambda s, i: self.lower(s, k, lo[i], hi[i], state.take(i)), rows, l, u)
            if layer.noisy and k > 0:
                # errors sized by the refined bounds (smaller ulps, less clamping) replace the first ones
                state.noise[k] = layer.noise(*h, out=(l - pad, u + pad))
            if last:
                return state
            state.bounds.append((l, u))
            state.relax.append(layer.activation.lines(l, u))
            h = layer.activation.interval(l, u)

    @torch.no_grad()
    def rounding_spread(self, lo, hi):
        """Per hidden layer, a bound on |computed pre-activation - exact pre-activation| over the
        boxes: the error terms moved through |W| (ReLU is 1-Lipschitz), so bounds of the exact
        network (e.g. alpha-CROWN's) widened by it hold for the network as it runs."""
        lo, hi = lo.reshape(len(lo), -1).double(), hi.reshape(len(hi), -1).double()
        state = self.intermediate(lo, hi)
        spread, out = torch.zeros_like(lo), []
        for k, layer in enumerate(self.layers[:-1]):
            radius = noise_radius(state.noise[k], state.bounds[k][0])
            spread = spread @ layer.weight.abs().T + radius
            out.append(spread)
        return out

    @torch.no_grad()
    def bounds(self, lo, hi, spec=None):
        """Lower/upper bounds of spec @ output over each box [B, n]."""
        lo, hi = lo.reshape(len(lo), -1).double(), hi.reshape(len(hi), -1).double()
        state = self.intermediate(lo, hi)
        k = len(self.layers) - 1
        spec = torch.eye(self.layers[-1].weight.shape[0], dtype=lo.dtype) if spec is None else spec.to(lo.dtype)
        spec = spec.expand(lo.shape[0], *spec.shape)
        return self.lower(spec, k, lo, hi, state), -self.lower(-spec, k, lo, hi, state)


class DifferentialBounds:
    """Bounds of model_b(x) - model_a(x) over boxes, for a pair of matching lowered chains."""

    def __init__(self, layers):
        layers_a, layers_b = layers
        self.a, self.b = ChainBounds(layers_a), ChainBounds(layers_b)
        # (W'_k - W_k, b'_k - b_k) per layer, used by every back-substitution
        self.delta = [(lb.weight - la.weight, lb.bias - la.bias) for la, lb in zip(layers_a, layers_b)]
        self.layer_bounds = None  # set by `bounds`: per hidden layer (l, u, l', u') over its boxes

    @property
    def hidden(self):
        """Hidden neurons per model, all layers."""
        return self.a.hidden

    @property
    def relu_chain(self):
        """Whether both models are plain ReLU chains (what alpha-CROWN's bounds line up with)."""
        return relu_only(self.a.layers) and relu_only(self.b.layers)

    @property
    def first_weights(self):
        """Both models' first-layer weight matrices (input sensitivity for branch-and-bound)."""
        return self.a.layers[0].weight, self.b.layers[0].weight

    def lower(self, spec_d, k, lo, hi, sa, sb, relax_d, spec_z=None):
        """Lower bound of spec_z . z_k + spec_d . D_k over boxes [B, n] (specs: [B, m, n_k]; z_k
        is model_a's layer k, D_k model_b's minus it; spec_z None: zero)."""
        lam_z = torch.zeros_like(spec_d) if spec_z is None else spec_z
        lam_d, const = spec_d, torch.zeros(spec_d.shape[:2], dtype=spec_d.dtype)
        for j in range(k, -1, -1):
            la, lb, (dw, db) = self.a.layers[j], self.b.layers[j], self.delta[j]
            # z_j = W_j h + b_j + n_j ;  D_j = W'_j E + (W'_j - W_j) h + (b'_j - b_j) + n'_j - n_j
            const = (const + lam_z @ la.bias + lam_d @ db
                     + noise_lower(lam_z - lam_d, sa.noise[j]) + noise_lower(lam_d, sb.noise[j]))
            lam_h = lam_z @ la.weight + lam_d @ dw
            lam_e = lam_d @ lb.weight
            if j == 0:
                return _concretize_lower(lam_h, const, lo, hi)
            lo_p, up_p, lo_q, up_q, lo_r, up_r = relax_d[j - 1]
            lam_z, const = _through(lam_h, const, sa.relax[j - 1])
            const = const + _dot(lam_e.clamp_min(0), lo_r) + _dot(lam_e.clamp_max(0), up_r)
            lam_z = lam_z + _pick(lam_e, lo_q, up_q)
            lam_d = _pick(lam_e, lo_p, up_p)

    @torch.no_grad()
    def bounds(self, lo, hi, spec=None, given=None, spec_z=None):
        """Lower/upper bounds of spec @ (model_b - model_a) (+ spec_z @ model_a) over each box
        [B, n]; specs [m, n_out] or one per box [B, m, n_out]. Any linear function of the two
        models' outputs, C_a a + C_b b, is (C_a + C_b) a + C_b (b - a): model_b's top-1 margins
        keep the cancellation of the difference. `given`: per hidden layer, sound bounds
        (l, u, l', u') of both models' pre-activations from elsewhere (e.g. alpha-CROWN on each
        network), intersected with the engine's own."""
        lo, hi = lo.reshape(len(lo), -1).double(), hi.reshape(len(hi), -1).double()
        sa = self.a.intermediate(lo, hi, None if given is None else [g[:2] for g in given])
        sb = self.b.intermediate(lo, hi, None if given is None else [g[2:] for g in given])
        # what holds on these boxes holds on every box inside them: branch-and-bound hands it on
        self.layer_bounds = [a + b for a, b in zip(sa.bounds, sb.bounds)]
        relax_d = self._differences(lo, hi, sa, sb)
        k, n_out = len(self.delta) - 1, self.delta[-1][0].shape[0]
        spec = torch.eye(n_out, dtype=lo.dtype) if spec is None else spec.to(lo.dtype)
        spec = spec.expand(lo.shape[0], *spec.shape[-2:])
        spec_z = None if spec_z is None else spec_z.to(lo.dtype).expand(lo.shape[0], *spec_z.shape[-2:])
        negated = None if spec_z is None else -spec_z
        return (self.lower(spec, k, lo, hi, sa, sb, relax_d, spec_z),
                -self.lower(-spec, k, lo, hi, sa, sb, relax_d, negated))

    def _differences(self, lo, hi, sa, sb):
        """The relaxations of the ReLU differences, per hidden layer. D's bounds start as intervals
        and are tightened by back-substitution only where the relaxation depends on them:
        differences whose ReLU pair is not stable in a known pattern."""
        relax_d = []
        h_a = (lo, hi)
        e = (torch.zeros_like(lo), torch.zeros_like(lo))
        for k in range(len(self.delta) - 1):
            lb, (dw, db) = self.b.layers[k], self.delta[k]
            act = self.a.layers[k].activation
            (l, u), (lp, up) = sa.bounds[k], sb.bounds[k]
            dl, du = _sum(_affine_interval(lb.weight, torch.zeros_like(lb.bias), *e), _affine_interval(dw, db, *h_a))
            pad = noise_radius(sa.noise[k], dl) + noise_radius(sb.noise[k], dl)
            dl, du = dl - pad, du + pad
            if k > 0:
                dl, du = _refined(lambda s, i: self.lower(s, k, lo[i], hi[i], sa.take(i), sb.take(i),
                                                          [tuple(t[i] for t in r) for r in relax_d]),
                                  ~act.exact_difference(l, u, lp, up), dl, du)
            dl, du = torch.maximum(dl, lp - u), torch.minimum(du, up - l)
            relax_d.append(act.differences(l, u, lp, up, dl, du))
            h_a = act.interval(l, u)
            e = act.difference_interval(l, u, lp, up, dl, du)
        return relax_d


def _intersect(x, y):
    return torch.maximum(x[0], y[0]), torch.minimum(x[1], y[1])


def _affine_interval(w, b, lower, upper):
    """Exact bounds of w x + b over the boxes [lower, upper] ([B, n] each)."""
    mid, rad = (lower + upper) / 2, (upper - lower) / 2
    center = mid @ w.T + b
    spread = rad @ w.abs().T
    return center - spread, center + spread


def _sum(x, y):
    return x[0] + y[0], x[1] + y[1]
