"""A damaged export never serves: the server refuses to start and names every problem."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from serve_helpers import free_port, make_export, rewrite_checksums

from pretrain.errors import UserError
from pretrain.serve.server import load_model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("checks") / "good")


def _copy(export, tmp_path, name):
    import shutil

    out = tmp_path / name
    shutil.copytree(export, out)
    return out


def _flip_a_byte(d):
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (d / "model.safetensors").write_bytes(bytes(data))
    return ["model.safetensors fails its checksum"]


def _tensors_wrong(d):
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(3)
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    rewrite_checksums(d)
    return [
        "model.layers.1.mlp.up_proj.weight is missing",
        "model.norm.weight",
        "model.extra.weight",
    ]


def _bad_config(d):
    config = json.loads((d / "config.json").read_text())
    config["num_hidden_layers"] = "four"
    (d / "config.json").write_text(json.dumps(config))
    rewrite_checksums(d)
    return ["config.json", "num_hidden_layers"]


def _config_disagrees(d):
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] += 64
    (d / "config.json").write_text(json.dumps(config))
    rewrite_checksums(d)
    return ["gate_proj.weight", "up_proj.weight", "down_proj.weight", "shape"]


CASES = {
    "flipped": _flip_a_byte,
    "tensors": _tensors_wrong,
    "config": _bad_config,
    "shapes": _config_disagrees,
}


@pytest.mark.parametrize("name", CASES)
def test_damaged_exports_are_refused_with_every_problem_named(export, tmp_path, name):
    d = _copy(export, tmp_path, name)
    expected = CASES[name](d)
    with pytest.raises(UserError) as e:
        load_model(d, device="cpu")
    for fragment in expected:
        assert fragment in str(e.value)


def test_the_server_refuses_to_start_on_a_damaged_export(export, tmp_path):
    d = _copy(export, tmp_path, "tensors")
    expected = _tensors_wrong(d)
    cmd = [sys.executable, "-m", "pretrain.cli", "serve", str(d), "--port", str(free_port())]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain serve: error:")
    for fragment in expected:  # all three problems on the one line
        assert fragment in last


def test_a_port_in_use_is_refused_before_loading():
    import socket

    from pretrain.serve.server import _check_address

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match="choose another --port"):
            _check_address("127.0.0.1", port)
