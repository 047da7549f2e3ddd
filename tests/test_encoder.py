import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm.embedding import sliding_patch_embeddings
from ctfm.networks import SIZE_DIVISOR, ContrastiveModel, CTFMEmbeddingEncoder, CTFMEncoder

from conftest import tiny_vit_config  # noqa: E402


def test_full_size_matches_ctfm():
    encoder = CTFMEncoder()
    assert sum(p.numel() for p in encoder.parameters()) == 77_760_992
    assert encoder.embedding_dim == 512
    assert encoder.config == {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}
    # same keys as MONAI's own SegResEncoder: published weights load without key surgery
    reference = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4))
    assert encoder.state_dict().keys() == reference.state_dict().keys()


def test_feature_maps_channels_and_strides(small_encoder, ct_batch):
    maps = small_encoder.feature_maps(ct_batch)
    assert [m.shape[1] for m in maps] == [4, 8, 16, 32, 64]
    assert [tuple(m.shape[2:]) for m in maps] == [(16 // 2**i, 32 // 2**i, 32 // 2**i) for i in range(5)]
    embedding = small_encoder.embed(ct_batch)
    assert embedding.shape == (2, small_encoder.embedding_dim)
    torch.testing.assert_close(embedding, maps[-1].mean(dim=(2, 3, 4)))


def test_input_size_must_be_divisible(small_encoder):
    with pytest.raises(ValueError, match=f"multiples of {SIZE_DIVISOR}"):
        small_encoder.embed(torch.zeros(1, 1, 20, 32, 32))


def test_patch_embeddings_cover_volume_and_equal_direct_embedding(small_encoder):
    volume = torch.rand(1, 40, 70, 64, generator=torch.Generator().manual_seed(2))
    embeddings, starts = sliding_patch_embeddings(small_encoder.embed, volume, patch_size=(16, 32, 32), batch_size=3)
    assert embeddings.shape == (len(starts), small_encoder.embedding_dim)
    ends = starts + torch.tensor([16, 32, 32])
    assert (starts >= 0).all() and (ends <= torch.tensor([40, 70, 64])).all()
    assert ends.max(0).values.tolist() == [40, 70, 64]  # the far corner is covered
    s = starts[-1].tolist()
    direct = small_encoder.embed(volume[None, :, s[0] : s[0] + 16, s[1] : s[1] + 32, s[2] : s[2] + 32])
    torch.testing.assert_close(embeddings[-1], direct[0])


def test_patch_embeddings_pad_small_volume(small_encoder):
    embeddings, starts = sliding_patch_embeddings(small_encoder.embed, torch.rand(1, 10, 20, 20), patch_size=(16, 32, 32))
    assert embeddings.shape == (1, small_encoder.embedding_dim) and starts.tolist() == [[0, 0, 0]]


def test_contrastive_model_projects_to_128(small_encoder, ct_batch):
    model = ContrastiveModel(small_encoder).eval()
    assert model(ct_batch).shape == (2, 128)


def test_embedding_encoder_shares_keys_and_returns_the_embedding(small_encoder, ct_batch):
    embedder = CTFMEmbeddingEncoder(init_filters=4).eval()
    embedder.load_state_dict(small_encoder.state_dict())  # the same keys: every encoder checkpoint loads
    assert torch.equal(embedder(ct_batch), small_encoder.embed(ct_batch))
    assert embedder(ct_batch).shape == (2, small_encoder.embedding_dim)


@pytest.mark.parametrize("cls", [CTFMEncoder, CTFMEmbeddingEncoder])
def test_encoders_script_with_torchscript(cls, small_encoder, ct_batch):
    """MONAI's ckpt_export scripts the bundle's network_def."""
    network = cls(init_filters=4).eval()
    network.load_state_dict(small_encoder.state_dict())
    scripted = torch.jit.script(network)
    expected, got = network(ct_batch), scripted(ct_batch)
    for e, g in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got]):
        torch.testing.assert_close(g, e)


# --- one way to build a backbone (ctfm.networks.backbone) --------------------------------------------------------

TINY_VIT = tiny_vit_config()


def test_build_encoder_reads_the_description_of_either_backbone(ct_batch):
    from ctfm.networks import CTFMEmbeddingViT, CTFMViT, build_encoder, size_divisor

    cnn = build_encoder({"init_filters": 4})
    assert type(cnn) is CTFMEncoder and cnn.config["init_filters"] == 4 and size_divisor(cnn) == (16, 16, 16)
    assert type(build_encoder({"init_filters": 4}, "embedding")) is CTFMEmbeddingEncoder
    assert type(build_encoder()) is CTFMEncoder and build_encoder().embedding_dim == 512  # CT-FM's published size
    vit = build_encoder(TINY_VIT)
    assert type(vit) is CTFMViT and vit.config == {**TINY_VIT, "in_channels": 1, "spatial_dims": 3} and size_divisor(vit) == (12, 12, 12)
    embedder = build_encoder(vit.config, "embedding")  # a config round-trips to the same architecture and keys
    assert type(embedder) is CTFMEmbeddingViT and embedder.state_dict().keys() == vit.state_dict().keys()
    embedder.load_state_dict(vit.state_dict())
    x = torch.rand(2, 1, 24, 36, 48)  # any multiple of the patch size: the position embeddings are resampled
    assert torch.equal(embedder.eval()(x), vit.eval().embed(x)) and embedder(x).shape == (2, 24)
    assert size_divisor(lambda x: x) == (16, 16, 16)  # a runtime that does not say: CT-FM's encoder's
    with pytest.raises(ValueError, match="model_type 'swin'"):
        build_encoder({"model_type": "swin"})
    with pytest.raises(ValueError, match="output 'logits'"):
        build_encoder({}, "logits")


def test_patches_and_crops_round_up_to_the_backbones_divisor():
    from ctfm.embedding import PatchEmbeddingInferer, encoder_patch_size
    from ctfm.networks import build_encoder
    from ctfm.retrieval.query import crop_at

    assert encoder_patch_size((24, 128, 128)) == (32, 128, 128)  # CT-FM's 3D-MIR patch on its encoder
    assert encoder_patch_size((24, 128, 128), 12) == (24, 132, 132) == encoder_patch_size((24, 128, 128), (12, 12, 12))
    vit = build_encoder(TINY_VIT).eval()
    volume = torch.rand(1, 1, 30, 40, 50)
    pred = PatchEmbeddingInferer(patch_size=(20, 30, 30))(volume, vit)  # 24 x 36 x 36 patches of the ViT
    assert pred.meta["patch_size"].tolist() == [24, 36, 36] and pred.shape[1] == 24
    ends = pred.meta["patch_starts"] + pred.meta["patch_size"]
    assert ends.max(0).values.tolist() == [30, 40, 50]  # the far corner is covered, no side overshoots
    assert crop_at(volume[0], (15, 20, 25), (20, 30, 30), (12, 12, 12)).shape == (1, 1, 24, 36, 36)
