"""Text for Whisper: language codes, normalisation (one per language, in two forms), the decoder's token sequences.

Each language's text is normalised here and nowhere else, in two forms:
- the *target* form (`normalize_text`): what the model is trained to write, one spelling for one speech;
- the *scoring* form (`normalize_for_scoring`): what error rates compare, which also folds conventions that
  transcripts disagree on (a final tsheg, punctuation in Japanese, English spelling variants).
Whisper's own BasicTextNormalizer is never used on Tibetan: it maps Unicode combining marks to spaces,
which shreds Tibetan (every vowel sign and subjoined consonant is a combining mark).
"""
import logging
import re
import unicodedata
from functools import lru_cache

import tibetan_wer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

log = logging.getLogger(__name__)

N_TEXT_CTX = 448  # decoder positions: prefix + text tokens must fit (the model's n_text_ctx)
IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index

TSHEG = "\u0f0b"  # ་ syllable separator
NB_TSHEG = "\u0f0c"  # ༌ non-breaking tsheg: same sound, same meaning
SHAD = "\u0f0d"  # ། clause end
NYIS_SHAD = "\u0f0e"  # ༎ precomposed double shad
NGA = "\u0f44"  # ང: the one letter that keeps its tsheg before a shad (ང་།)

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")  # zero-width marks editors leave behind
_SPACE = re.compile(r"\s+")

# Language codes people pass that Whisper spells differently (ISO 639-3 / 639-2 -> Whisper's 639-1).
_ALIASES = {"bod": "bo", "tib": "bo", "jpn": "ja", "eng": "en", "zho": "zh", "cmn": "zh"}


def normalize_tibetan(text: str) -> str:
    """Normalise Tibetan so the same speech always has the same target. Rules, applied in order:

    1. NFC; zero-width characters removed; any whitespace run -> one space; ends stripped.
    2. ༌ (non-breaking tsheg) -> ་ and ༎ (nyis shad) -> །། : identical in speech.
    3. Repeated tsheg collapses to one: ་་ -> ་ (also across spaces: "་ ་" -> "་").
    4. No space before a shad ("ཀ །" -> "ཀ།") unless the space separates two shads ("། །" is kept).
    5. A tsheg directly before a shad is dropped ("ཀ་།" -> "ཀ།"), except after ང where orthography
       requires it ("ང་།" stays). The same applies to a tsheg ending the text.
    6. After a shad (or run of shads), exactly one space before the next syllable ("ཀ།ཁ" -> "ཀ། ཁ").
    Latin letters, digits and other scripts inside the text pass through (rule 1 only).
    """
    text = unicodedata.normalize("NFC", text)
    text = _INVISIBLE.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    text = text.replace(NB_TSHEG, TSHEG).replace(NYIS_SHAD, SHAD + SHAD)
    text = re.sub(f"{TSHEG}(?: ?{TSHEG})+", TSHEG, text)
    text = re.sub(f"(?<!{SHAD}) +(?={SHAD})", "", text)
    text = re.sub(f"(?<!{NGA}){TSHEG}(?={SHAD}|$)", "", text)
    text = re.sub(f"({SHAD}+) *(?=[^ {SHAD}])", r"\1 ", text)
    return text.strip()


def normalize_text(text: str, language: str) -> str:
    """Target text for `language`: Tibetan rules above; Japanese NFKC without spaces; else NFC + spaces."""
    if language == "bo":
        return normalize_tibetan(text)
    if language == "ja":
        # NFKC folds half-width katakana and full-width ASCII; Japanese writes no spaces between words.
        return _SPACE.sub("", _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)))
    return _SPACE.sub(" ", _INVISIBLE.sub("", unicodedata.normalize("NFC", text))).strip()


