"""Word list, sentence grammar and per-dialect pronunciations of the synthetic demo corpus.

A reader can see the dialect differences directly:

    >>> from data.lexicon import pronounce
    >>> [pronounce("རྟ", d) for d in ("utsang", "amdo", "kham")]      # horse
    ['ta˥', 'ʁta', 'ta˥']
    >>> [pronounce("འཐུང", d) for d in ("utsang", "amdo", "kham")]    # drink
    ['tʰũ˥ŋ', 'ŋtʰõŋ', 'ntʰũ˥']

(bophono writes nasal vowels decomposed, a + U+0303.) `python -m data.lexicon` prints the whole table (word, gloss, three pronunciations).

Where the pronunciations come from
- Utsang: bophono's Standard (Lhasa) Tibetan IPA (schema MST, after Tournadre's Manual of Standard
  Tibetan): lexical tone on the first syllable of a word (˥ high, ˥˨ high falling, ˩˨ low, ˩˧˨ low
  rising-falling), devoiced low-register onsets, umlauted vowels (ø, ɛ), final -g as a glottal stop.
- Amdo: bophono's Amdo IPA (schema CAT, after Sung & Lha Byams Rgyal, Colloquial Amdo Tibetan) with
  prefixStrategy="always": no lexical tone, pre-initial clusters kept (ʁta, xgo, ŋtʰ), voiced onsets
  kept, final consonants kept (-x, -b, -l), no umlaut.
- Kham: our own rule set, built syllable by syllable from the two parses above. It is a principled
  middle, inspired by traits commonly described for Kham varieties, and not a description of any
  real Kham dialect:
    K1 tone: the Utsang (MST) tone of the word, i.e. Kham is tonal like Lhasa;
    K2 onset: the Amdo (CAT) root onset, i.e. voiced and aspirated onsets as in Amdo;
    K3 pre-initials: dropped, except nasal ones, which survive as a homorganic prenasal (m/n/ŋ);
    K4 rhyme: the Utsang vowel (umlaut kept), and an open syllable: final stops, -r, -l and the
       glottal stop are lost, a final nasal leaves only a nasalised vowel.
Words whose MST and CAT parses do not align syllable by syllable are not in the lexicon
(`check_lexicon` enforces it; the tests call it).

Words are written in Tibetan script and joined with the tsheg (་); a sentence carries no final shad,
so a transcript holds only the spoken syllables. The vocabulary (100 words, ~2100 sentences) and the grammar below
were written for this corpus; no corpus text was copied.
"""
import functools
import itertools

DIALECTS = ("utsang", "amdo", "kham")

# --- lexicon: Tibetan word -> English gloss, grouped by the role it plays in the grammar -------------
FIRST_PERSON = {"ང": "I", "ང་ཚོ": "we"}
OTHER_PERSON = {"ཁྱེད་རང": "you", "ཁོ": "he", "མོ": "she", "ཁོང": "he (hon.)", "ཁོ་ཚོ": "they"}
# Ergative forms, used as subjects of transitive verbs.
ERGATIVE = {"ངས": "I.ERG", "ང་ཚོས": "we.ERG", "ཁྱེད་རང་གིས": "you.ERG", "ཁོས": "he.ERG",
            "མོས": "she.ERG", "ཁོང་གིས": "he.ERG (hon.)"}
FIRST_PERSON_ERG = {"ངས", "ང་ཚོས"}
PEOPLE = {"ཨ་མ": "mother", "ཨ་ཕ": "father", "ཨ་ཁུ": "uncle", "བུ་མོ": "girl", "བུ": "boy",
          "སློབ་ཕྲུག": "student", "དགེ་རྒན": "teacher", "ཞིང་པ": "farmer", "སྨན་པ": "doctor",
          "བླ་མ": "lama", "ཚོང་པ": "trader", "གྲོགས་པོ": "friend"}
ANIMALS = {"རྟ": "horse", "གཡག": "yak", "ལུག": "sheep", "ཁྱི": "dog", "ཞི་མི": "cat", "བྱ": "bird",
           "ར": "goat"}
FOODS = {"ཁ་ལག": "food", "ཤ": "meat", "བག་ལེབ": "bread", "ཞོ": "yogurt", "མར": "butter",
         "རྩམ་པ": "tsampa"}
