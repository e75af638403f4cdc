"""Data pipeline oracles: chat-template rendering, Alpaca prompts and text documents tokenized by transformers,
for the C++ renderers and record readers of lib/data (tests/test_data*.cpp).

Tokenizers come from gen_tokenizer's recipes (trained here, small): a byte-level BPE tokenizer.json like
Llama 3's and a sentencepiece tokenizer.model like Llama 2's / Mistral's, each with the official chat template
of the model in tokenizer_config.json. Expected ids come from transformers' apply_chat_template(tokenize=True);
for the sentencepiece models, transformers' LlamaTokenizer is built from the model's pieces and scores (the
converter transformers uses needs protobuf, absent here) with legacy=True, and checked against sentencepiece
itself on every rendered text.

Which tokens are in the loss is computed here without our renderer's help: an assistant turn spans from its
content (as the template prints it) to the end of that turn (the text of messages[:i+1] rendered); a token is
in the loss from the first token where the ids of the rendered text cut at the span's start differ from the
full ids, up to the span's end.

Writes under out_dir/data/:
  llama3/, llama2/, mistral/   model directories (tokenizer files only)
  <name>.jsonl                 records read by the C++ tests
  expected.json                per file and line: ids, loss mask, rendered text
"""
import json, pathlib, shutil

import gen_tokenizer

# Official chat templates, verbatim from each model's tokenizer_config.json on the Hugging Face Hub.
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
# meta-llama/Llama-2-7b-chat-hf
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# mistralai/Mistral-7B-Instruct-v0.1
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# HuggingFaceH4/zephyr-7b-beta (TinyLlama/TinyLlama-1.1B-Chat-v1.0's too): newlines between the tags, which
# transformers' trim_blocks drops after each block tag and keeps after each message.
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")

# Qwen/Qwen2.5-7B-Instruct (ChatML with a default system prompt and tools)
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen2-7B-Instruct (and Qwen1.5-*-Chat): ChatML with "You are a helpful assistant." as its default system prompt
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
         "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\\n' }}{% endif %}")

