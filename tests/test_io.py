"""Atomic writes give the same bytes for the same content (DVC hashes them: a re-run that changes nothing
must not look like a change to the stages after it)."""
import torch

from tlvit.io import save_torch_atomic


def test_the_same_weights_give_the_same_file(tmp_path):
    torch.manual_seed(0)
    state = torch.nn.Linear(4, 3).state_dict()
    save_torch_atomic(state, tmp_path / "a" / "model.pth")
    save_torch_atomic(state, tmp_path / "b" / "model.pth")  # each through its own random temporary name
    first, second = (tmp_path / d / "model.pth" for d in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()
    loaded = torch.load(first)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    state["weight"] += 1
    save_torch_atomic(state, second)
    assert first.read_bytes() != second.read_bytes()