DRINKS = {"ཇ": "tea", "ཆུ": "water", "འོ་མ": "milk", "ཆང": "barley beer"}
WRITINGS = {"དེབ": "book", "ཡི་གེ": "letter"}
THINGS = {"ཁང་པ": "house", "སྒོ": "door", "རི": "mountain", "མཚོ": "lake", "ཤིང": "tree",
          "མེ་ཏོག": "flower", "ཉི་མ": "sun", "སྐར་མ": "star", "ལམ": "road", "རླུང": "wind"}
PLACES = {"ལྷ་ས": "Lhasa", "བོད": "Tibet", "གྲོང་ཁྱེར": "town", "ཞིང་ཁ": "field",
          "སློབ་གྲྭ": "school", "ཚོང་ཁང": "shop"}
ADJECTIVES = {"ཆེན་པོ": "big", "ཆུང་ཆུང": "small", "ཡག་པོ": "good", "བཟང་པོ": "fine",
              "དམར་པོ": "red", "དཀར་པོ": "white", "ནག་པོ": "black", "སྔོན་པོ": "blue",
              "སེར་པོ": "yellow", "གསར་པ": "new", "རྙིང་པ": "old", "མཐོ་པོ": "high",
              "རིང་པོ": "long", "ཞིམ་པོ": "tasty"}
NUMBERS = {"གཅིག": "one", "གཉིས": "two", "གསུམ": "three", "བཞི": "four", "ལྔ": "five",
           "དྲུག": "six", "བདུན": "seven", "བརྒྱད": "eight", "དགུ": "nine", "བཅུ": "ten"}
MOTION_VERBS = {"འགྲོ": "go", "ཡོང": "come"}
# Transitive verb -> the object classes it takes.
TRANSITIVE = {"ཟ": ("eat", FOODS), "འཐུང": ("drink", DRINKS), "ཀློག": ("read", WRITINGS),
              "བྲི": ("write", WRITINGS), "ཉོ": ("buy", {**FOODS, **DRINKS, **WRITINGS}),
              "བལྟ": ("look at", {**ANIMALS, **THINGS})}
FUNCTION_WORDS = {"ལ": "to/at (LOC)", "ཡིན": "am (COP.1)", "རེད": "is (COP.3)",
                  "ཡོད": "have (EXIST.1)", "འདུག": "there is (EXIST.3)",
                  "གི་ཡོད": "PROGRESSIVE.1", "གི་འདུག": "PROGRESSIVE.3", "གི་རེད": "FUTURE.3"}

# Which adjectives make sense for which nouns (keeps sentences plausible, not just grammatical).
_COLOURS = ("དམར་པོ", "དཀར་པོ", "ནག་པོ", "སེར་པོ")
ADJ_FOR = {
    **{w: ("ཆེན་པོ", "ཆུང་ཆུང", "ཡག་པོ", "དཀར་པོ", "ནག་པོ") for w in ANIMALS},
    **{w: ("ཞིམ་པོ", "ཡག་པོ", "གསར་པ") for w in FOODS},
    **{w: ("ཞིམ་པོ", "ཡག་པོ") for w in DRINKS},
    **{w: ("གསར་པ", "རྙིང་པ", "ཡག་པོ", "ཆེན་པོ") for w in WRITINGS},
    "ཁང་པ": ("ཆེན་པོ", "ཆུང་ཆུང", "གསར་པ", "རྙིང་པ", "མཐོ་པོ", "དཀར་པོ"),
    "སྒོ": ("ཆེན་པོ", "ཆུང་ཆུང", "གསར་པ") + _COLOURS, "རི": ("མཐོ་པོ", "ཆེན་པོ", "དཀར་པོ"),
    "མཚོ": ("ཆེན་པོ", "ཆུང་ཆུང", "སྔོན་པོ"), "ཤིང": ("ཆེན་པོ", "ཆུང་ཆུང", "མཐོ་པོ", "རྙིང་པ"),
    "མེ་ཏོག": ("ཆུང་ཆུང", "བཟང་པོ", "སྔོན་པོ") + _COLOURS, "ཉི་མ": ("ཆེན་པོ", "བཟང་པོ"),
    "སྐར་མ": ("ཆུང་ཆུང", "དཀར་པོ"), "ལམ": ("རིང་པོ", "གསར་པ", "ཡག་པོ"), "རླུང": ("ཆེན་པོ",),
}
COUNTABLE = {**ANIMALS, **WRITINGS, "ཁང་པ": "house", "སྒོ": "door", "ཤིང": "tree", "མེ་ཏོག": "flower"}

