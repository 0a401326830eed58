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
from dataclasses import dataclass
from functools import cached_property, lru_cache

import tibetan_wer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer

log = logging.getLogger(__name__)

N_TEXT_CTX = 448  # decoder positions: prefix + text tokens must fit (the model's n_text_ctx)
N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>: the last ids of every whisper vocabulary
MULTILINGUAL_VOCAB = 51865  # whisper's multilingual vocabularies have at least this many ids (large-v3: one more)
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
    """The tokenizer that fits `model` (multilingual or English-only, its number of languages, and the tokens
    added to its vocabulary, `model.added_tokens`, when it has any: then an ExtendedTokenizer)."""
    import whisper

    added = tuple(getattr(model, "added_tokens", ()))
    n_base = model.dims.n_vocab - len(added)  # whisper reads the language count off n_vocab: the base one
    multilingual = n_base >= MULTILINGUAL_VOCAB
    base = whisper.tokenizer.get_tokenizer(multilingual, num_languages=n_base - 51765 - int(multilingual),
                                           language=language, task=task)
    return extend_tokenizer(base, added) if added else base


def vocab_size(tokenizer) -> int:
    """Ids the tokenizer can decode: text, specials, timestamps, and added tokens after them."""
    return tokenizer.timestamp_begin + N_TIMESTAMPS + len(getattr(tokenizer, "added", ()))


# One unit of text for added tokens: a syllable (an optional leading space, letters, then its tsheg or shads),
# a whitespace run, or stray tshegs/shads. Any text is a sequence of units (the pattern matches every character).
_UNIT = re.compile(f" ?[^\\s{TSHEG}{SHAD}]+(?:{TSHEG}|{SHAD}+)?|\\s+|[{TSHEG}{SHAD}]+")


def text_units(text: str) -> list[str]:
    """`text` cut into syllables, spaces and marks; "".join(text_units(t)) == t."""
    return _UNIT.findall(text)


@dataclass
class ExtendedTokenizer(Tokenizer):
    """Whisper's tokenizer plus whole-syllable tokens (--add-tokens) at ids after the timestamps.

    Whisper spends several byte-level BPE tokens on one Tibetan syllable; an added token spells a syllable (or
    several, from a token file) in one. Encoding takes, unit by unit (`text_units`), the longest run of units
    that is an added token (also without its leading space, which then goes to the BPE); everything else is
    the base BPE. Decoding maps added ids back to their exact strings: decode(encode(t)) == t. Ids below
    `timestamp_begin` are whisper's text and specials as before; timestamps keep [timestamp_begin,
    timestamp_begin + 1501); added token k is timestamp_begin + 1501 + k, past every id whisper knows.
    """
    added: tuple = ()

    @cached_property
    def first_added(self) -> int:
        return self.timestamp_begin + N_TIMESTAMPS

    @cached_property
    def _added_ids(self) -> dict:
        return {t: self.first_added + k for k, t in enumerate(self.added)}

    @cached_property
    def _max_units(self) -> int:
        return max((len(text_units(t)) for t in self.added), default=0)

    def encode(self, text, **kwargs):
        ids, plain, units, i = [], [], text_units(text), 0
        while i < len(units):
            end, token, lead = self._longest_match(units, i)
            if token is None:
                plain.append(units[i])
                i += 1
                continue
            plain.append(lead)
            if "".join(plain):
                ids += self.encoding.encode("".join(plain), **kwargs)
            ids.append(token)
            plain, i = [], end
        if plain:
            ids += self.encoding.encode("".join(plain), **kwargs)
        return ids

    def _longest_match(self, units, i):
        """(end unit, added id, leading space left to the BPE) of the longest added token at unit i; (i, None, "")"""
        for end in range(min(len(units), i + self._max_units), i, -1):
            s = "".join(units[i:end])
            if s in self._added_ids:
                return end, self._added_ids[s], ""
            if s.startswith(" ") and s[1:] in self._added_ids:
                return end, self._added_ids[s[1:]], " "
        return i, None, ""

    def decode(self, token_ids, **kwargs) -> str:
        out, run = [], []
        for t in token_ids:
            k = t - self.first_added
            if 0 <= k < len(self.added):
                out += [super().decode(run, **kwargs), self.added[k]]
                run = []
            else:
                run.append(t)
        return "".join(out) + super().decode(run, **kwargs)


def extend_tokenizer(base, added) -> ExtendedTokenizer:
    """`base` (a whisper Tokenizer) with `added` token strings (unique, non-empty) appended."""
    added = tuple(added)
    if len(set(added)) != len(added) or not all(added):
        raise ValueError("added tokens must be unique, non-empty strings")
    return ExtendedTokenizer(encoding=base.encoding, num_languages=base.num_languages, language=base.language,
                             task=base.task, added=added)


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
