"""Tokenizer oracles: a small sentencepiece model configured like Llama 2's and a small byte-level BPE
tokenizer.json configured like Llama 3's, both trained here on a generated multilingual corpus, plus the ids
that the reference libraries (sentencepiece, tokenizers, transformers) give for a set of test strings.

Writes under out_dir/tokenizer/:
  spm/       tokenizer.model, tokenizer_config.json, special_tokens_map.json   (Llama 2 layout)
  bpe/       tokenizer.json, tokenizer_config.json                             (Llama 3 layout; merges as pairs)
  bpe_legacy/ the same BPE with merges as "a b" strings and ignore_merges=true (older / Llama 3 files)
  bad_*/     broken model directories for error tests
  cases.json expected results, read by tests/test_tokenizer.cpp
"""
import json, pathlib, random, shutil

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (Qwen2 / 2.5 / 3): the same with digits one at a time.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
CHAT_TEMPLATE_L3 = ("{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
                    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}")
CHAT_TEMPLATE_L2 = "{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "training", "model",
         "I'll", "DON'T", "we're", "you've", "she's", "they'd", "I'm", "café", "naïve", "résumé", "über",
         "straße", "élève", "mañana", "Ελληνικά", "русский", "язык", "日本語", "中文", "分词器", "한국어",
         "😀", "🚀", "👍🏽", "العربية", "हिन्दी", "1234567", "3.14159", "2024", "42", "x=y+1;", "(a,b)",
         "--", "...", "\"quoted\"", "#tag", "e-mail", "don't", "ünïcödé"]

TEST_STRINGS = [
    "Hello world", "Hello, world!", " leading space", "trailing space ", "  two leading", "double  space",
    "tabs\tand\ttabs", "new\nline", "two\n\nnewlines", "crlf\r\nline", "ends with newline\n", "\n\nstarts",
    "   \n  mixed whitespace  \n\t ", "I'll go", "DON'T stop", "we're here, you've seen, she's gone",
    "They'D BE 'S 'll 'Ll", "it's 'sdf", "numbers 1234567 and 3.14159 and 42", "1234567890123",
    "a1b22c333d4444", "café naïve résumé", "Straße über Ökonomie", "mañana élève",
    "Ελληνικά κείμενο", "русский язык", "日本語のテキスト", "中文分词器测试", "한국어 문장",
    "emoji 😀🚀 and 👍🏽 skin", "🚀🚀🚀", "العربية نص", "हिन्दी पाठ", "x=y+1; (a,b) -- ...",
    "\"quoted\" #tag e-mail", "mixed 中文 and English 123", "   ", "\t", "\n", "a", "",
    "<|begin_of_text|>Hello<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "text <|eot_id|> more", "<|eot_id|><|eot_id|>", "not <|special|> token", "<s>Hello</s> world", "a <unk> b<unk>c",
    "non-breaking\u00a0space", "zero\u200bwidth", "ideographic\u3000space", "long " + "abc" * 60,
    "'ſx long s ('ſ folds to s in the contraction group)", "U+1C89 \u1c89 new letter", "punctuation!!! ??? ...\n\n\n", "   spaces\n   after newline",
]


SYLLABLES = ["ka", "to", "ri", "men", "sha", "lo", "qu", "ent", "ion", "ing", "é", "ü", "ñ", "ст", "ра",
             "日", "本", "语", "한", "글", "😀", "ab", "th", "er", "'s", "'ll", "1", "23", "456"]


def corpus_lines(n=400):
    rng = random.Random(1234)
    # Plain words plus made-up words from syllables, so that BPE training finds enough merges to fill its vocab.
    made_up = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = []
    for i in range(n):
        k = rng.randint(3, 14)
        words = [rng.choice(WORDS) if rng.random() < 0.5 else rng.choice(made_up) for _ in range(k)]
        sep = rng.choice([" ", " ", " ", "  ", "\t", " \n"])
        line = sep.join(words)
        if i % 7 == 0:
            line = "    " + line  # indented, like code
        if i % 11 == 0:
            line += " " + str(rng.randint(0, 10**9))
        lines.append(line)
    return lines