GLOSS = {**FIRST_PERSON, **OTHER_PERSON, **ERGATIVE, **PEOPLE, **ANIMALS, **FOODS, **DRINKS,
         **WRITINGS, **THINGS, **PLACES, **ADJECTIVES, **NUMBERS, **MOTION_VERBS,
         **{v: g for v, (g, _) in TRANSITIVE.items()}, **FUNCTION_WORDS}


# --- grammar: every sentence the corpus can contain, as a tuple of words ----------------------------
def all_sentences():
    """Every sentence of the grammar (a few thousand), in a fixed order. Tibetan is verb-final (SOV);
    first-person subjects take the first-person copula/auxiliaries (ཡིན, ཡོད, གི་ཡོད), others the
    third-person ones (རེད, འདུག, གི་འདུག, གི་རེད)."""
    subjects = {**FIRST_PERSON, **OTHER_PERSON}
    out = []
    for s, p in itertools.product(subjects, PEOPLE):           # "I am a student"
        out.append((s, p, "ཡིན" if s in FIRST_PERSON else "རེད"))
    for n, adjs in ADJ_FOR.items():                             # "the horse is big"
        for a, cop in itertools.product(adjs, ("རེད", "འདུག")):
            out.append((n, a, cop))
    for s, n, k in itertools.product(subjects, COUNTABLE, NUMBERS):   # "I have two books"
        out.append((s, "ལ", n, k, "ཡོད" if s in FIRST_PERSON else "འདུག"))
    for s, pl, v in itertools.product(subjects, PLACES, MOTION_VERBS):  # "he is going to Lhasa"
        for aux in (("གི་ཡོད",) if s in FIRST_PERSON else ("གི་འདུག", "གི་རེད")):
            out.append((s, pl, "ལ", v, aux))
    for s, (v, (_, objects)) in itertools.product(ERGATIVE, TRANSITIVE.items()):  # "I drink tea"
        for o in objects:
            aux = "གི་ཡོད" if s in FIRST_PERSON_ERG else "གི་འདུག"
            out.append((s, o, v, aux))
            for a in ADJ_FOR.get(o, ())[:2]:                   # "I drink good tea"
                out.append((s, o, a, v, aux))
    return out


def sentence_text(words):
    """Tibetan transcript of a sentence: its words joined by the tsheg."""
    return "་".join(words)


# --- pronunciation ---------------------------------------------------------------------------------
TONES = {"˥": "high", "˥˨": "high-falling", "˩˨": "low", "˩˧˨": "low-rising-falling"}
_TONE_CHARS = set("˥˦˧˨˩")
_NASAL = "\u0303"
# IPA segments bophono emits. A vowel symbol may carry the nasal tilde and the length mark.
VOWELS = set("aəɛeioɔuøyɨ")
CONSONANTS = ("ʈ͡ʂʰ ʈ͡ʂ ɖ͡ʐ d͡ʐ t͡sʰ t͡s tsʰ ts dz̥ dz tɕʰ tɕ dʑ̥ dʑ kʰ k̚ k g̊ g cʰ c ɟ̊ ɟ ʈʰ ʈ ɖ tʰ t d̥ d "
              "pʰ p̚ p b̥ b sʰ s z ɕ ʑ ʂ ʐ x ɣ ʁ h m n̚ n ɲ ŋ l̥ʰ l̥ ɬ l r ɾ w j ʔ").split()
_LABIAL, _VELAR = {"p", "pʰ", "p̚", "b", "b̥", "m", "w"}, {"k", "kʰ", "k̚", "g", "g̊", "x", "ŋ", "ɣ"}
_NASALS = {"m", "n", "n̚", "ŋ", "ɲ"}