# HuggingFaceTB/SmolLM2-*-Instruct: Qwen2's template with SmolLM's default system prompt (no begin token, no tools),
# its line breaks newline characters, as its tokenizer_config.json's "\n" reads (368 characters).
SMOLLM2 = QWEN2.replace("\\n", "\n").replace("You are a helpful assistant.",
                                            "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
assert len(SMOLLM2) == 368 and "\\" not in SMOLLM2

# Official templates kept as files in chat_templates/, byte for byte the models' tokenizer_config.json
# chat_template (as TRL ships them in trl/chat_templates): meta-llama/Llama-3.1-8B-Instruct (llama3_1),
# meta-llama/Llama-3.2-1B-Instruct (llama3_2), Qwen/Qwen3-8B (qwen3), Qwen/Qwen3-4B-Instruct-2507
# (qwen3_instruct_2507).
TEMPLATES = pathlib.Path(__file__).resolve().parent / "chat_templates"
LLAMA31 = (TEMPLATES / "llama3_1.jinja").read_text()
LLAMA32 = (TEMPLATES / "llama3_2.jinja").read_text()
QWEN3 = (TEMPLATES / "qwen3.jinja").read_text()
QWEN3_2507 = (TEMPLATES / "qwen3_instruct_2507.jinja").read_text()
# deepseek-ai/DeepSeek-R1-Distill-Llama-8B (deepseek_r1_distill_llama: its tokenizer_config.json's chat_template, one
# line; public copies of it agree on everything but the tool calls' arguments, which no case here renders).
DEEPSEEK_R1 = (TEMPLATES / "deepseek_r1_distill_llama.jinja").read_text(encoding="utf-8")
# mistralai/Mistral-7B-Instruct-v0.3 (mistral_v0_3: its chat_template since the tools update; the copies of it in
# public code agree), with the control tokens of v0.3's vocabulary after <unk>, <s> and </s>.
MISTRAL_V03 = (TEMPLATES / "mistral_v0_3.jinja").read_text()
MISTRAL_V03_CONTROLS = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
# What Llama 3.1's template prints as "Today Date" (and 3.2's where strftime_now is undefined).
LLAMA3_DATE = "26 Jul 2024"

SYSTEM = {"role": "system", "content": "You are a brief assistant. Answer in one line."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [SYSTEM, {"role": "user", "content": "What is the quick brown fox?"},
     {"role": "assistant", "content": "It jumps over the lazy dog."}],
    [SYSTEM, {"role": "user", "content": "  What is 2+2?  "}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 1234567 times 2?\n"}, {"role": "assistant", "content": "2469134, I'm sure."},
     {"role": "user", "content": "café naïve résumé"}, {"role": "assistant", "content": "日本語 and 中文 😀\nDone."}],
    [{"role": "user", "content": "Multi\nline\n\nquestion: x=y+1; (a,b)"},
     {"role": "assistant", "content": "\tIndented answer.\n\nSecond paragraph."},
     {"role": "user", "content": "Thanks!"}],  # ends on a user turn: nothing after it is in the loss
    [{"role": "user", "content": "Tell me about <|eot_id|> please"},
     {"role": "assistant", "content": "They are special-token strings."}],
]

# data.chat_format (data.chat_template "custom"): formats spelled out in the run config, held to this generic
# template, which transformers renders with the format as a template variable `f`.
CUSTOM_TEMPLATE = ("{% if f.bos %}{{ bos_token }}{% endif %}{% if messages[0]['role'] != 'system' and f.default_system %}"
                   "{{ f.system_prefix + f.default_system + f.system_suffix }}{% endif %}{% for m in messages %}"
                   "{% set c = m['content'] | trim if f.strip else m['content'] %}"
                   "{{ f[m['role'] + '_prefix'] + c + f[m['role'] + '_suffix'] }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ f.generation_prompt or f.assistant_prefix }}{% endif %}")
CUSTOM_FORMATS = {
    # ChatML with no default system prompt (Hermes-3-Llama-3.1's, without its BOS here: Qwen's vocabulary has none)
    "chatml": ("qwen", {"bos": False, "system_prefix": "<|im_start|>system\n", "system_suffix": "<|im_end|>\n",
                        "user_prefix": "<|im_start|>user\n", "user_suffix": "<|im_end|>\n",
                        "assistant_prefix": "<|im_start|>assistant\n", "assistant_suffix": "<|im_end|>\n",
                        "default_system": "", "generation_prompt": "", "strip": False}),
    # Vicuna v1.1 on Llama 2's sentencepiece: BOS, a default system prompt, stripped contents, answers ending with </s>,
    # a generation prompt without the space the answers follow
    "vicuna": ("llama2", {"bos": True, "system_prefix": "", "system_suffix": " ", "user_prefix": "USER: ",
                          "user_suffix": " ", "assistant_prefix": "ASSISTANT: ", "assistant_suffix": "</s>",
                          "default_system": "A chat between a curious user and an artificial intelligence assistant.",
                          "generation_prompt": "ASSISTANT:", "strip": True}),
}

# Qwen3's <think> blocks: reasoning in the content or in reasoning_content, after the last user query or before
# it (left out), a user turn that is a tool response (not a query), answers in a row.
QWEN3_CONVERSATIONS = [
    [{"role": "user", "content": "What is 6 x 7?"},
     {"role": "assistant", "content": "<think>\nSix sevens.\n</think>\n\n42"}],
    [SYSTEM, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris.", "reasoning_content": "\nThe capital is Paris.\n\n"}],
    [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "<think>r1</think>a1"},
     {"role": "user", "content": "Second?"},
     {"role": "assistant", "content": "a2", "reasoning_content": "r2"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}, {"role": "assistant", "content": "a2"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first", "reasoning_content": "why"},
     {"role": "assistant", "content": "\n\nsecond"}],
    [{"role": "user", "content": "only a close tag"},
     {"role": "assistant", "content": "early\n</think>\n\nlate </think> last"}],
    [{"role": "user", "content": "empty reasoning"}, {"role": "assistant", "content": "x", "reasoning_content": ""},
     {"role": "user", "content": "ends on a user turn"}],
]

# Mistral v0.3's template puts the system message into the last user message only where that message ends the
# conversation; control-token strings in a message are the tokens; answers with spaces around them are stripped.
MISTRAL_V03_CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "Hello world"}],
    [SYSTEM, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": " q2 \n"}],
    [{"role": "user", "content": "Is [INST] a token?[/INST]"}, {"role": "assistant", "content": "  Yes, [INST].  "}],
    [{"role": "user", "content": "empty answer"}, {"role": "assistant", "content": "  "}],
]


# Zephyr's template: contents not stripped (newlines at both ends), answers in a row, an empty answer.
ZEPHYR_CONVERSATIONS = [
    [{"role": "user", "content": "\n\nnewlines\n"}, {"role": "assistant", "content": "\n\nanswer\n\n"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}, {"role": "assistant", "content": "x"}],
]


FUZZ_WORDS = ["alpha", "Beta", "42", "x=y+1;", "café", "日本語", "😀", "(a,b)", "end.", "\t", "don't", "  "]


def fuzz_text(rng, words, allow_empty):
    """A few of `words` joined by spaces, with white space of its own at both ends (what templates strip or keep)."""
    t = " ".join(rng.choice(words) for _ in range(rng.randint(0 if allow_empty else 1, 6)))
    return rng.choice(["", " ", "\n", "\n\n", "  \n"]) + t + rng.choice(["", " ", "\n", "\n\n", "\n "])


