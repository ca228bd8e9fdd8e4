import numpy as np
import pytest
import torch

from diffprobe import DataError
from diffprobe.data import load_tensor


def test_formats_by_content(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "a.bin", x)
    np.savez(tmp_path / "b.bin", x=x, y=np.zeros(2))
    torch.save({"inputs": torch.from_numpy(x)}, tmp_path / "c.bin")
    from safetensors.torch import save_file
    save_file({"center": torch.from_numpy(x)}, str(tmp_path / "d.bin"))
    for name in ("a.bin.npy", "b.bin.npz", "c.bin", "d.bin"):
        assert torch.equal(load_tensor(tmp_path / name), torch.from_numpy(x).double())


@pytest.mark.parametrize("array, message", [(np.zeros((0, 3)), "empty"), (np.array([1.0, np.nan]), "NaN")])
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        load_tensor(tmp_path / "bad.npy")


def test_empty_file_pickles_and_ambiguity(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_tensor(tmp_path / "empty.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="not a readable"):
        load_tensor(tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", p=np.zeros(2), q=np.ones(2))
    with pytest.raises(DataError, match="several arrays"):
        load_tensor(tmp_path / "two.npz")