@functools.lru_cache(maxsize=None)
def _converter(schema):
    import bophono  # imported late: building its tries costs ~0.1 s and most importers never need it
    options = {"prefixStrategy": "always"} if schema == "CAT" else {}
    return bophono.UnicodeToApi(schema=schema, options=options)


def parse_syllable(ipa):
    """Split one IPA syllable into (onset tokens, vowel, coda tokens, tone)."""
    tone = "".join(c for c in ipa if c in _TONE_CHARS)
    rest = "".join(c for c in ipa if c not in _TONE_CHARS)
    onset, vowel, coda, i = [], "", [], 0
    while i < len(rest):
        if rest[i] in VOWELS and not vowel:
            j = i + 1
            while j < len(rest) and rest[j] in (_NASAL, "ː"):
                j += 1
            vowel, i = rest[i:j], j
            continue
        seg = next((c for c in CONSONANTS if rest.startswith(c, i)), None)
        if seg is None:
            raise ValueError(f"unknown IPA segment {rest[i]!r} in syllable {ipa!r}: add it to CONSONANTS "
                             f"and to data.espeak.IPA_TO_ESPEAK")
        (coda if vowel else onset).append(seg)
        i += len(seg)
    if not vowel:
        raise ValueError(f"syllable {ipa!r} has no vowel")
    return onset, vowel, coda, tone


def _kham_syllable(mst, cat, first):
    """Rules K1-K4 of the module docstring, for one syllable."""
    _, m_vowel, m_coda, m_tone = parse_syllable(mst)
    c_onset, _, _, _ = parse_syllable(cat)
    # CAT onset = pre-initials + root (+ medial w, as in ŋw-); whatever precedes the root is pre-initial.
    root_len = 2 if len(c_onset) >= 2 and c_onset[-1] == "w" else 1
    pre, root = c_onset[:-root_len], c_onset[-root_len:]
    onset = list(root)
    if pre and pre[-1] in _NASALS:                                     # K3: prenasalisation
        place = root[0] if root else ""
        onset.insert(0, "m" if place in _LABIAL else "ŋ" if place in _VELAR else "n")
    vowel = m_vowel.replace("ː", "")
    if any(s in _NASALS for s in m_coda) and _NASAL not in vowel:      # K4: nasal coda -> nasal vowel
        vowel += _NASAL
    return "".join(onset) + vowel + (m_tone if first else "")          # K1: tone of the word


@functools.lru_cache(maxsize=None)
def pronounce(word, dialect):
    """IPA of one word in one dialect; syllables separated by '.'; Utsang and Kham carry tone letters."""
    if dialect == "utsang":
        return _converter("MST").get_api(word)
    if dialect == "amdo":
        return _converter("CAT").get_api(word)
    if dialect == "kham":
        mst, cat = pronounce(word, "utsang").split("."), pronounce(word, "amdo").split(".")
        if len(mst) != len(cat):
            raise ValueError(f"{word}: Utsang {mst} and Amdo {cat} syllables do not align")
        return ".".join(_kham_syllable(m, c, i == 0) for i, (m, c) in enumerate(zip(mst, cat)))
    raise ValueError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")


def word_tone(word, dialect):
    """Lexical tone of a word (name from TONES), or None for Amdo, which has no lexical tone."""
    if dialect == "amdo":
        return None
    first = pronounce(word, dialect).split(".")[0]
    return TONES[parse_syllable(first)[3]]


def check_lexicon():
    """Every word of the grammar parses in all three dialects; returns the number of words."""
    words = sorted({w for s in all_sentences() for w in s})
    for w in words:
        for d in DIALECTS:
            ipa = pronounce(w, d)
            if not ipa:
                raise ValueError(f"bophono gives no {d} pronunciation for {w} ({GLOSS.get(w)})")
            for syl in ipa.split("."):
                parse_syllable(syl)
            word_tone(w, d)
    return len(words)


if __name__ == "__main__":
    print(f"{check_lexicon()} words, {len(all_sentences())} sentences")
    for w, g in GLOSS.items():
        print(f"{w:<14} {g:<22} " + "  ".join(f"{pronounce(w, d):<18}" for d in DIALECTS))