def fuzz_conversations(seed, n, thinking):
    """n random conversations: an optional system message, user / assistant turns in any order (answers in a row,
    a conversation ending on either), contents with spaces and newlines at their ends, unicode, and for Qwen3
    (`thinking`) <think> / </think> anywhere in an answer, reasoning_content absent, empty or with newlines, and user
    turns that are tool responses."""
    import random
    rng = random.Random(seed)
    text = lambda allow_empty: fuzz_text(rng, FUZZ_WORDS, allow_empty)

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(False)}] if rng.random() < 0.4 else []
        for k in range(rng.randint(1, 6)):
            role = "user" if k == 0 else rng.choice(["user", "assistant", "assistant"])
            m = {"role": role, "content": text(thinking)}
            if role == "user" and thinking and rng.random() < 0.2:
                m["content"] = "<tool_response>\n" + text(False) + "\n</tool_response>"
            if role == "assistant" and thinking:
                r = rng.random()
                if r < 0.3:
                    m["content"] = rng.choice(["<think>", "", "\n<think>\n"]) + text(True) + "</think>" + \
                        m["content"] + (rng.choice(["", "</think> tail"]) if rng.random() < 0.3 else "")
                elif r < 0.6:
                    m["reasoning_content"] = rng.choice(["", "\n", text(False)])
            msgs.append(m)
        out.append(msgs)
    return out


def fuzz_custom_formats(seed, n):
    """n random data.chat_format objects: prefixes and suffixes of text, newlines, spaces and special-token strings
    (Llama 3's <|eot_id|>, <|start_header_id|>), with or without BOS, a default system message, stripping and a
    generation prompt."""
    import random
    rng = random.Random(seed)
    bits = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n", "\n\n", " ", ": ", "###", "User", "Bot",
            "[", "]", "<|end_of_text|>"]

    def text(k):
        return "".join(rng.choice(bits) for _ in range(rng.randint(0, k)))

    formats = []
    for _ in range(n):
        f = {key: text(4) for key in ("system_prefix", "system_suffix", "user_prefix", "user_suffix",
                                      "assistant_prefix")}
        f["assistant_suffix"] = text(3) + rng.choice(["<|eot_id|>", "<|end_of_text|>", "\n", "</s>"])
        if not f["system_prefix"] and not f["system_suffix"]:
            f["system_suffix"] = "\n"
        f.update(bos=rng.random() < 0.5, strip=rng.random() < 0.5,
                 default_system=rng.choice(["", "", "Be brief."]), generation_prompt=rng.choice(["", text(2)]))
        formats.append(f)
    return formats


def fuzz_alternating(seed, n):
    """n random conversations for templates whose roles alternate (Mistral v0.3's): an optional system message, then
    user / assistant turns from a user's, ending on either; contents with spaces and newlines at their ends, empty
    answers, unicode and control-token strings ([INST] in a message is the token, as transformers splits it)."""
    import random
    rng = random.Random(seed)
    text = lambda allow_empty: fuzz_text(rng, FUZZ_WORDS + ["[INST]", "[/INST]", "</s>"], allow_empty)

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(False)}] if rng.random() < 0.4 else []
        msgs += [{"role": ["user", "assistant"][k % 2], "content": text(k % 2 == 1)} for k in range(rng.randint(1, 6))]
        out.append(msgs)
    return out


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise.\n3. Sleep."},
    {"instruction": "Translate to French.", "input": "The quick brown fox", "output": "Le renard brun rapide"},
    {"instruction": "Sum the numbers", "input": "1234567 and 42", "output": " 1234609"},
]

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph: café, 日本語, 😀.",
         "text <|eot_id|> with a special-token string kept as text", "x"]


def sp_legacy_ids(sp, text, specials):
    """transformers' legacy Llama tokenization emulated with sentencepiece: special-token strings split the text,
    each piece is encoded on its own (a dummy prefix for each)."""
    out, rest = [], text
    while True:
        hits = [(rest.find(s), s) for s in specials if rest.find(s) >= 0]
        if not hits:
            return out + (sp.encode(rest) if rest else [])
        pos, s = min(hits)
        if pos:
            out += sp.encode(rest[:pos])
        out.append(specials[s])
        rest = rest[pos + len(s):]


