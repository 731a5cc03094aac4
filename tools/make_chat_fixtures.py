#!/usr/bin/python3
"""Render chat templates with Jinja, as transformers' apply_chat_template does.

Writes tests/fixtures/chat/cases.json: for each template (the kinds masked-diffusion
models ship: LLaMA-3-style headers as in LLaDA-8B-Instruct, ChatML with a default
system message as in Dream-v0-Instruct, in both the compact Qwen2 form and the longer
Qwen2.5 form, plus one template unmaskd does not render) the tokenizer_config.json
fields, and for each conversation the text Jinja renders with add_generation_prompt.
tests/test_chat.c checks that unmaskd's C renderer gives the same text.

Needs python3-jinja2 (Debian). Usage: make_chat_fixtures.py [--out tests/fixtures/chat]
"""

import argparse
import json
import os

import jinja2

HERE = os.path.dirname(os.path.abspath(__file__))

HEADERS = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

CHATML_COMPACT = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CHATML_LONG = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

TEMPLATES = [
    ("headers", "headers", {"chat_template": HEADERS, "bos_token": "<|startoftext|>",
                            "eos_token": "<|endoftext|>"}),
    ("chatml_compact", "chatml", {"chat_template": CHATML_COMPACT,
                                  "eos_token": "<|im_end|>", "bos_token": None}),
    # Newer tokenizer_config.json files may list named templates.
    ("chatml_long", "chatml", {"chat_template": [{"name": "default", "template": CHATML_LONG}],
                               "eos_token": {"content": "<|im_end|>"}, "bos_token": None}),
    ("unsupported", "unsupported", {"chat_template": MISTRAL, "bos_token": "<s>",
                                    "eos_token": "</s>"}),
]

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "system", "content": "You write short stories."},
     {"role": "user", "content": "  A story about a dog, please.\n"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Name three colours: caf\u00e9, \u65e5\u672c, \U0001f600?"}],
    [{"role": "user", "content": ""}],
]


def template_text(config):
    t = config["chat_template"]
    if isinstance(t, list):
        return next(e["template"] for e in t if e["name"] == "default")
    return t


def token(v):
    return v["content"] if isinstance(v, dict) else (v or "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "fixtures",
                                                  "chat"))
    args = ap.parse_args()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    cases = []
    for name, kind, config in TEMPLATES:
        tmpl = env.from_string(template_text(config))
        rendered = []
        for messages in CONVERSATIONS:
            rendered.append(tmpl.render(messages=messages, add_generation_prompt=True,
                                        bos_token=token(config.get("bos_token")),
                                        eos_token=token(config.get("eos_token"))))
        cases.append({"name": name, "kind": kind, "tokenizer_config": config,
                      "rendered": rendered if kind != "unsupported" else None})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"conversations": CONVERSATIONS, "templates": cases}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}/cases.json: {len(cases)} templates x {len(CONVERSATIONS)} "
          "conversations")


if __name__ == "__main__":
    main()
