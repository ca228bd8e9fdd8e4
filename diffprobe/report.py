"""Plain-text renderings of results for the terminal."""
from .results import Verdict, arithmetic_text


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else "-" if v is None else str(v)


def search_text(result):
    lines = [f"difference   {result.difference}",
             f"found        {_fmt(result.found)}  (max over the region found by search)",
             f"evaluations  {result.evaluations}",
             f"arithmetic   {arithmetic_text(result.arithmetic)}  (what the models ran in)",
             f"seconds      {result.seconds:.2f}",
             f"region       {result.region.get('type')} over {result.region.get('shape')} inputs"]
    return "\n".join(lines + [f"warning      {w}" for w in result.warnings])


def certificate_text(cert):
    verdict = cert.verdict.value if cert.verdict else "- (no threshold)"
    lines = [f"difference   {cert.difference}",
             f"method       {cert.method}",
             f"found        {_fmt(cert.found)}  (witness: a lower bound on the worst case)",
             f"bound        {_fmt(cert.bound)}  (certified: an upper bound over the whole region)",
             f"gap ratio    {_fmt(cert.gap_ratio)}  (found / bound; 1 is exact)",
             f"verdict      {verdict}" + (f"  at threshold {_fmt(cert.threshold)}" if cert.threshold is not None else ""),
             f"branches     {cert.branches}",
             f"arithmetic   {arithmetic_text(cert.arithmetic)}  (what the bound covers)",
             f"seconds      {cert.seconds:.2f}"]
    return "\n".join(lines + [f"note         {n}" for n in cert.notes])


def drift_text(report):
    c = report.counts
    verdict = report.verdict.value if report.verdict else "-"
    lines = [f"difference   {report.difference}",
             f"region       {'L2' if report.norm.startswith('2') else 'L-inf'} ball of radius {report.eps} "
             f"around each of {report.total} points" if report.eps is not None else
             f"region       {report.total} given regions",
             f"points       {len(report.points)} of {report.total} finished",
             f"verdict      {verdict}" + (f"  at threshold {_fmt(report.threshold)}" if report.threshold is not None else ""),
             f"counts       {c['verified']} verified, {c['falsified']} falsified, {c['unknown']} unknown",
             f"worst bound  {_fmt(report.bound)}  (largest certified bound over the points)",
             f"worst found  {_fmt(report.found)}  (largest witness value)",
             f"arithmetic   {arithmetic_text(report.arithmetic)}  (what the bounds cover)"]
    if report.accuracy_a is not None:
        lines.append(f"accuracy     model_a {report.accuracy_a:.4f}, model_b {report.accuracy_b:.4f}")
    if report.agreement is not None:
        lines.append(f"agreement    {report.agreement:.4f} (same top-1 label at the data points)")
    lines.append(f"seconds      {report.seconds:.1f}")
    risky = [p for p in report.ranked(5) if p.verdict != Verdict.VERIFIED]
    if risky:
        lines.append("riskiest     " + ", ".join(f"#{p.index} {p.verdict.value if p.verdict else '-'} "
                                                  f"(bound {p.bound:.4g}, found {p.found:.4g})" for p in risky))
    return "\n".join(lines + [f"note         {n}" for n in report.notes])


def load_result(path):
    """A saved result (search, certificate, drift report, stability study, structural stability or
    capability study JSON), its type told by its keys."""
    import json
    from .errors import DataError
    from .results import (CapabilityStudy, Certificate, DriftReport, SearchResult, StabilityStudy,
                          StructuralStability)
    try:
        with open(path) as handle:
            text = handle.read()
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable diffprobe JSON result ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a diffprobe result (expected a JSON object)")
    for cls, key in ((DriftReport, "points"), (Certificate, "gap_ratio"), (SearchResult, "evaluations"),
                     (StabilityStudy, "ranking"), (StructuralStability, "curves"), (CapabilityStudy, "optimisers")):
        if key in data:
            try:
                result = cls.from_json(text)
            except (TypeError, ValueError) as exc:
                raise DataError(f"{path} looks like a {cls.__name__} but misses fields ({exc})") from exc
            _check_points(result, path)
            return result
    raise DataError(f"{path} is not a diffprobe result; save one with result.to_json() (the CLI's --out)")


