"""An Ollama Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF, the chat template and stops.

Ollama does not read Jinja: its TEMPLATE is a Go template over `.Messages`. Rather than
parse Jinja, the tokenizer's own template is rendered with marker messages and the text
around each marker is what every role is wrapped in (role prefix and suffix, the
generation prompt, a system prompt the template adds by itself). `template_parts` checks
that those parts rebuild the tokenizer's rendering of a multi-turn conversation exactly,
and refuses a template they cannot (one that changes with position, say).
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_io import ExportError

_M = {"system": "\x00SYS\x00", "user": "\x00USR\x00", "assistant": "\x00AST\x00"}
# End-of-turn markers of the common templates; a stop is emitted for each one the template
# or tokenizer actually contains.
_EOT_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                "</s>", "<|end_of_text|>")


@dataclass
class TemplateParts:
    wrap: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    generation: str                   # what opens the assistant's turn
    default_system: str | None        # a system prompt the template inserts on its own
    head: str = ""                    # text before the first message (e.g. a BOS string)

    def render(self, messages: list[dict], system_first: bool = True) -> str:
        """Rebuild a conversation the way the Go template will (for the self-check)."""
        msgs = list(messages)
        if self.default_system is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.default_system})
        text = self.head + "".join(self.wrap[m["role"]][0] + m["content"]
                                   + self.wrap[m["role"]][1] for m in msgs)
        return text + self.generation


def _render(tok, messages, gen=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def template_parts(tok) -> TemplateParts:
    """Each role's prefix and suffix, the generation prompt and any built-in system prompt,
    read off the tokenizer's own renderings and checked by rebuilding two conversations."""
    if not getattr(tok, "chat_template", None):
        raise ExportError("the tokenizer has no chat_template: write the Modelfile TEMPLATE "
                          "by hand, or run the base without one (Ollama then sends raw text)")
    sys_, usr, ast = ({"role": r, "content": _M[r]} for r in ("system", "user", "assistant"))
    usr2 = {"role": "user", "content": "\x00US2\x00"}
    try:
        full = _render(tok, [sys_, usr, ast])
        before_sys, rest = full.split(_M["system"], 1)
        sys_to_usr, rest = rest.split(_M["user"], 1)
        usr_to_ast, ast_suf = rest.split(_M["assistant"], 1)
        # after an assistant turn comes its suffix, then the next user prefix
        ast_to_usr = _render(tok, [usr, ast, usr2]).split(_M["assistant"], 1)[1].split(
            usr2["content"], 1)[0]
        generation = _render(tok, [sys_, usr], gen=True)[len(_render(tok, [sys_, usr])):]
        user_only = _render(tok, [usr]).split(_M["user"], 1)[0]
    except (ValueError, IndexError) as e:  # a marker vanished: the template rewrites content
        raise ExportError(f"the chat template cannot be read off by rendering ({e}): write the "
                          "Modelfile TEMPLATE by hand") from e
    if not ast_to_usr.startswith(ast_suf) or not usr_to_ast.endswith(generation) \
            or not generation:
        raise ExportError("the chat template's turns do not split into one prefix and suffix "
                          "per role: write the Modelfile TEMPLATE by hand")
    usr_pre = ast_to_usr[len(ast_suf):]
    sys_suf = sys_to_usr[:len(sys_to_usr) - len(usr_pre)]
    usr_suf = usr_to_ast[:len(usr_to_ast) - len(generation)]
    head, sys_pre, default_system = "", before_sys, None
    if user_only.endswith(sys_suf + usr_pre) and user_only.startswith(before_sys) and \
            len(user_only) > len(before_sys + sys_suf + usr_pre):
        default_system = user_only[len(before_sys):len(user_only) - len(sys_suf + usr_pre)]
    elif user_only.endswith(usr_pre):
        head = user_only[:len(user_only) - len(usr_pre)]
        sys_pre = before_sys[len(head):]
    wrap = {"system": (sys_pre, sys_suf), "user": (usr_pre, usr_suf),
            "assistant": (generation, ast_suf)}
    parts = TemplateParts(wrap, generation, default_system, head)
    convo = [sys_, usr, ast, {"role": "user", "content": "second"}]
    for msgs in (convo, convo[1:]):
        if parts.render(msgs) != _render(tok, msgs, gen=True):
            raise ExportError("the chat template does not reduce to one prefix and suffix per "
                              "role (it changes with position): write the TEMPLATE by hand")
    return parts


def _go(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: TemplateParts) -> str:
    """The Ollama (Go text/template) TEMPLATE for these parts."""
    branches = []
    for i, role in enumerate(("system", "user", "assistant")):
        pre, suf = parts.wrap[role]
        kw = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {kw} eq .Role "{role}" }}}}{_go(pre)}{{{{ .Content }}}}'
                        f'{_go(suf)}')
    # No `{{-` trimming: the suffixes' newlines are part of the format.
    return (_go(parts.head) + "{{ range .Messages }}" + "".join(branches)
            + "{{ end }}{{ end }}" + _go(parts.generation))


def stop_tokens(tok, parts: TemplateParts | None) -> list[str]:
    """Every end-of-turn string: the EOS token and the markers closing the assistant's turn."""
    found = [tok.eos_token] if tok.eos_token else []
    suffix = parts.wrap["assistant"][1] if parts else ""
    special = set(tok.all_special_tokens) | {str(t) for t in tok.added_tokens_decoder.values()}
    for marker in _EOT_MARKERS:
        if marker in suffix or (marker in special and marker in (tok.chat_template or "")):
            found.append(marker)
    return list(dict.fromkeys(found))


def modelfile(base_name: str, adapter_name: str, parts: TemplateParts | None,
              stops: list[str]) -> str:
    lines = [f"FROM ./{base_name}", f"ADAPTER ./{adapter_name}"]
    if parts is not None:
        lines.append(f'TEMPLATE """{go_template(parts)}"""')
        if parts.default_system:
            lines.append(f'SYSTEM """{parts.default_system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
