"""A small byte-level BPE tokenizer for the checkpoint factory, plus each family's chat template.

The tokenizer is trained with the `tokenizers` library on a fixed built-in corpus, so the
same seedless call always gives the same vocabulary. Special tokens are appended after the
trained vocabulary (as in the real checkpoints, where they sit at the top of the id range);
glimpse must read every id from the files, never assume these numbers.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (also fine for the GLM-4 tokenizer, which is tiktoken-like).
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_WORDS = (
    "the a an of to and in is it that this what where which who how why describe image picture photo video "
    "frame second seconds scene cat dog coffee cup rocket astronaut space star galaxy camera man woman person "
    "red green blue black white yellow left right top bottom center box answer think question please tell me "
    "about there are one two three four five six seven eight nine ten many few large small big little color "
    "sky table saucer launch suit helmet flag sitting standing looking moving pan slide show text number count "
    "you I we they he she can could would should will do does did not yes no hello world model vision language "
    "assistant user system tool call result json list first last next previous time minute hour long short"
).split()

_EXTRA_TEXT = (
    "0.0 seconds 0.5 seconds 1.0 seconds 2.5 seconds 10.0 seconds 12.3 seconds 100 200 300 1000 "
    "<think>reasoning</think><answer>final</answer> (0,0,1000,1000) [12, 34, 56, 78] "
    "café naïve résumé 猫 咖啡 图片 视频 こんにちは 😀 🚀 ✓ — “quotes” ‘single’ … "
    "Hello, world! How are you? I'm fine; thanks. It's 3:45 pm. e-mail: a@b.c #tag $5 100% "
)


def _corpus() -> list[str]:
    lines = [_EXTRA_TEXT]
    n = len(_WORDS)
    # A deterministic pseudo-text: every word with several neighbours, so merges form.
    for i in range(n):
        words = [_WORDS[(i * k + 7 * k * k) % n] for k in range(1, 13)]
        lines.append(" ".join(words).capitalize() + ". " + " ".join(reversed(words)) + "?")
    lines.extend(f"{i} {i / 10:.1f} {i * 37 % 1000}" for i in range(300))
    # Pseudo-words from syllables (a fixed LCG, no RNG state) so larger vocabularies find merges.
    syll = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    x = 12345
    for _ in range(12000):
        words = []
        for _ in range(8):
            x = (1103515245 * x + 12345) % 2**31
            words.append("".join(syll[(x >> (8 + s)) % len(syll)] for s in range(0, 7 * (1 + x % 3), 7)))
        lines.append(" ".join(words))
    return lines


def build_tokenizer(vocab_size: int, special_tokens: list[str], added_tokens: list[str]) -> Tokenizer:
    """Train a byte-level BPE of about `vocab_size` ids, then append the given tokens.

    `special_tokens` are registered as special (skipped when decoding with
    skip_special_tokens); `added_tokens` are single tokens that still decode as text
    (GLM's `<think>`, box markers).
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens) - len(added_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    return tok


# ---- chat templates (modelled on the real checkpoints' templates; rendered by HF with
# trim_blocks and lstrip_blocks) -------------------------------------------------------------

_GLM_PARTS = """
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}
{%- for item in content -%}
{%- if item.type in ('video', 'video_url') or ('video' in item and item.type is not defined) -%}
<|begin_of_video|><|video|><|end_of_video|>
{%- elif item.type in ('image', 'image_url') or ('image' in item and item.type is not defined) -%}
<|begin_of_image|><|image|><|end_of_image|>
{%- elif item.type == 'text' -%}{{ item.text }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

# GLM-4.1V-Thinking: no thinking toggle; the model always answers <think>...</think><answer>...</answer>.
GLM41V_TEMPLATE = (
    _GLM_PARTS
    + """[gMASK]<sop>
{%- for msg in messages -%}
{%- if msg.role == 'system' -%}<|system|>
{{ render_content(msg.content) }}
{%- elif msg.role == 'user' -%}<|user|>
{{ render_content(msg.content) }}
{%- elif msg.role == 'assistant' -%}<|assistant|>{{ msg.metadata if msg.metadata else '' }}
{{ render_content(msg.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{% endif -%}"""
)

# GLM-4.5V / 4.6V / GLMGA: `enable_thinking=False` appends /nothink to user turns and opens
# the answer with an empty think block.
GLM46V_TEMPLATE = (
    _GLM_PARTS
    + """[gMASK]<sop>
{%- set ns = namespace(last_user=-1) -%}
{%- for msg in messages -%}{%- if msg.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for msg in messages -%}
{%- if msg.role == 'system' -%}<|system|>
{{ render_content(msg.content) }}
{%- elif msg.role == 'user' -%}
{%- set text = render_content(msg.content) -%}<|user|>
{{ text }}{{ '/nothink' if (enable_thinking is defined and not enable_thinking and not text.endswith('/nothink')) else '' }}
{%- elif msg.role == 'assistant' -%}<|assistant|>
{%- if loop.index0 > ns.last_user and msg.reasoning_content -%}
{{ '\\n<think>' + msg.reasoning_content + '</think>' }}
{%- else -%}
{{ '\\n<think></think>' }}
{%- endif -%}
{{ '\\n' + render_content(msg.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{{ '<think></think>\\n' if (enable_thinking is defined and not enable_thinking) else '' }}
{%- endif -%}"""
)

# GLM-4.5V / 4.6V as they ship: GLM46V_TEMPLATE plus the real templates' tool section. Given `tools`, a
# system turn lists them and teaches the call format; an assistant turn's `tool_calls` (arguments as an object)
# are written `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>` (a string value
# raw, others as JSON); `tool` turns are `<|observation|>` turns of `<tool_response>` blocks, images included.
# Without tools it renders exactly what GLM46V_TEMPLATE renders.
GLM45V_TOOLS_TEMPLATE = (
    _GLM_PARTS
    + """[gMASK]<sop>
{%- if tools -%}<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for msg in messages -%}{%- if msg.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for msg in messages -%}
{%- if msg.role == 'system' -%}<|system|>
{{ render_content(msg.content) }}
{%- elif msg.role == 'user' -%}
{%- set text = render_content(msg.content) -%}<|user|>
{{ text }}{{ '/nothink' if (enable_thinking is defined and not enable_thinking and not text.endswith('/nothink')) else '' }}
{%- elif msg.role == 'assistant' -%}<|assistant|>
{%- if loop.index0 > ns.last_user and msg.reasoning_content -%}
{{ '\\n<think>' + msg.reasoning_content + '</think>' }}
{%- else -%}
{{ '\\n<think></think>' }}
{%- endif -%}
{{ '\\n' + render_content(msg.content) }}
{%- for tc in (msg.tool_calls or []) -%}
{%- set fn = tc.function if tc.function is defined else tc -%}
{{ '\\n<tool_call>' + fn.name }}
{%- for key, value in fn.arguments.items() -%}
{{ '\\n<arg_key>' + key + '</arg_key>\\n<arg_value>' }}{{ value if value is string else (value | tojson(ensure_ascii=False)) }}{{ '</arg_value>' }}
{%- endfor -%}
{{ '\\n</tool_call>' }}
{%- endfor -%}
{%- elif msg.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}<|observation|>{%- endif -%}
{{ '\\n<tool_response>\\n' + render_content(msg.content) + '\\n</tool_response>' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{{ '<think></think>\\n' if (enable_thinking is defined and not enable_thinking) else '' }}
{%- endif -%}"""
)

QWEN25VL_TEMPLATE = """{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}
{%- for message in messages -%}
{%- if loop.first and message.role != 'system' -%}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif -%}
<|im_start|>{{ message.role }}
{% if message.content is string -%}{{ message.content }}<|im_end|>
{% else -%}
{%- for content in message.content -%}
{%- if content.type in ('image', 'image_url') or ('image' in content and content.type is not defined) -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif content.type in ('video', 'video_url') or ('video' in content and content.type is not defined) -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in content -%}{{ content.text }}
{%- endif -%}
{%- endfor -%}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% endif -%}"""