def _check_points(result, path):
    """The per-point fields a report draws, checked (a result file may come from anywhere)."""
    from .errors import DataError
    from .results import DriftReport
    if not isinstance(result, DriftReport):
        return
    number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    for p in result.points:
        if not (number(p.bound) and number(p.found)
                and (p.witness is None or (isinstance(p.witness, list) and all(map(number, p.witness))))):
            raise DataError(f"{path}: a point of this drift report is malformed")


def render(results, files):
    """`html_report`, a result that cannot be drawn (a file edited by hand, or by someone else)
    named in one line."""
    from .errors import DataError
    try:
        return html_report(results)
    except Exception as exc:
        raise DataError(f"cannot draw {', '.join(map(str, files))} ({type(exc).__name__}: {str(exc)[:200]}); "
                        "is a result file edited or truncated?") from exc


def html_report(results):
    """One self-contained HTML page: each result's table and figures, plus the eps curve when
    several drift reports are given."""
    import html
    from .figures import eps_curve, figure, png_base64, witness_gallery
    from .results import DriftReport, StabilityStudy
    parts = ["<html><head><meta charset='utf-8'><title>diffprobe report</title></head><body>",
             "<h1>diffprobe report</h1>"]
    drifts = [r for r in results if isinstance(r, DriftReport)]
    if len({r.eps for r in drifts}) > 1:
        fig = figure(6, 4)
        eps_curve(drifts, fig.subplots())
        parts += ["<h2>certified bound vs eps</h2>", _img(png_base64(fig))]
    for r in results:
        parts += [f"<h2>{html.escape(repr(r))}</h2>", r._repr_html_()]
        fig = figure(6, 3.5)
        r.plot(ax=fig.subplots())
        parts.append(_img(png_base64(fig)))
        if isinstance(r, DriftReport):
            gallery = witness_gallery(r.ranked(), r.input_shape)
            if gallery is not None:
                parts += ["<h3>witnesses of the riskiest points</h3>", _img(png_base64(gallery))]
        if isinstance(r, StabilityStudy):
            parts += ["<h3>pairwise distances per axis</h3>", _img(png_base64(r.plot_matrices(fig=figure(3.2 * len(r.axes), 3))))]
    return "\n".join(parts + ["</body></html>"])


def _img(png):
    return f"<img src='data:image/png;base64,{png}'/>"


def stability_text(study):
    metrics = list(next(iter(study.spread.values())))
    lines = [f"members      {study.members} per axis, ranked by {study.rank_by} (mean pairwise distance, 95 % CI)",
             f"{'axis':<12}" + "".join(f"{m:>26}" for m in metrics)]
    for axis in study.ranking:
        cells = "".join(f"{str(study.spread[axis][m]):>26}" for m in metrics)
        lines.append(f"{axis:<12}{cells}")
    if study.regions:
        lines.append(f"found/certified: max |b - a| over L-{'inf' if study.norm == 'inf' else study.norm} balls "
                     f"of radius {study.eps} around {study.regions} held-out points")
    lines.append(f"seconds      {study.seconds:.1f}")
    return "\n".join(lines + [f"note         {n}" for n in study.notes])


def layers_text(report):
    lines = [f"difference   {report.difference} over {report.regions} region(s); {report.samples} inputs sampled",
             f"all layers   {_fmt(report.bound)}  (certified, every matching layer's weights from model_b)",
             f"{'layer':<24}{'only this':>12}{'all but':>12}{'SQNR dB':>10}{'max |delta|':>13}"]
    for r in report.ranked():
        lines.append(f"{r.name[:24]:<24}{_fmt(r.only):>12}{_fmt(r.all_but):>12}{_fmt(r.sqnr_db):>10}{_fmt(r.max_abs):>13}")
    lines.append("only this: the certified bound when only this layer's weights are model_b's; all but: "
                 "when every other layer's are (both in model_a's arithmetic)")
    return "\n".join(lines + [f"seconds      {report.seconds:.1f}"] + [f"note         {n}" for n in report.notes])