def sp_first_ids(sp, text, specials):
    """transformers' non-legacy Llama tokenization (Metaspace prepend_scheme "first") emulated with sentencepiece:
    special-token strings split the text, the piece at the text's start gets the dummy prefix and the others none
    (sentencepiece's model with add_dummy_prefix false, through its own protobuf)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    out, rest, start = [], text, True
    while True:
        hits = [(rest.find(s), s) for s in specials if rest.find(s) >= 0]
        if not hits:
            return out + ((sp if start else bare).encode(rest) if rest else [])
        pos, s = min(hits)
        if pos:
            out += (sp if start else bare).encode(rest[:pos])
        out.append(specials[s])
        rest, start = rest[pos + len(s):], False


def hf_llama_from_spm(model_file, chat_template, legacy=True, specials=(), add_prefix_space=None):
    """transformers' LlamaTokenizer from a sentencepiece BPE model: vocab and merges as transformers'
    SentencePieceExtractor derives them (merges of two pieces whose concatenation is a piece, by its score).
    `specials`: control pieces held as special tokens too (Mistral v0.3's [INST] ...)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:], sp.get_score(i)) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges = [(a, b) for a, b, _ in sorted(merges, key=lambda m: m[2], reverse=True)]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True, add_eos_token=False,
                         bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_prefix_space=add_prefix_space)
    if specials:
        from tokenizers import AddedToken
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
        assert [tok.convert_tokens_to_ids(t) for t in specials] == [vocab[t] for t in specials]
    tok.chat_template = chat_template
    return tok, sp


def ids_of(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def answer_spans_by_prefix(tok, messages, rendered, trims=None, **kw):
    """Each assistant turn from its content (as the template prints it) to the end of that turn (the text of
    messages[:i+1] rendered): for templates that render a conversation's start the same whatever follows. `trims`:
    Llama 3.x's template, which strips the content and ends the turn with <|eot_id|> (a content whose leading
    newlines the header's own "\n\n" would match is found stripped); None: the content whole where it is there, else
    stripped. A string `trims`: a template that strips the content and ends the turn with that token (Mistral v0.3's
    "</s>", whose rendering of messages[:i] is no prefix of the whole where a system message goes into a last user
    message)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, **kw) if i else ""
        through = tok.apply_chat_template(messages[:i + 1], tokenize=False, **kw)
        assert rendered.startswith(through)
        # The content as the template prints it: whole (Mistral), or stripped (Llama 3 `trim`, Llama 2 .strip()).
        if trims:  # the stripped content, then the turn's end (an empty answer: the token alone)
            turn = m["content"].strip() + (trims if isinstance(trims, str) else "<|eot_id|>")
            assert through.endswith(turn), through
            spans.append((len(through) - len(turn), len(through)))
            continue
        printed = m["content"] if rendered.find(m["content"], len(before)) >= 0 else m["content"].strip()
        spans.append((rendered.index(printed, len(before)) if printed else len(through), len(through)))
    return spans


def answer_spans_zephyr(tok, messages, rendered):
    """Zephyr's template: an answer is its content and eos_token; the newline after them, which follows the answer's
    end, is not part of it."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            through = tok.apply_chat_template(messages[:i + 1], tokenize=False)
            turn = m["content"] + tok.eos_token
            assert rendered.startswith(through) and through.endswith(turn + "\n"), through
            spans.append((len(through) - 1 - len(turn), len(through) - 1))
    return spans


def answer_spans_deepseek(tok, messages, rendered):
    """DeepSeek-R1-Distill-Llama's template: an answer is what follows its content's last </think> (all of it where
    there is none), then <｜end▁of▁sentence｜>."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            through = tok.apply_chat_template(messages[:i + 1], tokenize=False)
            turn = m["content"].split("</think>")[-1] + tok.eos_token
            assert rendered.startswith(through) and through.endswith(turn), through
            spans.append((len(through) - len(turn), len(through)))
    return spans


def answer_spans_custom(tok, messages, rendered, f):
    """A custom format (data.chat_format): an answer is its content as printed (stripped where f["strip"]) and the
    assistant suffix, an empty answer's suffix too."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            through = tok.apply_chat_template(messages[:i + 1], tokenize=False, f=f)
            turn = (m["content"].strip() if f["strip"] else m["content"]) + f["assistant_suffix"]
            assert rendered.startswith(through) and through.endswith(turn), through
            spans.append((len(through) - len(turn), len(through)))
    return spans


def answer_spans_chatml(messages, rendered):
    """Qwen3's template renders an answer differently once a later turn follows (its <think> block), so a
    conversation's start is not its prefix's rendering: an answer is what follows each "<|im_start|>assistant\n",
    through the "<|im_end|>\n" that ends its turn."""
    head, tail, spans, pos = "<|im_start|>assistant\n", "<|im_end|>\n", [], 0
    while (pos := rendered.find(head, pos)) >= 0:
        end = rendered.index(tail, pos) + len(tail)
        spans.append((pos + len(head), end))
        pos = end
    assert len(spans) == sum(m["role"] == "assistant" for m in messages), rendered
    return spans


def chat_case(tok, messages, check=None, by_structure=False, trims=None, **kw):
    """kw: the template's variables (Llama 3.2's date_string)."""
    rendered = tok.apply_chat_template(messages, tokenize=False, **kw)
    ids = ids_of(tok.apply_chat_template(messages, tokenize=True, **kw))
    enc = lambda t: ids_of(tok(t, add_special_tokens=False))
    assert ids == enc(rendered), rendered
    if check:
        assert ids == check(rendered), ("sentencepiece disagrees", rendered)
    loss = [0] * len(ids)
    spans = answer_spans_chatml(messages, rendered) if by_structure == True else \
        answer_spans_zephyr(tok, messages, rendered) if by_structure == "zephyr" else \
        answer_spans_deepseek(tok, messages, rendered) if by_structure == "deepseek" else \
        answer_spans_custom(tok, messages, rendered, kw["f"]) if by_structure == "custom" else \
        answer_spans_by_prefix(tok, messages, rendered, trims, **kw)
    for start, end in spans:
        first = common_prefix(enc(rendered[:start]), ids)
        last = common_prefix(enc(rendered[:end]), ids)
        assert last == len(enc(rendered[:end]))  # the turn ends on a special token: a clean cut
        for t in range(first, last):
            loss[t] = 1
    return {"messages": messages, "rendered": rendered, "ids": ids, "loss": loss}


def alpaca_prompt(r):
    # tatsu-lab/stanford_alpaca train.py PROMPT_DICT
    if r.get("input"):
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{r['instruction']}\n\n### Response:")


def alpaca_case(tok, r):
    # train.py: source = prompt, target = output + eos_token, tokenized together with the tokenizer's BOS.
    source = alpaca_prompt(r)
    ids = ids_of(tok(source + r["output"] + tok.eos_token))
    first = common_prefix(ids_of(tok(source)), ids)
    return {"record": r, "ids": ids, "loss": [int(t >= first) for t in range(len(ids))]}


# TRL's prompt-completion records (trl/trainer/sft_trainer.py, tokenize_fn): strings get the EOS token's text
# appended to the completion where it does not end with it; the ids are the tokenizer's of prompt + completion, the
# loss mask 0 over as many tokens as the prompt alone has. Lists of messages: the prompt through the chat template
# with add_generation_prompt, then prompt + completion.
COMPLETIONS = [
    {"prompt": "Translate to French: cat", "completion": " chat"},
    {"prompt": "Q: What is 2+2?\nA:", "completion": " 4\n"},
    {"prompt": "café naïve", "completion": " résumé 日本語 😀"},
]
CONV_COMPLETIONS = [
    {"prompt": [{"role": "user", "content": "Hello world"}],
     "completion": [{"role": "assistant", "content": "Hello! How can I help?"}]},
    {"prompt": [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}],
     "completion": [{"role": "assistant", "content": "6"}]},
]


