"""Which methods bound which checkpoint of the zoo (diffprobe_examples/zoo.py), and how tight:
every pair certified around test image 0 (L-inf 0.02, clipped to [0, 1]) with `auto`, in the models'
native arithmetic.

    python scripts/zoo_table.py [--docs]    (--docs: also rewrite the table in README.md)
"""
import tempfile
import warnings
from pathlib import Path

import diffprobe as dp
from diffprobe.cli import load_pair
from diffprobe_examples.zoo import ZOO


def row(name):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        args = ZOO[name](folder)
        arch = args[args.index("--arch") + 1] if "--arch" in args else None
        arch_b = args[args.index("--arch-b") + 1] if "--arch-b" in args else None
        a, b = load_pair(folder / args[0], folder / args[1], arch, arch_b, None, False, False)
        import numpy as np
        center = np.load(folder / "center.npy")
    region = dp.LinfBall(__import__("torch").from_numpy(center).double(), 0.02, (0.0, 1.0))
    cert = dp.certify(a, b, region)
    why = "" if cert.bound < float("inf") else next(n for n in cert.notes if "skipped" in n or "no certified" in n)
    why = why.replace("alpha-crown skipped: ", "").replace("auto_LiRPA ", "")
    ratio = f"{cert.bound / cert.found:.3g}" if cert.found > 0 and cert.bound < float("inf") else "-"
    arithmetic = cert.arithmetic["model_a"] + " / " + cert.arithmetic["model_b"]
    return (f"| {name} | {arithmetic} | {cert.method} | {cert.found:.3g} | {cert.bound:.3g} | {ratio} | "
            f"{why[:110] or '-'} |")


def main():
    import sys
    warnings.simplefilter("ignore")
    lines = ["| zoo pair | arithmetic | methods that bounded it | found | bound | bound / found | why unbounded |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name in ZOO:
        try:
            lines.append(row(name))
        except ImportError as exc:
            lines.append(f"| {name} | - | needs {exc.name} | - | - | - | - |")
        print(lines[-1], flush=True)
    if "--docs" in sys.argv[1:]:
        from docs_section import update_section
        update_section("README.md", "zoo_table", "\n".join(lines))


if __name__ == "__main__":
    main()
