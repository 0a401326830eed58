import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

# Tests run on 2 cores next to other work: one intra-op thread keeps timings stable.
torch.set_num_threads(1)


def tiny_dims(n_mels=80, n_layer=2, n_state=64, n_head=2, n_vocab=51865):
    """Whisper-shaped dims small enough to train in a test (multilingual vocabulary)."""
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=n_state, n_audio_head=n_head,
                           n_audio_layer=n_layer, n_vocab=n_vocab, n_text_ctx=448, n_text_state=n_state,
                           n_text_head=n_head, n_text_layer=n_layer)


def make_tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Whisper(tiny_dims(**kw))
    # openai-whisper leaves the decoder's learned positions as torch.empty (they come from checkpoints)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tokenizer():
    return whisper.tokenizer.get_tokenizer(multilingual=True, language="bo", task="transcribe")