def completion_case(tok, r):
    if isinstance(r["prompt"], list):
        prompt = ids_of(tok.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True))
        ids = ids_of(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True))
    else:
        completion = r["completion"] if r["completion"].endswith(tok.eos_token) else r["completion"] + tok.eos_token
        prompt, ids = ids_of(tok(r["prompt"])), ids_of(tok(r["prompt"] + completion))
    assert ids[:len(prompt)] == prompt, r  # TRL warns where they part; these records do not
    return {"record": r, "ids": ids, "loss": [0] * len(prompt) + [1] * (len(ids) - len(prompt))}


def text_case(tok, text):
    ids = ids_of(tok(text, split_special_tokens=True)) + [tok.eos_token_id]  # add_eos (default true)
    return {"record": {"text": text}, "ids": ids, "loss": [1] * len(ids)}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def qwen_dir(d, bpe_dir, template, added=()):
    """A Qwen2.5-style tokenizer: the byte-level BPE with <|endoftext|>, <|im_start|>, <|im_end|> as special tokens
    after the vocabulary, no BOS (the post-processor only ByteLevel), EOS <|im_end|> (the Instruct models'), and
    `template`. The pre-tokenizer stays Llama 3's (Qwen2's regex differs in splitting digits one by one, and Qwen
    adds an NFC normalizer: tests/test_tokenizer.cpp covers those). `added`: tokens added after them that are not
    special (Qwen3's <think> and </think>)."""
    from tokenizers import AddedToken, Tokenizer, processors
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(a, special=False, normalized=False) for a in added])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "clean_up_tokenization_spaces": False, "model_max_length": 131072, "errors": "replace",
           "tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": False, "chat_template": template,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": s in specials}
                                    for s in specials + list(added)}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return d


