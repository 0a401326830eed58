import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from whisper_ft.encoder import disable_dynamic_audio_ctx, enable_dynamic_audio_ctx, encode, is_dynamic_audio_ctx


def _mel(b, t, seed=0):
    return torch.randn(b, 80, t, generator=torch.Generator().manual_seed(seed))


def test_full_window_is_bitwise_whisper_encoder(tiny_model):
    mel = _mel(2, 3000)
    with torch.no_grad():
        assert torch.equal(encode(tiny_model, mel), tiny_model.encoder(mel))


def test_short_window_matches_manual_computation(tiny_model):
    mel = _mel(2, 500)
    enc = tiny_model.encoder
    with torch.no_grad():
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1)
        assert x.shape[1] == 250  # stride-2 conv: one audio position per two mel frames
        x = x + enc.positional_embedding[:250]
        for block in enc.blocks:
            x = block(x)
        expected = enc.ln_post(x)
        got = encode(tiny_model, mel)
    assert got.shape == (2, 250, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_short_window_differs_from_padded_full_window(tiny_model):
    # the point of the dynamic context: attention no longer sees the padding, so features change
    mel = _mel(1, 500)
    full = torch.cat([mel, torch.full((1, 80, 2500), -1.5)], dim=-1)
    with torch.no_grad():
        assert not torch.allclose(encode(tiny_model, mel), tiny_model.encoder(full)[:, :250], atol=1e-3)


@pytest.mark.parametrize("shape, msg", [((2, 80, 501), "even"), ((2, 80, 3002), "even"),
                                        ((2, 128, 500), "mel bins"), ((80, 500), "batch")])
def test_bad_mel_shapes_are_named(tiny_model, shape, msg):
    with pytest.raises(ValueError, match=msg):
        encode(tiny_model, torch.zeros(shape))


def test_enable_dynamic_ctx_patches_forward_and_is_reversible():
    model = make_tiny_model()
    other = make_tiny_model()
    mel, tokens = _mel(2, 400), torch.tensor([[50258, 50259]] * 2)
    with pytest.raises(AssertionError):  # whisper's own forward wants the full window
        model.embed_audio(mel)
    handle = enable_dynamic_audio_ctx(model)
    assert enable_dynamic_audio_ctx(model).model is model  # idempotent
    with torch.no_grad():
        assert model.embed_audio(mel).shape == (2, 200, 64)
        logits = model(mel, tokens)
        torch.testing.assert_close(logits, model.decoder(tokens, encode(model, mel)), rtol=0, atol=0)
        full = _mel(1, 3000)
        assert torch.equal(model.embed_audio(full), encode(model, full))
    assert not is_dynamic_audio_ctx(other)  # instance-level: other models keep whisper's forward
    with pytest.raises(AssertionError):
        other.embed_audio(mel)
    handle.remove()
    assert not is_dynamic_audio_ctx(model)
    with pytest.raises(AssertionError):
        model.embed_audio(mel)
    disable_dynamic_audio_ctx(model)  # no-op when already off
    with enable_dynamic_audio_ctx(model):
        assert is_dynamic_audio_ctx(model)
    assert not is_dynamic_audio_ctx(model)


def test_dynamic_ctx_trains(tiny_model):
    # the training loop calls model(mel, tokens) on short mels and backpropagates through the encoder
    enable_dynamic_audio_ctx(tiny_model)
    tiny_model.train()
    logits = tiny_model(_mel(2, 300), torch.tensor([[50258, 50259, 50359]] * 2))
    logits.logsumexp(-1).mean().backward()
    assert tiny_model.encoder.conv1.weight.grad is not None
    assert "forward" not in tiny_model.encoder.state_dict()