def make_spm(out, corpus_file, name="spm", controls=()):
    """`controls`: control pieces after <unk>, <s> and </s> (Mistral v0.3's [INST], [/INST], ...)."""
    import sentencepiece as spm
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    # Llama 2's tokenizer.model: BPE, byte_fallback, identity normalization, dummy prefix, no whitespace
    # squeezing, digits split, unk=0 bos=1 eos=2 (as its normalizer_spec / trainer_spec say).
    spm.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(d / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=list(controls), num_threads=1, minloglevel=2)
    (d / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    # Llama 2's tokenizer_config.json writes tokens as AddedToken objects; eos as a plain string here so that
    # both forms are exercised.
    cfg = {"add_bos_token": True, "add_eos_token": False,
           "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False},
           "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": True,
           "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer", "chat_template": CHAT_TEMPLATE_L2}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))

    # transformers' Llama tokenizers hold <unk>, <s> and </s> as special added tokens: split out of the text.
    specials = {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())}
    cases = []
    for text in TEST_STRINGS:
        ids = sp.encode(text)
        # encode_with_special: special token strings are split out first and each piece between them is
        # encoded on its own (as transformers' legacy Llama tokenizer does).
        with_special, rest = [], text
        while True:
            hits = [(rest.find(s), s) for s in specials if rest.find(s) >= 0]
            if not hits:
                if rest:
                    with_special += sp.encode(rest)
                break
            pos, s = min(hits)
            if pos:
                with_special += sp.encode(rest[:pos])
            with_special.append(specials[s])
            rest = rest[pos + len(s):]
        cases.append({"text": text, "ids": ids, "with_special": with_special, "decoded": sp.decode(with_special),
                      "pieces": [sp.id_to_piece(i) for i in ids],
                      "document": [sp.bos_id()] + ids})  # add_bos_token true, add_eos_token false (cfg above)
    return {"dir": "spm", "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "add_bos": True, "add_eos": False, "chat_template": CHAT_TEMPLATE_L2,
            "pieces": {p: sp.piece_to_id(p) for p in ["<unk>", "<s>", "</s>", "<0x41>", "▁the"]},
            "cases": cases,
            "long": [{"text": t, "ids": sp.encode(t)} for t in long_texts()]}


def long_texts():
    """Texts past the C++ sentencepiece wrapper's 80 KB, which it encodes in pieces cut at single spaces: one of
    ~300 KB of words, separators of every kind and lines of code, and one with 30 KB without a space in its middle
    (where no cut is found and the rest is encoded whole)."""
    rng = random.Random(99)
    seps = [" "] * 8 + ["  ", "\n", "\t", " \n", "\n    ", ", ", ". "]
    def words(nbytes):
        parts, n = [], 0
        while n < nbytes:
            w = rng.choice(WORDS) if rng.random() < 0.7 else "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 5)))
            if rng.random() < 0.01:
                w = "x" * rng.randint(200, 400)  # a word longer than the cut's look-around
            parts += [w, rng.choice(seps)]
            n += len(w.encode()) + 1
        return "".join(parts)
    return [words(300_000), words(90_000) + "日本語のテキスト" * 1400 + words(90_000)]


