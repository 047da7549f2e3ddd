"""ctfm.weights: the table of known weights, hash-checked loading and fetching (over HTTP from a local stand-in)."""

import hashlib
import http.server
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from conftest import randomise
from ctfm.checkpoint import CheckpointError, load_encoder, save_hf_folder, save_state_dict
from ctfm.errors import CTFMError
from ctfm.files import sha256sum
from ctfm.networks import CTFMEncoder, CTFMSegResNetDS
from ctfm.weights import WEIGHTS, KnownWeights, fetch, init_encoder, load, resolve

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def test_shipped_weights_match_the_table():
    for known in WEIGHTS.values():
        if known.bundle:
            for rel, digest in known.files.items():
                assert sha256sum(BUNDLES / known.bundle / rel) == digest, (known.name, rel)


def test_large_files_agree_with_the_table():
    for path in BUNDLES.glob("*/large_files.yml"):
        for entry in yaml.safe_load(path.read_text())["large_files"]:
            name, file = Path(entry["path"]).parts[1], Path(entry["path"]).name
            known = WEIGHTS[name]
            assert entry["url"] == known.url + file and entry["hash_type"] == "sha256"
            assert entry["hash_val"] == (known.files[file] or ""), entry


def test_a_name_resolves_in_its_own_bundle_and_otherwise_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFM_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("ctfm.weights._downloaded_bundles", lambda: tmp_path / "hub")
    path, expected = resolve("ctfm_segmentation_demo", BUNDLES / "ctfm_segmentation")
    assert path == BUNDLES / "ctfm_segmentation" / "models" / "model.pt" and len(expected) == 1
    for bundle in ("ctfm_segmentation", "ctfm_triage"):  # each ships its own copy of the encoder it fine-tunes
        path, expected = resolve("ctfm_pretrain_demo", BUNDLES / bundle)
        assert path == BUNDLES / bundle / "models" / "ctfm_pretrain_demo"
        assert sorted(p.name for p in expected) == ["config.json", "model.safetensors"]
    with pytest.raises(CTFMError, match="python -m ctfm.weights fetch ctfm_pretrain_demo --source"):
        resolve("ctfm_pretrain_demo", BUNDLES / "ctfm_retrieval")  # never the sibling bundle's folder
    with pytest.raises(CTFMError, match="python -m ctfm.weights fetch whole_body_segmentation`"):
        resolve("whole_body_segmentation")


def test_damaged_shipped_weights_are_refused_before_loading(tmp_path):
    copy = tmp_path / "ctfm_segmentation"
    shutil.copytree(BUNDLES / "ctfm_segmentation", copy, ignore=shutil.ignore_patterns("eval"))
    weights = copy / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200_000] = bytes(200_000)  # the tensors still parse
    weights.write_bytes(bytes(data))
    network = CTFMSegResNetDS(init_filters=8)
    with pytest.raises(CheckpointError, match="damaged or replaced weights") as err:
        load(network, weights)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_nan_tensors_are_refused_always(tmp_path):
    encoder = randomise(CTFMEncoder(init_filters=4))
    with torch.no_grad():
        encoder.conv_init.weight[0, 0, 0, 0, 0] = float("nan")
    save_state_dict(encoder, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load(CTFMEncoder(init_filters=4), tmp_path / "nan.pt")


def test_init_encoder_takes_the_encoder_out_of_a_segmentation_folder(tmp_path):
    """A whole_body_segmentation-style Hugging Face folder gives its encoder to fine-tuning and to load_encoder."""
    network = randomise(CTFMSegResNetDS(init_filters=4, out_channels=5))
    save_hf_folder(network, tmp_path / "segmentation_hf")
    fresh = init_encoder(CTFMSegResNetDS(init_filters=4, out_channels=3), tmp_path / "segmentation_hf")
    assert all(torch.equal(v, network.encoder.state_dict()[k]) for k, v in fresh.encoder.state_dict().items())
    encoder, report = load_encoder(tmp_path / "segmentation_hf")
    assert encoder.init_filters == 4 and report.prefix == "encoder." and not report.missing
    assert init_encoder(fresh, None) is fresh  # training from scratch


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and states each file's sha256 the way Hugging Face does for LFS files."""

    etags: dict = {}

    def end_headers(self):
        etag = self.etags.get(self.path.lstrip("/"))
        if etag:
            self.send_header("X-Linked-Etag", f'"{etag}"')
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hf_server(tmp_path):
    """A Hugging Face model folder of a tiny encoder, served over HTTP on the loopback address."""
    folder = save_hf_folder(randomise(CTFMEncoder(init_filters=4)), tmp_path / "served")
    _Handler.etags = {"model.safetensors": sha256sum(folder / "model.safetensors")}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def stand_in(monkeypatch, folder, recorded: dict) -> None:
    known = KnownWeights("tiny_encoder", "encoder", {"init_filters": 4}, recorded, ".", None, "MIT")
    monkeypatch.setitem(WEIGHTS, "tiny_encoder", known)


def test_fetch_over_http_checks_hashes_and_loads(tmp_path, monkeypatch, hf_server):
    folder, url = hf_server
    monkeypatch.setenv("CTFM_WEIGHTS_DIR", str(tmp_path / "cache"))
    stand_in(monkeypatch, folder, {"config.json": None, "model.safetensors": sha256sum(folder / "model.safetensors")})
    fetched = fetch("tiny_encoder", source=url)
    assert fetched == tmp_path / "cache" / "tiny_encoder"
    assert (fetched / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    encoder = load(CTFMEncoder(init_filters=4), "tiny_encoder")
    assert torch.equal(encoder.conv_init.weight, load_encoder(folder)[0].conv_init.weight)


def test_fetch_refuses_a_file_whose_hash_differs(tmp_path, monkeypatch, hf_server):
    folder, url = hf_server
    stand_in(monkeypatch, folder, {"config.json": None, "model.safetensors": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(CTFMError, match="differs from the table's"):
        fetch("tiny_encoder", source=url, dest=tmp_path / "dest")
    assert not (tmp_path / "dest").exists()  # nothing half-written
    _Handler.etags["model.safetensors"] = hashlib.sha256(b"served").hexdigest()
    stand_in(monkeypatch, folder, {"config.json": None, "model.safetensors": None})
    with pytest.raises(CTFMError, match="differs from the server's"):
        fetch("tiny_encoder", source=url, dest=tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
