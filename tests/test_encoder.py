import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm.embedding import sliding_patch_embeddings
from ctfm.networks import SIZE_DIVISOR, ContrastiveModel, CTFMEmbeddingEncoder, CTFMEncoder


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
