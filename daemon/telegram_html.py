"""Telegram's parse_mode=HTML, as Telegram itself parses it.

A port of tdlib's parse_html (td/telegram/MessageEntity.cpp) rather than an approximation,
so that shotsd can refuse a copy Telegram would refuse (unsupported tag, unclosed tag …)
before anyone is sent anything, and count a text's length the way Telegram does (tags
removed, entities decoded). The Bot API emulator used by the tests answers with it too.
"""

from __future__ import annotations

import string

_TAGS = frozenset(("a", "b", "strong", "i", "em", "s", "strike", "del", "u", "ins", "tg-spoiler",
                   "tg-emoji", "span", "pre", "code", "blockquote"))
_SPACE = frozenset(b" \t\r\n\v\f\0")  # tdlib's is_space; the NUL sentinel ends every scan
_ALNUM = frozenset((string.ascii_letters + string.digits).encode())
_HEX, _DEC = frozenset(string.hexdigits.encode()), frozenset(string.digits.encode())
_NAMED = {b"lt": "<", b"gt": ">", b"amp": "&", b"quot": '"'}


def _html_entity(s: bytes, pos: int) -> tuple[str, int] | None:
    """Decode the entity at s[pos] == '&'; None keeps the '&' literal, as Telegram does."""
    end = pos + 1
    if s[end] == ord("#"):  # &#NNN; or &#xHHH;
        is_hex = s[end + 1] == ord("x")
        end += 1 + is_hex
        start, digits = end, _HEX if is_hex else _DEC
        while s[end] in digits:
            end += 1
        if end == start or end - pos >= 10:
            return None
        code = int(s[start:end], 16 if is_hex else 10)
        if code == 0 or code >= 0x10FFFF:
            return None
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError("Text contains invalid Unicode characters after decoding HTML "
                             "entities, check for unmatched surrogate code units")
        char = chr(code)
    else:
        while chr(s[end]) in string.ascii_letters:
            end += 1
        if (named := _NAMED.get(s[pos + 1:end])) is None:
            return None
        char = named
    return char, end + (s[end] == ord(";"))


def parse_html(text: str) -> str:
    """Return the text Telegram keeps; raise ValueError(detail) where Telegram refuses it."""
    s, out, stack, i = text.encode(errors="surrogatepass") + b"\0", bytearray(), [], 0
    n = len(s) - 1
    while i < n:
        if s[i] == ord("&") and (entity := _html_entity(s, i)):
            out += entity[0].encode()
            i = entity[1]
            continue
        if s[i] != ord("<"):
            out.append(s[i])
            i += 1
            continue
        begin, i = i, i + 1
        if s[i] != ord("/"):  # a start tag
            while s[i] not in _SPACE and s[i] != ord(">"):
                i += 1
            if s[i] == 0:
                raise ValueError(f"Unclosed start tag at byte offset {begin}")
            tag = s[begin + 1:i].decode(errors="replace").lower()
            if tag not in _TAGS:
                raise ValueError(f'Unsupported start tag "{tag}" at byte offset {begin}')
            span_class = b""
            while s[i] != ord(">"):
                while s[i] != 0 and s[i] in _SPACE:
                    i += 1
                if s[i] == ord(">"):
                    break
                name_begin = i
                while s[i] not in _SPACE and s[i] not in b"=>/\"'":
                    i += 1
                name = s[name_begin:i]
                if not name:
                    raise ValueError(f'Empty attribute name in the tag "{tag}" at byte offset '
                                     f"{begin}")
                while s[i] != 0 and s[i] in _SPACE:
                    i += 1
                if s[i] != ord("="):  # a valueless attribute, e.g. <blockquote expandable>
                    if s[i] == 0:
                        raise ValueError(f'Unclosed start tag "{tag}" at byte offset {begin}')
                    continue
                i += 1
                while s[i] != 0 and s[i] in _SPACE:
                    i += 1
                if s[i] == 0:
                    raise ValueError(f'Unclosed start tag "{tag}" at byte offset {begin}')
                if s[i] not in b"'\"":  # a bare name token
                    token_begin = i
                    while s[i] in _ALNUM or s[i] in b".-":
                        i += 1
                    value = s[token_begin:i].lower()
                    if s[i] not in _SPACE and s[i] != ord(">"):
                        raise ValueError(f"Unexpected end of name token at byte offset "
                                         f"{token_begin}")
                else:  # a quoted string, in which entities are decoded too
                    quote, value, i = s[i], b"", i + 1
                    while s[i] != quote and s[i] != 0:
                        if s[i] == ord("&") and (entity := _html_entity(s, i)):
                            value, i = value + entity[0].encode(), entity[1]
                        else:
                            value, i = value + s[i:i + 1], i + 1
                    i += s[i] == quote
                if s[i] == 0:
                    raise ValueError(f"Unclosed start tag at byte offset {begin}")
                if tag == "span" and name == b"class":
                    span_class = value
            if tag == "span" and span_class != b"tg-spoiler":
                raise ValueError(f'Tag "span" must have class "tg-spoiler" at byte offset {begin}')
            stack.append(tag)
        else:  # an end tag
            if not stack:
                raise ValueError(f"Unexpected end tag at byte offset {begin}")
            while s[i] not in _SPACE and s[i] != ord(">"):
                i += 1
            end_tag = s[begin + 2:i].decode(errors="replace").lower()
            while s[i] != 0 and s[i] in _SPACE:
                i += 1
            if s[i] != ord(">"):
                raise ValueError(f"Unclosed end tag at byte offset {begin}")
            if end_tag and end_tag != stack[-1]:
                raise ValueError(f'Unmatched end tag at byte offset {begin}, expected '
                                 f'"</{stack[-1]}>", found "</{end_tag}>"')
            stack.pop()
        i += 1  # past the '>'
    if stack:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{stack[-1]}"')
    return out.decode(errors="replace")
