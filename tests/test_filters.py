"""Each quality rule on documents just inside and just outside its threshold (datatrove's defaults)."""
import random

import pytest

from fmkit.data.filters import C4Quality, CodeQuality, GopherQuality, GopherRepetition
from fmkit.data.sources import Doc

ALPHA = "apple river stone cloud maple forest candle silver garden window yellow harbor pencil rocket violet".split()


def words(n, seed=0):
    rng = random.Random(seed)
    return [rng.choice(ALPHA) for _ in range(n)]


def doc(text, kind="text"):
    return Doc("d", text, kind=kind)


def prose(n, seed=0):
    """n words, 2 of them stop words, no punctuation: passes every Gopher quality rule."""
    return " ".join(["the", "and"] + words(n - 2, seed))


GQ = GopherQuality()


@pytest.mark.parametrize("n,expect", [(50, None), (49, "gopher_short_doc"),
                                      (100_000, None), (100_001, "gopher_long_doc")])
def test_gopher_word_count(n, expect):
    assert GQ(doc(prose(n))) == expect


def test_gopher_mean_word_length():
    assert GQ(doc(" ".join(["the", "and"] + ["abc"] * 98))) is None               # mean exactly 3
    assert GQ(doc(" ".join(["the", "and"] + ["abc"] * 97 + ["ab"]))) == "gopher_below_avg_threshold"
    long = "abcdefghij"                                                            # 10 letters
    assert GQ(doc(" ".join(["the", "and"] + [long] * 98))) is None                # mean 9.86
    assert GQ(doc(" ".join(["the", "and"] + [long + "kl"] * 98))) == "gopher_above_avg_threshold"


def test_gopher_hash_ratio():
    # n_words counts '#' tokens too: 10 of 100 is a ratio of exactly 0.1 (kept), 11 of 101 is above.
    assert GQ(doc(prose(90) + " #" * 10)) is None
    assert GQ(doc(prose(90) + " #" * 11)) == "gopher_too_many_hashes"


def test_gopher_bullets_and_end_ellipsis():
    line = lambda i: " ".join(["the", "and"] + words(8, i))
    bullets = lambda k: "\n".join(("- " if i < k else "") + line(i) for i in range(10))
    assert GQ(doc(bullets(9))) is None                      # 0.9 of lines
    assert GQ(doc(bullets(10))) == "gopher_too_many_bullets"
    ends = lambda k: "\n".join(line(i) + (" ..." if i < k else ".") for i in range(10))
    assert GQ(doc(ends(3))) is None                         # 0.3 of lines
    assert GQ(doc(ends(4))) == "gopher_too_many_end_ellipsis"


def test_gopher_alphabetic_words_and_stop_words():
    assert GQ(doc(prose(80) + " ," * 20)) is None           # 80 of 100 words have a letter
    assert GQ(doc(prose(80) + " ," * 21)) == "gopher_below_alpha_threshold"
    assert GQ(doc(" ".join(["the", "of"] + words(60)))) is None
    assert GQ(doc(" ".join(["the"] + words(61)))) == "gopher_enough_stop_words"


GR = GopherRepetition()


def paragraph(i, n=60):
    return " ".join(words(n, seed=100 + i))


def test_repetition_duplicate_paragraph_fraction():
    uniques = [paragraph(i) for i in range(6)]
    ok = "\n\n".join(uniques + ["short note"] * 4)           # 10 paragraphs, 3 repeats: 0.3
    bad = "\n\n".join(uniques + ["short note"] * 5)          # 11 paragraphs, 4 repeats: 0.36
    assert GR(doc(ok)) is None
    assert GR(doc(bad)) == "dup_para_frac"


def test_repetition_duplicate_paragraph_chars():
    def text(extra):
        big = paragraph(0, extra)
        parts = [big] + [paragraph(i) for i in range(1, 10)] + [big]
        return big, "\n\n".join(parts)
    for n, expect in ((20, None), (200, "dup_para_char_frac")):
        big, t = text(n)
        ratio = len(big) / len(t)
        assert (ratio > 0.2) == (expect is not None)
        assert GR(doc(t)) == expect


