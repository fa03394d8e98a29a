"""S3's XML, both ways: documents built as text, and a parser that hostile input cannot hurt.

Building: every root element but `<Error>` carries the S3 namespace (botocore recognises an
error document by its bare root tag, as real S3 sends it). Text is escaped, and characters
XML 1.0 cannot carry at all (control characters, lone surrogates from undecodable keys) become
U+FFFD; clients that need exact bytes ask for `encoding-type=url`.

Parsing (`parse`): expat straight from the standard library, with a size cap checked before
parsing, and any DOCTYPE refused outright. Without a DTD there are no entity declarations, so
entity expansion ("billion laughs"), external entities and external DTDs are impossible; an
undefined entity is a parse error. Depth and element count are capped too.
"""

from __future__ import annotations

import re
import time
from xml.parsers import expat

from minikv.s3.errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_DEPTH = 16
MAX_ELEMENTS = 100_000

_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\r": "&#13;"})


def escape(text: str) -> str:
    if _INVALID.search(text):
        text = _INVALID.sub("\ufffd", text)
    return text.translate(_ESCAPES)


def _emit(out: list[str], items) -> None:
    for tag, value in items:
        if value is None:
            continue
        if isinstance(value, str):
            out.append(f"<{tag}>{escape(value)}</{tag}>")
        elif isinstance(value, bool):
            out.append(f"<{tag}>{'true' if value else 'false'}</{tag}>")
        elif isinstance(value, int):
            out.append(f"<{tag}>{value}</{tag}>")
        else:
            out.append(f"<{tag}>")
            _emit(out, value)
            out.append(f"</{tag}>")


def document(root: str, items, namespace: bool = True) -> bytes:
    """`<root xmlns=S3>` + items; items are (tag, value) pairs, a value being text, a number,
    a bool, None (left out) or an iterable of pairs (nested elements)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<{root} xmlns="{NS}">' if namespace else f"<{root}>"]
    _emit(out, items)
    out.append(f"</{root}>")
    return "".join(out).encode("utf-8")


def iso_time(ms: int) -> str:
    """`2006-02-03T16:45:09.000Z`: S3's timestamps in XML."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class Node:
    __slots__ = ("tag", "text", "children")

    def __init__(self, tag: str):
        self.tag = tag
        self.text = ""
        self.children: list[Node] = []

    def find(self, tag: str) -> Node | None:
        for c in self.children:
            if c.tag == tag:
                return c
        return None

    def findall(self, tag: str) -> list[Node]:
        return [c for c in self.children if c.tag == tag]

    def value(self, tag: str, default: str | None = None) -> str | None:
        node = self.find(tag)
        return node.text.strip() if node is not None else default


def parse(data: bytes, limit: int) -> Node:
    """The document's root element (namespaces stripped from tag names), or MalformedXML."""
    if len(data) > limit:
        raise S3Error("MaxMessageLengthExceeded", f"the XML document is larger than {limit} bytes")
    parser = expat.ParserCreate(namespace_separator=" ")
    stack: list[Node] = []
    root: list[Node] = []
    count = 0

    def refuse(*_args):
        raise S3Error("MalformedXML", "DOCTYPE and entity declarations are not accepted")

    def start(name, _attrs):
        nonlocal count
        count += 1
        if len(stack) >= MAX_DEPTH or count > MAX_ELEMENTS:
            raise S3Error("MalformedXML", "the XML document is nested too deeply or has too many elements")
        node = Node(name.rpartition(" ")[2])
        if stack:
            stack[-1].children.append(node)
        else:
            root.append(node)
        stack.append(node)

    def end(_name):
        stack.pop()

    def text(data):
        if stack:
            stack[-1].text += data

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise S3Error("MalformedXML", f"the XML you provided was not well-formed: {e}") from None
    if not root:
        raise S3Error("MalformedXML", "empty XML document")
    return root[0]