def smollm_dir(d, bpe_dir, template):
    """A SmolLM2-style tokenizer: qwen_dir's, in GPT-2's byte-level layout after each digit split off alone
    (SmolLM2's tokenizer.json), bos_token <|im_start|> as SmolLM2's tokenizer_config.json names it (nothing adds it)."""
    qwen_dir(d, bpe_dir, template)
    doc = json.loads((d / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (d / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "<|im_start|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return d


def deepseek_dir(d, bpe_dir, template):
    """A DeepSeek-R1-Distill-Llama-style tokenizer: the byte-level BPE with its special tokens after the vocabulary
    (BOS <｜begin▁of▁sentence｜> added by the post-processor, as Llama 3's; EOS <｜end▁of▁sentence｜>; <｜User｜>,
    <｜Assistant｜>) and <think>, </think> added but not special, as the distills have them."""
    from tokenizers import AddedToken, Tokenizer, processors
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    bos, eos = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
    specials = [bos, eos, "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(a, special=False, normalized=False) for a in ("<think>", "</think>")])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(d / "tokenizer.json"))
    # (The distills name LlamaTokenizerFast, which transformers 4.x runs from tokenizer.json as it is; 5.x rebuilds
    # a sentencepiece-style pipeline for that class, so the file's own class stands in for it here.)
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos,
           "clean_up_tokenization_spaces": False, "model_max_length": 16384, "legacy": True,
           "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
           "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                                               "rstrip": False, "single_word": False,
                                                               "special": s in specials}
                                    for s in specials + ["<think>", "</think>"]}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return d


def generate(out_dir: pathlib.Path):
    from transformers import AutoTokenizer
    out = out_dir / "data"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    work = out / "work"
    work.mkdir()
    lines = gen_tokenizer.corpus_lines()
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    gen_tokenizer.make_spm(work, corpus)
    gen_tokenizer.make_spm(work, corpus, "spm_v3", MISTRAL_V03_CONTROLS)
    gen_tokenizer.make_bpe(work, lines)

    def model_dir(name, src, template):
        d = out / name
        shutil.copytree(work / src, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        return d

    l3 = AutoTokenizer.from_pretrained(str(model_dir("llama3", "bpe", LLAMA3)))
    l31 = AutoTokenizer.from_pretrained(str(model_dir("llama31", "bpe", LLAMA31)))
    l32 = AutoTokenizer.from_pretrained(str(model_dir("llama32", "bpe", LLAMA32)))
    qw = AutoTokenizer.from_pretrained(str(qwen_dir(out / "qwen", work / "bpe", QWEN25)))
    q3 = AutoTokenizer.from_pretrained(str(qwen_dir(out / "qwen3", work / "bpe", QWEN3, ["<think>", "</think>"])))
    q3i = AutoTokenizer.from_pretrained(str(qwen_dir(out / "qwen3_instruct", work / "bpe", QWEN3_2507)))
    q2 = AutoTokenizer.from_pretrained(str(qwen_dir(out / "qwen2", work / "bpe", QWEN2)))
    sm = AutoTokenizer.from_pretrained(str(smollm_dir(out / "smollm2", work / "bpe", SMOLLM2)))
    assert sm.tokenize("It's 123")[-5:] == ["'s", "Ġ", "1", "2", "3"], sm.tokenize("It's 123")
    ds = AutoTokenizer.from_pretrained(str(deepseek_dir(out / "deepseek_r1", work / "bpe", DEEPSEEK_R1)))
    for tok, template in [(l3, LLAMA3), (l31, LLAMA31), (l32, LLAMA32), (qw, QWEN25), (q3, QWEN3), (q3i, QWEN3_2507),
                          (q2, QWEN2), (sm, SMOLLM2)]:
        assert tok.chat_template == template
    assert q3.convert_tokens_to_ids("<think>") == q3.convert_tokens_to_ids("<|im_end|>") + 1
    model_dir("llama2", "spm", LLAMA2)
    model_dir("mistral", "spm", MISTRAL)
    model_dir("zephyr", "spm", ZEPHYR)
    l2, sp = hf_llama_from_spm(out / "llama2" / "tokenizer.model", LLAMA2)
    mi, _ = hf_llama_from_spm(out / "mistral" / "tokenizer.model", MISTRAL)
    ze, _ = hf_llama_from_spm(out / "zephyr" / "tokenizer.model", ZEPHYR)
    sp_check = lambda text: sp_legacy_ids(sp, text, {"<s>": sp.bos_id(), "</s>": sp.eos_id()})
    # Mistral v0.3: its control tokens, transformers' non-legacy tokenizer (tokenizer.json's Metaspace prepend_scheme
    # "first", as v0.3's own file has it) and tokenizer_config.json's legacy false.
    mv3_dir = model_dir("mistral_v3", "spm_v3", MISTRAL_V03)
    mv3, sp3 = hf_llama_from_spm(mv3_dir / "tokenizer.model", MISTRAL_V03, legacy=False,
                                 specials=MISTRAL_V03_CONTROLS)
    mv3.backend_tokenizer.save(str(mv3_dir / "tokenizer.json"))
    assert json.loads((mv3_dir / "tokenizer.json").read_text())["pre_tokenizer"]["prepend_scheme"] == "first"
    cfg = json.loads((mv3_dir / "tokenizer_config.json").read_text())
    cfg["legacy"] = False
    (mv3_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    mv3_specials = {"<s>": sp3.bos_id(), "</s>": sp3.eos_id(), **{t: sp3.piece_to_id(t) for t in MISTRAL_V03_CONTROLS}}
    mv3_check = lambda text: sp_first_ids(sp3, text, mv3_specials)
    # Each of tokenizer.json's Metaspace schemes on v0.3's vocabulary: transformers' ids of texts with control tokens.
    schemes = {"first": mv3,
               "always": hf_llama_from_spm(mv3_dir / "tokenizer.model", "", True, MISTRAL_V03_CONTROLS)[0],
               "never": hf_llama_from_spm(mv3_dir / "tokenizer.model", "", False, MISTRAL_V03_CONTROLS, False)[0]}
    prefix_texts = ["Hello world", " leading space", "[INST] Hi[/INST] there</s>", "<s>x [INST]y", "\n\nz [/INST]"]
    dummy_prefix = {}
    for scheme, tk in schemes.items():
        assert tk.backend_tokenizer.pre_tokenizer.prepend_scheme == scheme
        dummy_prefix[scheme] = [{"text": t, "ids": ids_of(tk(t, add_special_tokens=False))} for t in prefix_texts]
    shutil.rmtree(work)

    # Llama 3.2's template is 3.1's, but for the date where transformers defines strftime_now (the day's date).
    for c in CONVERSATIONS:
        assert l32.apply_chat_template(c, tokenize=False, date_string=LLAMA3_DATE) == \
            l31.apply_chat_template(c, tokenize=False)
    qwen_more = [[{"role": "user", "content": "  spaces stay  "}, {"role": "assistant", "content": "\n kept \n"},
                  {"role": "assistant", "content": "two answers in a row"}]]
    expected = {"dummy_prefix": dummy_prefix}
    for name, tok, by_structure, convs, kw in [
            ("chat_llama31", l31, False, CONVERSATIONS + [
                [{"role": "system", "content": "\n  trimmed system  \n"}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "hello"}]], {}),
            ("chat_llama32", l32, False, CONVERSATIONS, {"date_string": LLAMA3_DATE}),
            ("chat_qwen3", q3, True, CONVERSATIONS + qwen_more + QWEN3_CONVERSATIONS, {}),
            ("chat_qwen3_fuzz", q3, True, fuzz_conversations(3, 60, True), {}),
            ("chat_llama31_fuzz", l31, False, fuzz_conversations(31, 60, False), {}),
            ("chat_qwen3_instruct", q3i, False, CONVERSATIONS + qwen_more, {}),
            ("chat_qwen2", q2, False, CONVERSATIONS + qwen_more, {}),
            ("chat_smollm2", sm, False, CONVERSATIONS + qwen_more + [
                [{"role": "user", "content": "Count: 1234 and 56, it's 7!"}, {"role": "assistant", "content": "89"}]],
             {}),
            ("chat_smollm2_fuzz", sm, False, fuzz_conversations(13, 60, False), {}),
            ("chat_zephyr", ze, "zephyr", CONVERSATIONS + qwen_more + ZEPHYR_CONVERSATIONS, {}),
            ("chat_zephyr_fuzz", ze, "zephyr", fuzz_conversations(7, 60, False), {}),
            ("chat_deepseek_r1", ds, "deepseek", CONVERSATIONS + qwen_more + QWEN3_CONVERSATIONS, {}),
            ("chat_deepseek_r1_fuzz", ds, "deepseek", fuzz_conversations(11, 60, True), {})]:
        cases = [chat_case(tok, c, None, by_structure, tok in (l31, l32), **kw) for c in convs]
        write_jsonl(out / f"{name}.jsonl", [{"messages": c["messages"], "id": i} for i, c in enumerate(cases)])
        expected[name] = cases
    # `generate --format chat`'s prompt: transformers' add_generation_prompt (Qwen3 in thinking mode, its default).
    # Mistral's template has no generation prompt: the conversation up to its last user turn. Llama 2's is left out:
    # its answers start with ' ' + content, and where that space is a token of its own (this small vocabulary has no
    # "▁Answer") training's prompt keeps it, as generate does; transformers' prompt ends before it.
    expected["generation_prompts"] = [
        {"model": model, "system": c[0]["content"] if c[0]["role"] == "system" else "", "user": c[-1]["content"],
         "ids": ids_of(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True))}
        for model, tok in [("llama3", l3), ("llama31", l31), ("qwen", qw), ("qwen3", q3), ("qwen3_instruct", q3i),
                           ("qwen2", q2), ("mistral", mi), ("mistral_v3", mv3), ("zephyr", ze),
                           ("deepseek_r1", ds), ("smollm2", sm)]
        for c in ([{"role": "user", "content": "Hello world"}],
                  [SYSTEM, {"role": "user", "content": "What is the quick brown fox?"}])
        if not (model == "mistral" and c[0]["role"] == "system")]
    # The structural spans agree with the prefix ones where both apply (ChatML without <think> blocks).
    for c in CONVERSATIONS + qwen_more:
        assert chat_case(q3i, c, None, True) == chat_case(q3i, c)
    for name, tok, check, convs, trims in [
            ("chat_mistral_v3", mv3, mv3_check, CONVERSATIONS + MISTRAL_V03_CONVERSATIONS, "</s>"),
            ("chat_mistral_v3_fuzz", mv3, mv3_check, fuzz_alternating(3, 60), "</s>"),
            ("chat_llama3", l3, None, CONVERSATIONS, None),
            ("chat_llama2", l2, sp_check, CONVERSATIONS, None),
            ("chat_mistral", mi, sp_check, [c for c in CONVERSATIONS if c[0]["role"] != "system"], None),
            ("chat_qwen", qw, None, CONVERSATIONS + [
                [{"role": "user", "content": "  spaces stay  "}, {"role": "assistant", "content": "\n kept \n"},
                 {"role": "assistant", "content": "two answers in a row"}]], None)]:
        cases = [chat_case(tok, c, check, trims=trims) for c in convs]
        write_jsonl(out / f"{name}.jsonl", [{"messages": c["messages"], "id": i} for i, c in enumerate(cases)])
        expected[name] = cases
    # ShareGPT's {"conversations": [{"from", "value"}]} (human / gpt / system, and "user" / "assistant" as from; some
    # messages {"role", "content"} already): read as the same messages, the same ids and loss masks.
    froms = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"]}
    sharegpt = []
    for i, c in enumerate(CONVERSATIONS):
        conv = [m if (i + j) % 4 == 3 else {"from": froms[m["role"]][(i + j) % len(froms[m["role"]])],
                                            "value": m["content"]} for j, m in enumerate(c)]
        sharegpt.append({"conversations": conv, "id": i})
    write_jsonl(out / "chat_llama3_sharegpt.jsonl", sharegpt)
    expected["chat_llama3_sharegpt"] = expected["chat_llama3"]
    # The custom formats, on the same conversations (users and answers alternating where they must not), and the
    # prompt generate builds.
    custom_toks = {"qwen": qw, "llama2": l2}
    expected["custom_generation_prompts"] = []
    for name, (model, spec) in CUSTOM_FORMATS.items():
        tok = custom_toks[model]
        tok.chat_template = CUSTOM_TEMPLATE
        cases = [chat_case(tok, c, None, "custom", f=spec)
                 for c in CONVERSATIONS + ZEPHYR_CONVERSATIONS + QWEN3_CONVERSATIONS[2:4]]
        write_jsonl(out / f"chat_custom_{name}.jsonl", [{"messages": c["messages"], "id": i} for i, c in enumerate(cases)])
        expected[f"chat_custom_{name}"] = {"model": model, "format": spec, "cases": cases}
        expected["custom_generation_prompts"] += [
            {"model": model, "format": spec, "system": c[0]["content"] if c[0]["role"] == "system" else "",
             "user": c[-1]["content"], "ids": ids_of(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True,
                                                                              f=spec))}
            for c in ([{"role": "user", "content": "Hello world"}],
                      [SYSTEM, {"role": "user", "content": "What is the quick brown fox?"}])]
    # Random formats on Llama 3's vocabulary, each over the fuzzed conversations (roles in any order).
    convs = fuzz_conversations(13, 40, False)
    l3.chat_template = CUSTOM_TEMPLATE
    expected["chat_custom_fuzz"] = []
    for k, spec in enumerate(fuzz_custom_formats(17, 12)):
        cases = [chat_case(l3, c, None, "custom", f=spec) for c in convs[3 * k % 40:3 * k % 40 + 4]]
        write_jsonl(out / f"chat_custom_fuzz_{k}.jsonl", [{"messages": c["messages"]} for c in cases])
        expected["chat_custom_fuzz"].append({"format": spec, "cases": cases})
    l3.chat_template = LLAMA3
    qw.chat_template, l2.chat_template = QWEN25, LLAMA2
    for name, tok in [("llama3", l3), ("llama2", l2), ("mistral_v3", mv3)]:
        expected[f"completion_{name}"] = [completion_case(tok, r) for r in COMPLETIONS]
        write_jsonl(out / f"completion_{name}.jsonl", COMPLETIONS)
    expected["completion_chat_llama3"] = [completion_case(l3, r) for r in CONV_COMPLETIONS]
    write_jsonl(out / "completion_chat_llama3.jsonl", CONV_COMPLETIONS)
    for name, tok in [("llama3", l3), ("llama2", l2), ("mistral_v3", mv3)]:
        expected[f"alpaca_{name}"] = [alpaca_case(tok, r) for r in ALPACA]
        write_jsonl(out / f"alpaca_{name}.jsonl", ALPACA)
        expected[f"text_{name}"] = [text_case(tok, t) for t in TEXTS]
        write_jsonl(out / f"text_{name}.jsonl", [{"text": t} for t in TEXTS])
    (out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1))
