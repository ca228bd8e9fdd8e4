"""Every zoo pair (checkpoints saved with the real PyTorch, peft and ONNX APIs) goes through search,
certify, compare and certify --data on the command line, and answers with JSON or one line."""
import json

import pytest
from click.testing import CliRunner

from diffprobe.cli import main
from diffprobe_examples.zoo import ZOO

REGION = ["--center", "center.npy", "--eps", "0.02", "--clip", "0", "1"]
COMMANDS = {
    "search": ["search", *REGION, "--steps", "20", "--restarts", "4"],
    "certify": ["certify", *REGION, "--threshold", "1.0"],
    "compare": ["compare", *REGION, "--threshold", "1.0"],
    "data": ["certify", "--data", "data.npy", "--eps", "0.02", "--clip", "0", "1", "--threshold", "1.0"],
}


def _needs(name):
    if "lora" in name:
        pytest.importorskip("peft")
    if "dynamo" in name:
        pytest.importorskip("onnxscript")
    if "onnx" in name:
        pytest.importorskip("onnx")


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_pair_answers_in_json_or_one_line(tmp_path, monkeypatch, name):
    _needs(name)
    models = ZOO[name](tmp_path)
    monkeypatch.chdir(tmp_path)
    for command, args in COMMANDS.items():
        result = CliRunner().invoke(main, [args[0], *models, *args[1:], "--json", "--quiet"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code in (0, 1, 5, 10), (command, result.output)
        if result.exit_code == 1:  # unsupported: one line, no traceback, nothing on stdout
            assert len(lines) == 1 and result.stdout == "", (command, result.stderr)
            continue
        out = json.loads(result.stdout)  # stdout holds the JSON and nothing else
        assert "Traceback" not in result.stderr
        if command != "search":
            assert out.get("bound", 0) is None or out.get("bound", 0) >= out.get("found", 0), (command, out)