def test_repetition_top_ngram():
    # one 2-gram covering just under / over 20% of the characters
    filler = " ".join(f"w{i:05d}" for i in range(200))     # 200 distinct 6-char words
    for reps, expect in ((100, None), (150, "top_2_gram")):
        t = filler + " " + " ".join(f"zz yy u{i:04d}" for i in range(reps))   # only the 2-gram repeats
        assert (5 * reps / len(t) > 0.2) == (expect is not None)
        assert GR(doc(t)) == expect


def test_repetition_duplicated_ngrams():
    base = [f"w{i:05d}" for i in range(300)]
    repeated = base[:40]
    for copies, expect in ((0, None), (1, "duplicated_10_n_grams")):
        t = " ".join(base + repeated * copies)
        assert GR(doc(t)) == expect if copies == 0 else GR(doc(t)).startswith("duplicated_")


def c4_text(sentences=5, extra=""):
    return "\n".join(f"This is sentence number {i} of a good line." for i in range(sentences)) + extra


def test_c4_sentences_and_line_rules():
    c4 = C4Quality()
    assert c4(doc(c4_text(5))) is None
    assert c4(doc(c4_text(4))) == "too_few_sentences"
    d = doc(c4_text(5, "\nno terminal punctuation here\ntwo words.\nenable javascript to see this.\n"
                       "we use cookies on this site."))
    assert c4(d) is None
    assert d.text == c4_text(5)
    assert d.counts == {"c4_lines_removed_no_terminal_punct": 1, "c4_lines_removed_too_few_words": 1,
                        "c4_lines_removed_javascript": 1, "c4_lines_removed_policy": 1}
    assert c4(doc(c4_text(5, "\nLorem ipsum dolor sit amet."))) == "lorem_ipsum"
    assert c4(doc(c4_text(5, "\nfunction f() { return 1; }."))) == "curly_bracket"
    cited = doc(c4_text(5).replace("line.", "line[1].", 1))
    assert c4(cited) is None and "[1]" not in cited.text


def test_code_rules():
    code = CodeQuality()
    good = "def f(x):\n    return x + 1\n" * 20
    assert code(doc(good, "code")) is None
    assert code(doc(good + "x = '" + "a" * 994 + "'\n", "code")) is None          # a 1000-char line is allowed
    assert code(doc(good + "x = '" + "a" * 995 + "'\n", "code")) == "code_max_line_length"
    wide = "\n".join(["y" * 100] * 10)
    assert code(doc(wide, "code")) is None                                          # mean exactly 100
    assert code(doc(wide + "yy", "code")) == "code_mean_line_length"
    sym = "\n".join(["a" * 5 + "=" * 15] * 10)   # 50 alphanumeric of 209 characters (newlines count): 23.9%
    assert code(doc(sym, "code")) == "code_alnum_fraction"
    assert code(doc(sym.replace("=", "a", 3), "code")) is None                     # 53 of 209: 25.4%
    assert code(doc("# This file was automatically generated. Do not edit.\n" + good, "code")) == \
        "code_autogenerated"
    assert code(doc("\n" * 5 + "# generated by hand, lovingly\n" + good, "code")) is None  # past the first 5 lines


def test_toxicity_word_list_and_classifier_hook(tmp_path, monkeypatch):
    from fmkit.data.toxicity import Toxicity
    from fmkit.errors import FmkitError

    tox = Toxicity()                                      # > 1% of words and at least 2 hits
    clean = prose(198)
    assert tox(doc(clean + " shit")) is None              # 1 hit
    assert tox(doc(clean + " shit bastard")) is None      # 2 of 200 words: exactly 1%
    assert tox(doc(clean + " shit bastard fuck")) == "toxicity_wordlist"
    assert tox(doc(clean + " you son of a bitch and piss off")) == "toxicity_wordlist"   # phrases count
    words_file = tmp_path / "words.txt"
    words_file.write_text("# mine\nmaple\n")
    assert Toxicity(words_file=str(words_file), threshold=0.0)(doc("maple maple syrup")) == "toxicity_wordlist"
    (tmp_path / "clf.py").write_text("def score(text):\n    return 0.9 if 'awful' in text else 0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = Toxicity(classifier="clf:score", threshold=0.5)
    assert hook(doc("an awful thing")) == "toxicity_classifier" and hook(doc("a fine thing")) is None
    with pytest.raises(FmkitError, match="cannot be loaded"):
        Toxicity(classifier="clf:nope")