def make_bpe(out, lines):
    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    # Llama 3 keeps its special tokens after the BPE vocabulary (128000..128255).
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    d = out / "bpe"
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    # Llama 3 (base)'s tokenizer_config.json: no add_bos_token key (the post-processor adds BOS), tokens as
    # strings, an added_tokens_decoder, a chat template.
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
           "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
           "chat_template": CHAT_TEMPLATE_L3,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": True} for s in LLAMA3_SPECIALS}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))

    # Variant: merges as "a b" strings (tokenizers < 0.20 and the published Llama 3 files) and ignore_merges
    # (Llama 3's tokenizer.json sets it: a pre-token found whole in the vocab is not merged).
    legacy = json.loads((d / "tokenizer.json").read_text())
    legacy["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in legacy["model"]["merges"]]
    legacy["model"]["ignore_merges"] = True
    ld = out / "bpe_legacy"
    ld.mkdir(parents=True, exist_ok=True)
    (ld / "tokenizer.json").write_text(json.dumps(legacy, ensure_ascii=False))
    cfg_instruct = dict(cfg, eos_token={"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False,
                                        "normalized": False, "rstrip": False, "single_word": False,
                                        "special": True})  # Llama 3 Instruct's EOS, in the object form
    (ld / "tokenizer_config.json").write_text(json.dumps(cfg_instruct, indent=2))

    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")

    def expected(path, texts=TEST_STRINGS):
        t = Tokenizer.from_file(str(path))
        # transformers reads tokenizer_config.json on top of tokenizer.json: the BOS/EOS ids and whether a
        # document gets them come from it (a second oracle for the same document ids).
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(path.parent))
        cases = []
        for text in texts:
            t.encode_special_tokens = True  # special token strings in the text are plain text
            ids = t.encode(text, add_special_tokens=False).ids
            document = t.encode(text, add_special_tokens=True).ids  # post-processor adds BOS; text stays text
            assert document == hf(text, split_special_tokens=True)["input_ids"], text
            t.encode_special_tokens = False
            with_special = t.encode(text, add_special_tokens=False).ids
            cases.append({"text": text, "ids": ids, "with_special": with_special, "document": document,
                          "decoded": t.decode(with_special, skip_special_tokens=False),
                          "pretokens": [p for p, _ in split.pre_tokenize_str(text)]})
        return {"bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id, "chat_template": hf.chat_template,
                "cases": cases}

    # Variant: Qwen2's layout (Qwen2 / 2.5 / 3 tokenizer.json): its regex (digits one at a time) and an NFC
    # normalizer; test strings with decomposed and reorderable marks, Hangul jamo, singletons, exclusions.
    qwen = json.loads((d / "tokenizer.json").read_text())
    qwen["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_PATTERN
    qwen["normalizer"] = {"type": "NFC"}
    qd = out / "bpe_qwen"
    qd.mkdir(parents=True, exist_ok=True)
    (qd / "tokenizer.json").write_text(json.dumps(qwen, ensure_ascii=False))
    (qd / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    rng = random.Random(77)
    pool = ["a", "e", "o", "u", "A", "n", "c", "s", " ", "1", "\u0301", "\u0300", "\u0308", "\u0327", "\u0328",
            "\u0323", "\u0302", "\u0306", "\u031b", "\u0345", "\u0344", "\u212b", "\u2126", "\u1100", "\u1161",
            "\u11a8", "\uac00", "\u0958", "\u0915", "\u093c", "\u05d1", "\u05bc", "\u0f73", "\u1e9b", "\u00c5",
            "\u3099", "\u304b"]
    nfc_strings = ["cafe\u0301 nai\u0308ve re\u0301sume\u0301", "a\u0328\u0301 a\u0301\u0328 o\u031b\u0323",
                   "\u212b \u2126 \u0344 \u0958", "\u1100\u1161\u11a8 \uac00\u11a8 \u1100\u1161",
                   "Vie\u0323\u0302t Nam 2024", "\u304b\u3099 \u05d1\u05bc", "digits 1234567 12.5",
                   # Marks and a composite assigned after Unicode 9.0, which tokenizers' NFC does not know: no
                   # reordering, composition blocked, no decomposition.
                   "\u0898\u0898\u0899\u0899", "a\u0899\u0301 a\u0301\u0899", "\u1df6\u0316 \U00011839\U0001183a",
                   "\U00011935\U00011930 \U00011938"] + \
                  ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    qwen_expected = expected(qd / "tokenizer.json", TEST_STRINGS + nfc_strings)
    normalizer = Tokenizer.from_file(str(qd / "tokenizer.json")).normalizer
    for c in qwen_expected["cases"]:
        c["normalized"] = normalizer.normalize_str(c["text"])
        c.pop("pretokens")
    qwen_expected["nfc_table"] = nfc_table(normalizer)

    # Variant: added tokens that take the white space around them (AddedToken lstrip / rstrip), special or not.
    from tokenizers import AddedToken
    strip = Tokenizer.from_file(str(d / "tokenizer.json"))
    strip.add_tokens([AddedToken("<tool>", lstrip=True, special=False)])
    strip.add_special_tokens([AddedToken("<|eom|>", rstrip=True, special=True),
                              AddedToken("<|both|>", lstrip=True, rstrip=True, special=True)])
    sd = out / "bpe_strip"
    sd.mkdir(parents=True, exist_ok=True)
    strip.save(str(sd / "tokenizer.json"))
    (sd / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    rng = random.Random(5)
    parts = ["<tool>", "<|eom|>", "<|both|>", "<|eot_id|>", " ", "  ", "\n", "\t", "\u3000", "\u00a0", "\u200b", "a",
             "word", "日本", "<tool", "x<tool>y"]
    strip_strings = ["call <tool> now", "end<|eom|>  \n next", "a \t<|both|>\u3000 b", "<|eot_id|> <tool>",
                     "<|eom|> <tool>", "  <tool>"] + \
                    ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(80)]
    strip_expected = expected(sd / "tokenizer.json", TEST_STRINGS + strip_strings)
    for c in strip_expected["cases"]:
        c.pop("pretokens")
        c["normalized"] = strip.decode(c["ids"], skip_special_tokens=False)  # the stripped white space is gone

    # Variant: GPT-2's layout (SmolLM2's, StarCoder's tokenizer.json): each digit split off alone, then ByteLevel's
    # own regex (GPT-2's: contractions in lower case only, " ?\p{L}+", " ?\p{N}+", ...); and ByteLevel alone.
    gpt2_strings = ["It's 'S 'LL we'RE I'm don't", "  two  spaces\t\ttabs\n\n new", "x=12345.678, y = -9",
                    "\u0661\u0662\u0663 \u00bd\u2153 \u2167 numbers", "a  1 b\u00a01", "end   ",
                    "\u3000\u3000wide space", "emoji 😀😀 and café"] + \
                   ["".join(rng.choice(["'s", "'T", " ", "  ", "\n", "1", "22", "a", "Bc", "!", "?!", "\u00e9",
                                        "\u0663", "\t", "😀"]) for _ in range(rng.randint(1, 10))) for _ in range(120)]
    gpt2_dirs = {}
    for name, steps in [("bpe_gpt2", [{"type": "Digits", "individual_digits": True}]), ("bpe_gpt2_plain", [])]:
        g = json.loads((d / "tokenizer.json").read_text())
        g["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        gd = out / name
        gd.mkdir(parents=True, exist_ok=True)
        (gd / "tokenizer.json").write_text(json.dumps(g, ensure_ascii=False))
        (gd / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        gpt2_dirs[name] = expected(gd / "tokenizer.json", TEST_STRINGS + gpt2_strings)
        for c in gpt2_dirs[name]["cases"]:
            c.pop("pretokens")

    common = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "add_bos": True, "add_eos": False,
              "pieces": {p: tok.token_to_id(p) for p in LLAMA3_SPECIALS + ["Ġthe", "the", "a"]}}
    return [dict(common, dir="bpe", **expected(d / "tokenizer.json")),
            dict(common, dir="bpe_legacy", **expected(ld / "tokenizer.json")),
            dict(common, dir="bpe_qwen", **qwen_expected),
            dict(common, dir="bpe_strip", **strip_expected, vocab_size=strip.get_vocab_size(with_added_tokens=True)),
            dict(common, dir="bpe_gpt2", **gpt2_dirs["bpe_gpt2"]),
            dict(common, dir="bpe_gpt2_plain", **gpt2_dirs["bpe_gpt2_plain"])]


def nfc_table(normalizer):
    """[text, tokenizers' NFC of it] for every entry of an NFC table as Python's unicodedata (a newer Unicode than
    tokenizers') has it: each precomposed character and its canonical decomposition, each two-codepoint
    decomposition as a pair, each combining mark after U+0345 (class 240) or, for 240 and above, before U+0334
    (class 1). Holds lib/data/unicode_nfc_tables.cpp to the normalizer the ids come from."""
    import unicodedata
    texts = []
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        ch = chr(c)
        k = unicodedata.combining(ch)
        if k:
            texts.append("a\u0345" + ch if k < 240 else "a" + ch + "\u0334")
        if unicodedata.normalize("NFD", ch) != ch:
            texts += [ch, unicodedata.normalize("NFD", ch)]
        raw = unicodedata.decomposition(ch)
        if raw and not raw.startswith("<") and len(raw.split()) == 2:
            texts.append("".join(chr(int(x, 16)) for x in raw.split()))
    return [[t, normalizer.normalize_str(t)] for t in texts]


def unicode_classes():
    """Membership of sampled codepoints in \\p{L}, \\p{N}, \\s as tokenizers' regex engine (Oniguruma) sees
    them: holds lib/data/unicode_tables.cpp to the engine the ids come from."""
    from tokenizers import Regex, pre_tokenizers
    sample = [c for c in range(0, 0x110000, 61) if not 0xD800 <= c <= 0xDFFF]
    sample += [0x1C89, 0x17F, 0x85, 0xA0, 0x1C, 0x1F, 0x2028, 0x3000, 0x200B, 0xFEFF, 0x30000, 0x323AF]
    text = "".join(map(chr, sample))
    out = {}
    for name, pat in [("letter", r"\p{L}"), ("number", r"\p{N}"), ("white_space", r"\s")]:
        pieces = pre_tokenizers.Split(Regex(pat), behavior="isolated").pre_tokenize_str(text)
        hits = set()
        for piece, (a, b) in pieces:
            if b - a == 1 and pre_tokenizers.Split(Regex(pat), behavior="removed").pre_tokenize_str(piece) == []:
                hits.add(sample[a])
        out[name] = sorted(hits)
    return {"sample": sample, **out}


def make_bad(out):
    (out / "bad_empty").mkdir(parents=True, exist_ok=True)
    (out / "bad_empty" / "config.json").write_text("{}")
    (out / "bad_malformed").mkdir(parents=True, exist_ok=True)
    (out / "bad_malformed" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0,}}')
    (out / "bad_wordpiece").mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer, models
    t = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    t.save(str(out / "bad_wordpiece" / "tokenizer.json"))


def generate(out_dir: pathlib.Path):
    out = out_dir / "tokenizer"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = corpus_lines()
    corpus_file = out / "corpus.txt"
    corpus_file.write_text("\n".join(lines) + "\n")
    models_ = [make_spm(out, corpus_file)] + make_bpe(out, lines)
    make_bad(out)
    (out / "cases.json").write_text(json.dumps({"models": models_, "unicode": unicode_classes()},
                                               ensure_ascii=False, indent=1))