def normalize_for_scoring(text: str, language: str) -> str:
    """The form error rates compare, per language (`language` may be any form `language_code` accepts).

    Tibetan: NFC, tsek-bstar -> tsheg and sbrul-shad -> shad (`tibetan_wer.normalize`), whitespace runs to
    one space, no space touching a tsheg, doubled tshegs single, no tsheg at either end (transcripts disagree
    on the final one). Japanese: the target form without punctuation. English: whisper's English normaliser;
    any other language: whisper's basic one.
    """
    lang = language_code(language)
    if lang == "bo":
        text = tibetan_wer.normalize(_INVISIBLE.sub("", text))
        text = _SPACE.sub(" ", text)
        text = re.sub(r"\s*" + TSHEG + r"[\s" + TSHEG + "]*", TSHEG, text)
        return text.strip(" " + TSHEG)
    if lang == "ja":
        return "".join(c for c in normalize_text(text, "ja") if not unicodedata.category(c).startswith("P"))
    return _english()(text) if lang == "en" else _basic()(text)


@lru_cache(maxsize=None)
def _english():
    return EnglishTextNormalizer()


@lru_cache(maxsize=None)
def _basic():
    return BasicTextNormalizer()


def language_code(language: str) -> str:
    """'bo', 'Tibetan', 'bo-amdo', 'bod' -> 'bo'; ValueError for a language Whisper does not know."""
    found = _lookup_language(language or "")
    if found is None:
        raise ValueError(f"unknown language {language!r}: use a whisper language code such as 'bo', 'ja' or 'en'")
    return found


def resolve_language(code: str, *, fallback: str | None = None) -> str:
    """Whisper language code for `code` (a code, a name like "tibetan", "ja-JP", or ISO 639-3 "bod").

    Whisper has no token for many languages and dialect labels (e.g. Dzongkha "dz"). Then the caller
    must choose which existing token to reuse (`fallback`, typically a related language); the choice
    is logged because it changes what the model is conditioned on.
    """
    found = _lookup_language(code)
    if found is not None:
        return found
    if fallback is not None:
        fb = _lookup_language(fallback)
        if fb is None:
            raise ValueError(f"language fallback {fallback!r} is itself not a Whisper language; "
                             f"pick one of whisper.tokenizer.LANGUAGES, e.g. 'bo' or 'zh'")
        log.info("language %r has no Whisper token; reusing <|%s|> (%s) as chosen by fallback", code, fb, LANGUAGES[fb])
        return fb
    raise ValueError(f"language {code!r} is not one of Whisper's {len(LANGUAGES)} languages "
                     f"(whisper.tokenizer.LANGUAGES); choose which language token to reuse with "
                     f"fallback=... (on the command line --language-fallback CODE, e.g. a related language "
                     f"such as 'bo' for Tibetic languages)")


def _lookup_language(code: str) -> str | None:
    c = str(code).strip().lower()
    for cand in (c, _ALIASES.get(c), TO_LANGUAGE_CODE.get(c), re.split(r"[-_]", c)[0]):
        if cand in LANGUAGES:
            return cand
    return None


def tokenizer_for(model, language: str, task: str = "transcribe"):
    """The whisper tokenizer that fits `model` (multilingual or English-only, its number of languages)."""
    import whisper

    return whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                           language=language, task=task)


def prefix_tokens(tokenizer, task: str = "transcribe") -> list[int]:
    """<|startoftranscript|><|LANG|><|task|><|notimestamps|> for a multilingual tokenizer (with its language);
    <|startoftranscript|><|notimestamps|> for an English-only one, as Whisper decodes without timestamps."""
    if task not in ("transcribe", "translate"):
        raise ValueError(f"task {task!r}: expected 'transcribe' or 'translate'")
    seq = [tokenizer.sot]
    if tokenizer.language is not None:
        seq.append(tokenizer.to_language_token(tokenizer.language))
        seq.append(tokenizer.transcribe if task == "transcribe" else tokenizer.translate)
    seq.append(tokenizer.no_timestamps)
    return seq


def target_tokens(tokenizer, text: str, task: str = "transcribe") -> tuple[list[int], list[int]]:
    """(decoder_input, target) for teacher forcing, equal lengths, target shifted left by one.

    decoder_input = prefix + text; target = [-100] * (len(prefix) - 1) + text + [eot]:
    the prefix is given, not learned, except its last position, which must predict the first text token.
    `text` is used as given (normalise it first with normalize_text).
    """
    prefix = prefix_tokens(tokenizer, task)
    body = tokenizer.encode(text)
    return prefix + body, [IGNORE_INDEX] * (len(prefix) - 1) + body + [tokenizer.eot]
