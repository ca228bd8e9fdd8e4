"""Plain-text renderings of results for the terminal."""


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def search_text(result):
    lines = [f"difference   {result.difference}",
             f"found        {_fmt(result.found)}  (max over the region found by search)",
             f"evaluations  {result.evaluations}",
             f"seconds      {result.seconds:.2f}",
             f"region       {result.region.get('type')} over {result.region.get('shape')} inputs"]
    return "\n".join(lines + [f"warning      {w}" for w in result.warnings])


def certificate_text(cert):
    verdict = cert.verdict.value if cert.verdict else "- (no --threshold)"
    lines = [f"difference   {cert.difference}",
             f"method       {cert.method}",
             f"found        {_fmt(cert.found)}  (witness: a lower bound on the worst case)",
             f"bound        {_fmt(cert.bound)}  (certified: an upper bound over the whole region)",
             f"gap ratio    {_fmt(cert.gap_ratio)}  (found / bound; 1 is exact)",
             f"verdict      {verdict}" + (f"  at threshold {_fmt(cert.threshold)}" if cert.threshold is not None else ""),
             f"branches     {cert.branches}",
             f"seconds      {cert.seconds:.2f}"]
    return "\n".join(lines + [f"note         {n}" for n in cert.notes])


def demo_text(report):
    s = report["summary"]
    lines = ["diffprobe demo: a digits classifier (model_a) vs its copy fine-tuned on a shifted subset (model_b)",
             f"test accuracy: model_a {s['accuracy_a']:.3f}, model_b {s['accuracy_b']:.3f}",
             f"regions: L-inf balls of radius {s['eps']} around test images, clipped to [0, 1]",
             "",
             f"{'image':>5}  {'found max|b-a|':>14}  {'certified':>10}  {'gap':>6}  {'drift <= ' + str(s['threshold']):>14}  {'top-1 agreement':>16}"]
    for r in report["rows"]:
        d, t = r["drift"], r["top1"]
        agree = {"verified": "certified", "falsified": "FLIP FOUND", "unknown": "unknown"}[t.verdict.value]
        lines.append(f"{r['index']:>5}  {d.found:>14.4g}  {d.bound:>10.4g}  {d.gap_ratio:>6.3f}  "
                     f"{d.verdict.value:>14}  {agree:>16}")
    lines += ["", "found: a witness input inside the ball (lower bound); certified: auto_LiRPA bound "
              "over the whole ball (upper bound)."]
    return "\n".join(lines)
